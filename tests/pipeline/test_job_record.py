"""The job record and status: one typed view of the job hash, one spelling of each status."""

import dataclasses
import typing

from mcp_server.tool_schemas import StatusName
from pipeline.jobs.record import PUBLIC_STATUSES, TERMINAL_STATUSES, JobRecord, JobStatus


def a_record(**changes: typing.Any) -> JobRecord:
    base = JobRecord(id="a" * 32, status=JobStatus.QUEUED, total=5, model="m", dimensions=4,
                     model_dimensions=8, normalize=True, truncate=False, chunk_size=2, chunks=3,
                     lane="fast", created_at="2026-01-01T00:00:00.000Z", created_ts=1.5,
                     owner="alice")
    return dataclasses.replace(base, **changes)


def test_a_record_reads_back_what_it_wrote() -> None:
    for record in (a_record(), a_record(status=JobStatus.FAILED, done=1, failed=4, tokens=9,
                                        started_at="s", finished_at="f", error="boom")):
        raw = {k.encode(): str(v).encode() for k, v in record.to_hash().items()}
        assert JobRecord.from_hash(raw) == record


def test_only_set_optional_fields_are_written() -> None:
    fields = a_record().to_hash()
    assert not {"started_at", "finished_at", "error"} & set(fields)
    assert fields["normalize"] == 1 and fields["truncate"] == 0 and fields["status"] == "queued"


def test_output_dimensions_are_none_at_the_models_full_size() -> None:
    assert a_record().output_dimensions == 4
    assert a_record(dimensions=8).output_dimensions is None


def test_the_terminal_statuses_are_the_three_ends() -> None:
    assert {s.value for s in TERMINAL_STATUSES} == {"completed", "failed", "cancelled"}
    assert a_record(status=JobStatus.CANCELLED).finished and not a_record().finished


def test_the_mcp_status_literal_is_derived_from_the_enum() -> None:
    assert typing.get_args(StatusName) == tuple(s.value for s in PUBLIC_STATUSES)
    assert "staged" not in typing.get_args(StatusName)
