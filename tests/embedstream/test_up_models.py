"""`embedstream up --model A --model B`: workers for each model, the first the default."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from typer.testing import CliRunner

from embedstream import cli, processes
from pipeline.settings import Settings


def test_up_starts_workers_for_each_model_and_serves_the_first_as_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spawned: list[str] = []
    served: list[Settings] = []

    @contextlib.contextmanager
    def fake_redis(settings: Settings, **_: Any) -> Iterator[str]:
        yield "redis://127.0.0.1:1"

    def fake_spawn(settings: Settings, *args: Any) -> Any:
        spawned.append(settings.model)
        return None

    async def fake_serve(settings: Settings, *args: Any) -> None:
        served.append(settings)

    monkeypatch.setattr("pipeline.store.redis_for", fake_redis)
    monkeypatch.setattr(processes, "check_port", lambda settings: None)
    monkeypatch.setattr(processes, "spawn_worker", fake_spawn)
    monkeypatch.setattr(processes, "serve", fake_serve)
    monkeypatch.setattr(processes, "stop_children", lambda children: None)
    result = CliRunner().invoke(cli.app, ["up", "--model", "model-a", "--model", "/models/b",
                                          "--model", "model-a", "--workers", "2"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert spawned == ["model-a", "model-a", "/models/b", "/models/b"]
    assert [s.model for s in served] == ["model-a"]
