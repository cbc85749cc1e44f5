"""A process killed between two steps of a multi-step write, simulated in-process.

A Pipeline calls its step hook (`pipeline.scripts.step`) between the steps of
a submission or a cancel; `dying_at` makes it, at the named step, cut its
Redis connections (every later command fails, cleanup included, as after a
kill -9) and raise `Died`.
"""

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from pipeline.service import Pipeline


class Died(Exception):
    """The simulated kill -9."""


def die(pipeline: Pipeline) -> None:
    """From now on this pipeline's Redis refuses everything, as for a dead process."""
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RedisConnectionError("this process is dead")
    pipeline.redis.connection_pool.get_connection = refuse  # type: ignore[attr-defined]
    raise Died("killed")


def dying_at(pipeline: Pipeline, step: str) -> None:
    """Make `pipeline` die when it reaches `step`."""
    async def hook(name: str) -> None:
        if name == step:
            die(pipeline)
    pipeline.scripts.step = hook
