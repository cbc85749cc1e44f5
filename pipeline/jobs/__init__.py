"""A job's life in Redis: record, scripts, submission, results, events, interactive requests."""


from pipeline.jobs.batch_lines import check_create, check_metadata, option_error
from pipeline.jobs.batches import (
    OUTPUT_FILE_ID,
    WINDOW_S,
    Batches,
    BatchState,
    RequestOutcome,
    check_cancellable,
)
from pipeline.jobs.catalog import Readiness
from pipeline.jobs.events import Event, check_event_id, feed_replay_start
from pipeline.jobs.files import PART_BYTES, StoredFile, check_purpose
from pipeline.jobs.idempotency import MAX_IDEMPOTENCY_KEY, check_idempotency_key
from pipeline.jobs.index import MAX_LIMIT, JobPage
from pipeline.jobs.interactive import Embeddings, Reply, queue_reply
from pipeline.jobs.janitor import sweep_jobs
from pipeline.jobs.quantize import (
    ENCODINGS,
    calibration_texts,
    check_encoding,
    has_calibration,
    store_calibration,
)
from pipeline.jobs.record import (
    JOB_ID,
    PUBLIC_STATUSES,
    TERMINAL_STATUSES,
    JobRecord,
    JobStatus,
    PublicJob,
    check_job_id,
)
from pipeline.jobs.results import MAX_PAGE, ChunkResult, PieceVectors, ResultRow, ResultsPage
from pipeline.jobs.scripts import Committed, JobScripts, announce, announce_created
from pipeline.jobs.search import InputRow, InputsPage, Match, SearchHit
from pipeline.jobs.tenants import TRUSTED, Caller, owner_id, visible

__all__ = [
    "ENCODINGS",
    "JOB_ID",
    "MAX_IDEMPOTENCY_KEY",
    "MAX_LIMIT",
    "MAX_PAGE",
    "OUTPUT_FILE_ID",
    "PART_BYTES",
    "PUBLIC_STATUSES",
    "TERMINAL_STATUSES",
    "TRUSTED",
    "WINDOW_S",
    "BatchState",
    "Batches",
    "Caller",
    "ChunkResult",
    "Committed",
    "Embeddings",
    "Event",
    "InputRow",
    "InputsPage",
    "JobPage",
    "JobRecord",
    "JobScripts",
    "JobStatus",
    "Match",
    "PieceVectors",
    "PublicJob",
    "Readiness",
    "Reply",
    "RequestOutcome",
    "ResultRow",
    "ResultsPage",
    "SearchHit",
    "StoredFile",
    "announce",
    "announce_created",
    "calibration_texts",
    "check_cancellable",
    "check_create",
    "check_encoding",
    "check_event_id",
    "check_idempotency_key",
    "check_job_id",
    "check_metadata",
    "check_purpose",
    "feed_replay_start",
    "has_calibration",
    "option_error",
    "owner_id",
    "queue_reply",
    "store_calibration",
    "sweep_jobs",
    "visible",
]
