"""Redis clients, configured the one way embedstream needs them.

RESP2 is pinned: RESP3 changes the shape of stream replies. Replies are
bytes (vectors are binary). Blocking reads (XREAD/XREADGROUP BLOCK) get a
client with no socket timeout, because redis-py's default timeout turns a
long BLOCK into a TimeoutError; every other command keeps a timeout so a
hung server is noticed. On a single server both pools wait up to
`POOL_WAIT_S` for a free connection when full (redis-py's
BlockingConnectionPool); redis-py's cluster client has no waiting pool, so
there a full pool (per node) fails at once with MaxConnectionsError.

The URL may name a single server or any node of a Redis Cluster or Valkey
Cluster: `connect()` asks the node (`INFO cluster`) and returns redis-py's
cluster client when `cluster_enabled:1`, so no setting says which. The mode
is asked again at every `connect()`, never cached, so a process that
reconnects after the server was replaced learns the new mode. What the
cluster client adds over redis-py's (`ClusterClient`):

- scripts registered with `register_script` run in pipelines (redis-py's
  ClusterPipeline refuses EVALSHA, because it never loads a script): they are
  loaded onto every primary before the first pipeline that runs them, and a
  command that meets NOSCRIPT (a node restarted or failed over) is run again
  once they are loaded again;
- XREAD/XREADGROUP are routed by the STREAMS keys parsed here, instead of a
  `COMMAND GETKEYS` round trip to one node before every read;
- the COMMAND table redis-py reads to find keys (a 0.25 s parse on every
  client's start) is read once per process and node address, and shared;
- "no node reachable" and "slots not covered" raise redis-py's
  ConnectionError (a RedisError), as a single server's outage does, instead
  of RedisClusterException, which is not a RedisError.

On a cluster a non-transactional pipeline is split per node and the nodes
run in parallel: commands of different slots in one pipeline have no order.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Generator, Iterator, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import redis
import redis.asyncio as aioredis
from redis._parsers.commands import AsyncCommandsParser
from redis.asyncio.cluster import ClusterPipeline, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)
from redis.retry import Retry as SyncRetry

from pipeline.errors import Unavailable
from pipeline.store import sentinel
from pipeline.store.commands import RedisClient as RedisClient  # re-exported: connect() makes one

logger = logging.getLogger(__name__)
P = ParamSpec("P")
T = TypeVar("T")

COMMAND_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0
PROBE_TIMEOUT_S = 2.0
# How long a command or a blocking read waits for a free connection of a full pool.
POOL_WAIT_S = COMMAND_TIMEOUT_S
OUTAGE_RETRY_AFTER_S = 2
# RedisClusterException messages that mean "cannot reach the cluster" rather than a bug.
_OUTAGE_MESSAGES = ("Redis Cluster cannot be connected", "All slots are not covered")
# Replies that mean the server is changing hands (a failover, a restart, a replica
# rejoining), not that the command was wrong: CLUSTERDOWN and MASTERDOWN, TRYAGAIN while
# slots move, READONLY from a primary demoted under our feet, UNBLOCKED for a blocked
# read whose node changed role, NOREPLICAS while too few replicas are connected.
_FAILOVER_ERRORS = (ClusterDownError, TryAgainError, ReadOnlyError)
_FAILOVER_REPLIES = ("CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN", "READONLY", "UNBLOCKED",
                     "NOREPLICAS", "LOADING")


def text_of(value: object) -> str:
    """A reply value as text: bytes decoded (replies are bytes here), anything else as str."""
    return value.decode() if isinstance(value, bytes) else str(value)


def connect(url: str, *, blocking: bool = False, max_connections: int = 512) -> RedisClient:
    """A pooled asyncio client for `url` (a server or cluster node); `blocking` for BLOCK reads."""
    # redis-py types each reply as a union over `decode_responses` and sync or
    # async; `_open` pins asyncio, RESP2 and bytes, the shapes `RedisClient`
    # declares, so the client is cast to it here, once.
    return cast(RedisClient, _open(url, blocking=blocking, max_connections=max_connections))


def _open(url: str, *, blocking: bool, max_connections: int) -> aioredis.Redis | RedisCluster:
    """redis-py's asyncio client for `url`, as redis-py types it (see `connect`)."""
    options: dict[str, Any] = {
        "protocol": 2,
        "decode_responses": False,
        "socket_timeout": None if blocking else COMMAND_TIMEOUT_S,
        "socket_connect_timeout": CONNECT_TIMEOUT_S,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        # On a cluster this is per node.
        "max_connections": max_connections,
    }
    if url.startswith("unix://"):  # the embedded server's socket: keepalive is a TCP option
        del options["socket_keepalive"]
    if sentinel.is_sentinel_url(url):  # a primary found through Sentinel (`store.sentinel`)
        return sentinel.open_client(url, options, pool_wait_s=POOL_WAIT_S,
                                    client_class=ServerClient)
    if cluster_enabled(url):
        return ClusterClient.from_url(url, **options)
    # Commands and blocking reads wait for a free connection rather than fail at
    # the cap: a server with a thousand SSE subscribers then holds a few dozen
    # command connections, not one per subscriber, and a fan-out reader past
    # the cap waits its turn (a BLOCK read frees its connection within
    # `block_ms`) instead of answering "Too many connections".
    pool = aioredis.BlockingConnectionPool.from_url(url, timeout=POOL_WAIT_S, **options)
    client = ServerClient(connection_pool=pool)
    client.auto_close_connection_pool = True
    return client


