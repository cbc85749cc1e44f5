"""Redis behind Sentinel: a primary found through the sentinels, followed across failovers.

The URL names the sentinels, not the primary:

    redis+sentinel://[user:password@]host:26379[,host2:26379...]/service[/db][?options]
    rediss+sentinel://...  TLS to the sentinels and to the primary

`user:password` and `db` are the primary's; the sentinels get only
`?sentinel_password=...` (none when absent). Other query options are read as
redis-py reads a `redis://` URL's (`ssl_ca_certs=...`, and so on) and apply
to the primary's connections; the `ssl_*` ones to the sentinels' as well. A
sentinel without a port listens on 26379.

A connection asks the sentinels for the primary's address whenever it
connects, so a process follows a failover by reconnecting, as it rides out
any outage: the old primary's connections fail (ConnectionError), the retry
opens new ones to the new primary. redis-py asks only when its pool hands
out a closed connection; a command that reconnects in its own retry went
back to the old address, so `FollowingConnection` asks on every reconnect.
A primary that was demoted but still answers (it came back after a
failover, or Sentinel moved the role on purpose) refuses writes with
READONLY, and a blocked XREAD on it is ended with UNBLOCKED: redis-py's
`SentinelManagedConnection` turns both into ConnectionError and drops the
connection, so the retry finds the new primary. No sentinel reachable, or
none naming a healthy primary (mid-failover), is `MasterNotFoundError`, a
ConnectionError too: all of it reads as an outage.

How many replicas the sentinels know for the primary, down ones included
(`known_replicas`), tells `pipeline.store.replicas` that the deployment is
replicated even while the primary has none connected (after a failover).

The pool waits for a free connection when full, as on a single server:
`WaitingSentinelPool` is redis-py's `SentinelConnectionPool` (the address
lookup) over its `BlockingConnectionPool` (the waiting). Closing a client
closes its pool and the pool closes its sentinels' connections, which
redis-py would leave open.

The sentinels are asked with a timeout even for a `blocking` client (one
with no socket timeout, for BLOCK reads): their answers are small, and a
hung sentinel must not hang a reconnect.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode

import redis
import redis.asyncio as aioredis
import redis.connection
import redis.sentinel
from redis.asyncio.connection import SSLConnection
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.connection import parse_url

SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}  # scheme: TLS
DEFAULT_PORT = 26379
SENTINEL_PASSWORD = "sentinel_password"


@dataclass(frozen=True)
class SentinelUrl:
    """What a `redis+sentinel://` URL says: where the sentinels are, and which primary."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    tls: bool
    # The primary's connection options: username, password, db, query options.
    connection: dict[str, Any]
    sentinel_password: str | None

    def sentinel_options(self) -> dict[str, Any]:
        """Options of the connections to the sentinels: TLS and its settings, the password."""
        options: dict[str, Any] = {k: v for k, v in self.connection.items()
                                   if k.startswith("ssl_")}
        if self.tls:
            options["ssl"] = True
        if self.sentinel_password is not None:
            options["password"] = self.sentinel_password
        return options

    def primary_options(self) -> dict[str, Any]:
        """Options of the connections to the primary, their class (TLS or not) included."""
        return {**self.connection,
                "connection_class": FollowingSSLConnection if self.tls else FollowingConnection}

    def sync_primary_options(self) -> dict[str, Any]:
        """`primary_options` for redis-py's blocking API."""
        return {**self.connection, "connection_class":
                SyncFollowingSSLConnection if self.tls else SyncFollowingConnection}


def is_sentinel_url(url: str) -> bool:
    """Whether `url` names a Sentinel deployment (`redis+sentinel://`, `rediss+sentinel://`)."""
    return url.partition("://")[0].lower() in SCHEMES


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Read a sentinel URL; ValueError naming the problem when it is malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in SCHEMES:
        raise ValueError("a Sentinel URL starts with redis+sentinel:// or rediss+sentinel://")
    # Split by hand: urllib reads one host per URL, and refuses a second in brackets.
    rest = rest.partition("#")[0]
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    userinfo, _, hosts = netloc.rpartition("@")
    service_name, db = _service_and_db(slash + path)
    query = parse_qs(query_text, keep_blank_values=True)
    sentinel_password = query.pop(SENTINEL_PASSWORD, [None])[-1]
    return SentinelUrl(
        sentinels=_addresses(hosts), service_name=service_name,
        tls=SCHEMES[scheme.lower()],
        connection=_connection_options(userinfo, db, query),
        sentinel_password=sentinel_password,
    )


