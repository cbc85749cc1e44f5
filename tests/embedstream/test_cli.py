"""The command line's first-hour manners: honest help, version, JSON logs, a busy port,
and `mcp` saying where it looked (never in the agent's working folder)."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embedstream.cli import app
from embedstream.logs import configure
from tests.support.processes import ROOT


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
    assert "using Redis unix://" in err
    assert done.stdout == b"", "stdout belongs to the MCP protocol"


def help_of(*command: str) -> str:
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=200,
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize("command", [(), ("serve",), ("worker",), ("up",), ("mcp",),
                                     ("submit",), ("results",)])
def test_help_shows_flags_without_a_value_and_no_python_types(command: tuple[str, ...]) -> None:
    flat = help_of(*command)
    assert "<bool>" not in flat and "list[" not in flat, flat


def test_help_names_every_backend_and_what_one_repeated_model_is() -> None:
    flat = help_of("up")
    assert "--model NAME" in flat
    assert "--insecure Allow" in flat, "--insecure takes no value"
    for backend in ("auto (the fastest", "onnx (ONNX Runtime fp32)", "onnx-int8",
                    "openvino-bf16", "torch", "module:Factory"):
        assert backend in flat
    assert "--quiet -q No progress" in help_of("submit")


def test_a_busy_port_says_which_and_how_to_choose_another(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "embedstream", "up", "--port", str(port)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=tmp_path,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert f"port {port} on 127.0.0.1 is taken" in err
    assert "--port 9000, EMBEDSTREAM_PORT=9000, or `make up PORT=9000`" in err
    assert "Traceback" not in err
    assert not (tmp_path / ".embedstream").exists(), "nothing is started for a busy port"


def test_mcp_with_no_data_dir_uses_the_per_user_one_not_the_working_folder(
    tmp_path: Path
) -> None:
    home, agent = tmp_path / "home", tmp_path / "agent"
    agent.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "embedstream", "mcp"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, cwd=agent,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
             "HOME": str(home)})
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert f"the data dir {home / '.local' / 'share' / 'embedstream'}" in err
    assert not (agent / ".embedstream").exists(), "mcp wrote into the agent's working folder"
    assert "uses $XDG_DATA_HOME/embedstream" not in err
    assert "$XDG_DATA_HOME/embedstream" in help_of("mcp")


@pytest.mark.parametrize("variable,allowed", [
    ("EMBEDSTREAM_ADMIN_KEYS", True), ("EMBEDSTREAM_API_KEYS", True), (None, False)])
def test_admin_keys_alone_allow_binding_beyond_loopback(variable: str | None,
                                                        allowed: bool) -> None:
    with socket.socket() as taken:  # so that `serve` stops at the port, past the bind check
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"EMBEDSTREAM_API_KEYS": "", "EMBEDSTREAM_ADMIN_KEYS": ""}
        if variable:
            env[variable] = "an-operators-key"
        result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", str(port)],
                                    env=env)
    assert result.exit_code == 2, result.output
    refused = "refusing to bind 0.0.0.0 without API keys" in result.output
    assert refused != allowed, result.output
    assert (f"port {port} on 0.0.0.0 is taken" in result.output) == allowed, result.output