def connect_sync(url: str) -> redis.Redis | redis.RedisCluster:
    """A blocking client for `url` (a server or a cluster node), for tests and tools."""
    if sentinel.is_sentinel_url(url):
        return sentinel.open_sync_client(url, protocol=2, decode_responses=False,
                                         socket_timeout=COMMAND_TIMEOUT_S)
    if cluster_enabled(url):
        return redis.RedisCluster.from_url(url, protocol=2, decode_responses=False,
                                           socket_timeout=COMMAND_TIMEOUT_S)
    return redis.Redis.from_url(url, protocol=2, decode_responses=False,
                                socket_timeout=COMMAND_TIMEOUT_S)


def cluster_enabled(url: str) -> bool:
    """Whether the server at `url` is a cluster node; False when it cannot be asked."""
    if sentinel.is_sentinel_url(url):  # Sentinel watches a primary, never a cluster
        return False
    probe = redis.Redis.from_url(
        url, protocol=2, socket_timeout=PROBE_TIMEOUT_S,
        socket_connect_timeout=PROBE_TIMEOUT_S, retry=SyncRetry(NoBackoff(), retries=0),
    )
    try:
        with probe:
            info: dict[str, Any] = probe.info("cluster")
    except redis.RedisError as exc:
        # Unreachable now: a single-server client reports the outage as
        # ConnectionError on first use, and the next connect() asks again.
        logger.warning("could not ask %s whether it is a cluster node: %s", _safe(url), exc)
        return False
    return str(info.get("cluster_enabled", "0")) == "1"


def is_cluster(client: object) -> bool:
    """Whether a client from `connect()` or `connect_sync()` talks to a cluster."""
    return isinstance(client, RedisCluster | redis.RedisCluster)


@contextlib.contextmanager
def redis_outage() -> Iterator[None]:
    """Turn Redis connection and timeout errors into Unavailable (503 with Retry-After).

    The one boundary where a lost Redis becomes our error, as httpx maps its
    transport's exceptions (`map_httpcore_exceptions`): `Pipeline` runs every
    call inside it, so no route answers 500 for an outage.
    """
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise Unavailable(f"Redis is unreachable right now ({type(exc).__name__}: "
                          f"{str(exc)[:200]}); retry in a moment",
                          retry_after_s=OUTAGE_RETRY_AFTER_S) from exc


