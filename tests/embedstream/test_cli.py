"""The command line's first-hour manners: help, version, JSON logs, `mcp` saying where it looked."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from processes import ROOT
from typer.testing import CliRunner

from embedstream.cli import app
from embedstream.logs import configure


@pytest.mark.parametrize("command,expected", [
    ("serve", ["[env: EMBEDSTREAM_PORT; default: 8000]",
               "[env: EMBEDSTREAM_HOST; default: 127.0.0.1]",
               "[env: EMBEDSTREAM_REDIS_URL; default: unset]", "[env: EMBEDSTREAM_API_KEYS;"]),
    ("worker", ["[env: EMBEDSTREAM_BACKEND;", "[env: EMBEDSTREAM_DEVICE; default: auto]"]),
    ("submit", ["[env: EMBEDSTREAM_URL; default: http://127.0.0.1:8000]",
                "[env: first of EMBEDSTREAM_API_KEYS]"]),
])
def test_help_shows_each_options_variable_and_default(command: str, expected: list[str]) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0
    flat = " ".join(result.output.replace("│", " ").split())
    for text in expected:
        assert text in flat, f"{text!r} missing from `{command} --help`"


def test_version_prints_the_package_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("embedstream ")


def test_json_logs_are_one_object_a_line_with_the_events_fields(
    capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("info", "json")
        logging.getLogger("pipeline.service").info(
            "job %s created: %s texts", "ab" * 16, 3,
            extra={"event": "job.created", "job_id": "ab" * 16, "total": 3})
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip())
    assert line["message"] == f"job {'ab' * 16} created: 3 texts"
    assert line["event"] == "job.created" and line["total"] == 3
    assert line["level"] == "info" and line["logger"] == "pipeline.service"


def test_mcp_without_a_running_up_says_which_data_dir_and_redis_it_used(tmp_path: Path) -> None:
    data_dir = tmp_path / "agent-data"
    done = subprocess.run(
        [sys.executable, "-m", "embedstream", "mcp", "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert f"no running `embedstream up` uses the data dir {data_dir}" in err
    assert "using Redis redis://127.0.0.1:" in err
    assert done.stdout == b"", "stdout belongs to the MCP protocol"