def _addresses(hosts: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host2:port` as (host, port) pairs; IPv6 hosts in brackets."""
    if not hosts.strip():
        raise ValueError("the Sentinel URL names no sentinel: "
                         "redis+sentinel://host:26379,host2:26379/service")
    return tuple(_address(entry.strip()) for entry in hosts.split(","))


def _address(entry: str) -> tuple[str, int]:
    if entry.startswith("["):  # [::1]:26379
        host, _, rest = entry[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"a sentinel address is malformed: {entry!r}")
        port = rest[1:]
    else:
        host, _, port = entry.partition(":")
    if not host:
        raise ValueError(f"a sentinel address has no host: {entry!r}")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a sentinel address has a bad port: {entry!r} "
                         "(a number from 1 to 65535)")
    return host, int(port)


def _service_and_db(path: str) -> tuple[str, int | None]:
    """`/service` or `/service/db`."""
    segments = path.strip("/").split("/") if path.strip("/") else []
    if not segments:
        raise ValueError("the Sentinel URL names no service: add it as the path, "
                         "redis+sentinel://host:26379/mymaster")
    if len(segments) > 2:
        raise ValueError(f"the Sentinel URL's path is /service or /service/db, not {path!r}")
    service_name = unquote(segments[0])
    if len(segments) == 1:
        return service_name, None
    if not segments[1].isdigit():
        raise ValueError(f"the Sentinel URL's database must be a number, not {segments[1]!r}")
    return service_name, int(segments[1])


def _connection_options(userinfo: str, db: int | None,
                        query: dict[str, list[str]]) -> dict[str, Any]:
    """The primary's options, read by redis-py's own URL parser as a `redis://` URL's."""
    credentials = f"{userinfo}@" if userinfo else ""
    path = f"/{db}" if db is not None else ""
    plain = f"redis://{credentials}sentinel{path}?{urlencode(query, doseq=True)}"
    options: dict[str, Any] = dict(parse_url(plain))  # type: ignore[no-untyped-call]
    for key in ("host", "port", "connection_class"):
        options.pop(key, None)
    return options


class FollowingConnection(SentinelManagedConnection):
    """A sentinel-managed connection that asks the sentinels again whenever it reconnects.

    redis-py asks them only when the pool hands out a closed connection: a
    command that reconnects as it is sent (its retry after an error, a health
    check's PING) goes back to the address it had, the old primary, which
    may answer reads as a replica or refuse every try with READONLY.
    """

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send a command, connecting first through the sentinels if the connection is closed."""
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]
        await super().send_packed_command(command, check_health)


class FollowingSSLConnection(FollowingConnection, SSLConnection):
    """`FollowingConnection` over TLS."""


class SyncFollowingConnection(redis.sentinel.SentinelManagedConnection):
    """`FollowingConnection` for redis-py's blocking API."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        """Send a command, connecting first through the sentinels if the connection is closed."""
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class SyncFollowingSSLConnection(SyncFollowingConnection, redis.connection.SSLConnection):
    """`SyncFollowingConnection` over TLS."""


class WaitingSentinelPool(SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A sentinel-managed pool that waits for a free connection when full."""

    async def aclose(self) -> None:
        """Close the pool's connections, then its sentinels' (redis-py leaves those open)."""
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


class ClosingSentinelPool(redis.sentinel.SentinelConnectionPool):
    """A blocking-API sentinel-managed pool whose close closes its sentinels' connections."""

    def close(self) -> None:
        """Close the pool's connections, then its sentinels'."""
        try:
            super().close()
        finally:
            self.sentinel_manager.close()


def open_client(url: str, options: dict[str, Any], *, pool_wait_s: float,
                client_class: type[aioredis.Redis]) -> aioredis.Redis:
    """A `client_class` client of the primary named by the sentinel URL `url`.

    `options` and `client_class` are what a single server's client gets
    (`pipeline.store.connections`); the URL's own options win, as in redis-py.
    """
    target = parse_sentinel_url(url)
    sentinel_options = {"protocol": 2, **_socket_options(options),
                        **target.sentinel_options()}
    manager = Sentinel(target.sentinels, sentinel_kwargs=sentinel_options)
    client: aioredis.Redis = manager.master_for(
        target.service_name, redis_class=client_class,
        connection_pool_class=WaitingSentinelPool,
        **{"timeout": pool_wait_s, **options, **target.primary_options()})
    return client


def open_sync_client(url: str, **options: Any) -> redis.Redis:
    """A blocking-API client of the primary named by the sentinel URL `url`, for tools."""
    target = parse_sentinel_url(url)
    sentinel_options = {"protocol": 2, **_socket_options(options),
                        **target.sentinel_options()}
    manager = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=sentinel_options)
    client: redis.Redis = manager.master_for(
        target.service_name, connection_pool_class=ClosingSentinelPool,
        **{**options, **target.sync_primary_options()})
    return client


def is_sentinel_client(client: object) -> bool:
    """Whether a client from `open_client` (a primary found through sentinels)."""
    return isinstance(getattr(client, "connection_pool", None), SentinelConnectionPool)


async def known_replicas(client: object) -> int | None:
    """How many replicas the sentinels list for `client`'s primary (a client from
    `open_client`), down ones included (`SENTINEL MASTER`'s num-slaves); None when no
    sentinel answers."""
    pool = getattr(client, "connection_pool", None)
    assert isinstance(pool, SentinelConnectionPool), "not a client found through sentinels"
    for sentinel in pool.sentinel_manager.sentinels:
        try:
            state = await sentinel.sentinel_master(pool.service_name)
        except (redis.ConnectionError, redis.TimeoutError, redis.ResponseError):
            continue
        return int(state["num-slaves"])
    return None


def _socket_options(options: dict[str, Any]) -> dict[str, Any]:
    """The sentinels' socket options: always a timeout (see the module docstring)."""
    timeout = options.get("socket_connect_timeout") or options.get("socket_timeout")
    socket = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if "socket_keepalive" in options:
        socket["socket_keepalive"] = options["socket_keepalive"]
    return socket