def outage_is_unavailable(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
    """Run a Pipeline call inside `redis_outage()`: a lost Redis raises Unavailable."""

    @functools.wraps(fn)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        with redis_outage():
            return await fn(*args, **kwargs)

    return call


def _safe(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}" if sep else url


class Failover(RedisConnectionError):
    """A reply or error that means Redis is changing hands: an outage, retried as one."""


def is_failover(exc: BaseException) -> bool:
    """Whether `exc` says the server or cluster is failing over rather than refusing."""
    if isinstance(exc, SlotNotCoveredError | Failover):
        return True
    if isinstance(exc, RedisClusterException):
        return str(exc).startswith(_OUTAGE_MESSAGES)
    return isinstance(exc, ResponseError) and (
        isinstance(exc, _FAILOVER_ERRORS) or str(exc).startswith(_FAILOVER_REPLIES))


def _outage(exc: Exception) -> Exception:
    """A failover, or a cluster that cannot be reached, reads as an outage: a
    ConnectionError, which every loop here retries after a pause and every request
    answers with 503 and Retry-After."""
    if isinstance(exc, Failover) or not is_failover(exc):
        return exc
    error = Failover(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _raise_replies(replies: list[Any]) -> None:
    """Raise the first error among a pipeline's replies, a failover as an outage."""
    for reply in replies:
        if isinstance(reply, Exception):
            raise _outage(reply)


class ServerClient(aioredis.Redis):
    """redis-py's asyncio client of one server, reporting a failover as an outage.

    It also keeps the scripts registered with it: a script whose first call
    met a demoted primary was loaded there, and its retry on the new primary
    meets NOSCRIPT; the script is then loaded there and run again, once.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scripts: dict[str, AsyncScript] = {}

    def register_script(self, script: Any) -> AsyncScript:  # type: ignore[override]
        """Register a script, remembered by its hash."""
        registered = super().register_script(script)
        self.scripts[registered.sha] = registered
        return registered

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        """Run one command; a failover reply raises Failover (a ConnectionError)."""
        try:
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except NoScriptError:
            script = self.scripts.get(text_of(args[1])) if len(args) > 1 else None
            if str(args[0]).upper() != "EVALSHA" or script is None:
                raise
            await self.script_load(script.script)
            return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]
        except ResponseError as exc:
            raise _outage(exc) from exc

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Any:
        """A pipeline whose failover replies raise Failover."""
        return ServerPipeline(self.connection_pool, self.response_callbacks, transaction,
                              shard_hint)


class ServerPipeline(aioredis.client.Pipeline):
    """redis-py's pipeline, reporting a failover reply as an outage."""

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Run the pipeline; a failover reply raises Failover (a ConnectionError)."""
        try:
            replies = list(await super().execute(raise_on_error=False))
        except ResponseError as exc:  # MULTI/EXEC answers some errors for the whole
            raise _outage(exc) from exc
        if raise_on_error:
            _raise_replies(replies)
        return replies


def stream_keys(args: Sequence[Any]) -> list[Any]:
    """The stream names of an XREAD/XREADGROUP's arguments (after STREAMS, first half)."""
    for position, arg in enumerate(args):
        word = arg.decode() if isinstance(arg, bytes) else arg
        if isinstance(word, str) and word.upper() == "STREAMS":
            rest = list(args[position + 1:])
            return rest[:len(rest) // 2]
    return []


# COMMAND replies by node address, shared by every cluster client of the process.
_COMMAND_TABLES: dict[str, dict[str, Any]] = {}


class SharedCommandsParser(AsyncCommandsParser):
    """redis-py's key finder, reading the COMMAND table once per node address."""

    async def initialize(self, node: Any | None = None) -> None:
        """Load the table; a first load per address is shared, a reload (no node) is not."""
        if node is not None and node.name in _COMMAND_TABLES:
            self.node = node
            self.commands = _COMMAND_TABLES[node.name]
            return
        await super().initialize(node)
        _COMMAND_TABLES[self.node.name] = self.commands


class ClusterClient(RedisCluster):
    """redis-py's asyncio cluster client, with the additions the module docstring lists."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.commands_parser = SharedCommandsParser()
        self.scripts: dict[str, AsyncScript] = {}
        self.scripts_loaded = False

    def register_script(self, script: Any) -> AsyncScript:  # type: ignore[override]
        """Register a script; it is loaded onto every primary before pipelines run it."""
        registered = super().register_script(script)
        self.scripts[registered.sha] = registered
        self.scripts_loaded = False
        return registered

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every registered script (redis-py sends it to every primary)."""
        for script in list(self.scripts.values()):
            await self.script_load(script.script)
        self.scripts_loaded = True

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> Any:
        """A cluster pipeline that loads registered scripts before running them."""
        if shard_hint:
            raise RedisClusterException("shard_hint is deprecated in cluster mode")
        return ScriptLoadingPipeline(self, transaction)  # type: ignore[abstract]

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Run one command, reporting an unreachable cluster as ConnectionError."""
        try:
            return await super().execute_command(*args, **kwargs)
        except (RedisClusterException, ResponseError) as exc:
            raise _outage(exc) from exc

    async def _determine_slot(self, command: str, *args: Any) -> int:
        # XREAD/XREADGROUP have "movable keys": redis-py would ask a node
        # (COMMAND GETKEYS) before every read; the stream names are plain here.
        if str(command).upper() in ("XREAD", "XREADGROUP"):
            slots = {self.keyslot(key) for key in stream_keys(args)}
            if len(slots) == 1:
                return slots.pop()
            if slots:
                raise RedisClusterException(f"{command} - all keys must map to the same key slot")
        return await super()._determine_slot(command, *args)


class ScriptLoadingPipeline(ClusterPipeline):
    """A ClusterPipeline whose EVALSHA commands find their scripts loaded."""

    def __init__(self, client: ClusterClient, transaction: bool | None = None) -> None:
        super().__init__(client, transaction)
        self.loader = client
        self.queued: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __await__(self) -> Generator[Any, None, ScriptLoadingPipeline]:
        # AsyncScript awaits what `pipe.evalsha()` returns (the pipeline), and
        # ClusterPipeline's await re-initializes it, emptying the queue.
        return self._connected().__await__()

    async def _connected(self) -> ScriptLoadingPipeline:
        if self.loader._initialize:
            await self.loader.initialize()
        return self

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        """Queue a script by hash (redis-py blocks this in cluster pipelines: no loading)."""
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)

    def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        """Queue a command (remembered, so one that meets NOSCRIPT can be run again)."""
        self.queued.append((args, dict(kwargs)))
        return super().execute_command(*args, **kwargs)

    async def reset(self) -> None:  # type: ignore[override]
        """Forget the queued commands."""
        self.queued = []
        await super().reset()  # type: ignore[no-untyped-call]

    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> Any:
        """Run the pipeline; reload scripts and rerun the commands that met NOSCRIPT."""
        queued = list(self.queued)
        try:
            if not self.loader.scripts_loaded and any(
                    str(args[0]).upper() == "EVALSHA" for args, _ in queued):
                await self.loader.load_scripts()
            replies = list(await super().execute(raise_on_error=False,
                                                 allow_redirections=allow_redirections))
            if not self._transaction:
                await self._rerun_noscript(queued, replies)
        except (RedisClusterException, ResponseError) as exc:
            raise _outage(exc) from exc
        if raise_on_error:
            _raise_replies(replies)
        return replies

    async def _rerun_noscript(self, queued: list[tuple[tuple[Any, ...], dict[str, Any]]],
                              replies: list[Any]) -> None:
        failed = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if not failed:
            return
        logger.info("reloading scripts: a node answered NOSCRIPT")
        await self.loader.load_scripts()
        for i in failed:
            args, kwargs = queued[i]
            try:
                replies[i] = await self.loader.execute_command(*args, **kwargs)
            except Exception as exc:  # reported like any pipeline error
                replies[i] = exc
