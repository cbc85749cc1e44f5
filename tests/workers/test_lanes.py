"""Queue upkeep that no interleaving can break: trim, forget, release, reclaim.

Each runs against Valkey 9, Redis 7.0 and a Valkey cluster (`any_redis_url`),
because the scripts read XPENDING and XINFO replies inside Lua. A peer acting "between
the steps" is made to act exactly there through a wrapped read, and the
scripts' atomicity is also checked under concurrent load.
"""

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from redis.exceptions import ResponseError

from pipeline.keys import GROUP, Keys
from pipeline.model.info import DEFAULT_MODEL
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.fakes import HashEmbedder
from workers.lanes import Forgotten, Lanes
from workers.upkeep import Upkeep

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
FAST, BULK = KEYS.queues(DEFAULT_MODEL)
LAYOUT = KEYS.layout(DEFAULT_MODEL)
JOB = "0" * 32


@pytest.fixture
async def client(any_redis_url: str) -> AsyncIterator[Any]:
    redis = connect(any_redis_url)
    for stream in (FAST, BULK):
        await redis.xgroup_create(stream, GROUP, id="0", mkstream=True)
    try:
        yield redis
    finally:
        await redis.aclose()


def upkeep_for(client: Any, name: str, **changes: Any) -> Upkeep:
    settings = Settings(**{"visibility_timeout_s": 1.0, **changes})
    return Upkeep(client, KEYS, settings, name, HashEmbedder(settings).info, LAYOUT)


async def add_entries(client: Any, stream: str, n: int) -> list[bytes]:
    async with client.pipeline(transaction=False) as pipe:
        for chunk in range(n):
            pipe.xadd(stream, {"job": JOB, "chunk": chunk, "n": 1})
        return list(await pipe.execute())


async def read(client: Any, consumer: str, count: int, stream: str = BULK) -> list[bytes]:
    reply = await client.xreadgroup(GROUP, consumer, {stream: ">"}, count=count)
    return [entry_id for entry_id, _ in reply[0][1]] if reply else []


async def pending_of(client: Any, consumer: str, stream: str = BULK) -> list[bytes]:
    rows = await client.xpending_range(stream, GROUP, "-", "+", 10_000, consumername=consumer)
    return [row["message_id"] for row in rows]


async def test_trimming_under_concurrent_reads_never_deletes_an_unacked_entry(
    client: Any,
) -> None:
    # Each batch is read while nothing is pending, the moment the old two-call
    # floor (XPENDING, then XINFO's last-delivered id) could be moved past it.
    await add_entries(client, BULK, 400)
    lanes = Lanes(client, ((FAST, BULK),))
    lost: list[bytes] = []
    stop = anyio.Event()

    async def worker() -> None:
        while ids := await read(client, "worker", 4):
            present = {e for e, _ in await client.xrange(BULK, min=ids[0], max=ids[-1])}
            lost.extend(set(ids) - present)
            await client.xack(BULK, GROUP, *ids)
        stop.set()

    async def janitor() -> None:
        while not stop.is_set():
            await lanes.trim()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker)
            tg.start_soon(janitor)
            tg.start_soon(janitor)
    assert lost == []
    await lanes.trim()
    assert await client.xlen(BULK) == 1  # only the last delivered entry is kept


async def test_trimming_keeps_undelivered_entries_and_says_when_a_lane_has_no_group(
    client: Any,
) -> None:
    ids = await add_entries(client, FAST, 5)
    await client.xack(FAST, GROUP, *await read(client, "c1", 3, FAST))
    trimmed = await Lanes(client, ((FAST, BULK),)).trim()
    assert [(t.deleted, t.no_group) for t in trimmed] == [(2, False), (0, False)]
    # Another model's lane is another hash slot: one script may not touch both on a cluster.
    other = await Lanes(client, ((KEYS.queue("other", "bulk"),),)).trim()
    assert [(t.deleted, t.no_group) for t in other] == [(0, True)]
    assert [entry_id for entry_id, _ in await client.xrange(FAST)] == ids[2:]


async def test_a_consumer_is_forgotten_only_where_it_holds_nothing(client: Any) -> None:
    await add_entries(client, BULK, 2)
    await add_entries(client, FAST, 1)
    await client.xack(FAST, GROUP, *await read(client, "w1", 1, FAST))
    await read(client, "w1", 1)
    lanes = Lanes(client, ((FAST, BULK),))
    assert await lanes.forget("w1") == {FAST: Forgotten.FORGOTTEN, BULK: Forgotten.KEPT}
    assert len(await pending_of(client, "w1")) == 1
    assert (await Lanes(client, (("no-such-lane",),)).forget("w1")) == {
        "no-such-lane": Forgotten.NO_GROUP}


async def test_a_sweep_never_drops_entries_read_by_a_worker_it_took_for_dead(
    client: Any,
) -> None:
    await add_entries(client, BULK, 4)
    await read(client, "paused", 1, FAST)  # an empty read makes the consumer, holding nothing
    sweeper = upkeep_for(client, "sweeper")
    listed = sweeper._consumers
    woke: list[bytes] = []

    async def consumers_then_peer_reads(stream: str) -> list[dict[str, Any]]:
        found = await listed(stream)
        if stream == BULK and not woke:  # the paused worker wakes after it was listed
            woke.extend(await read(client, "paused", 3))
        return found

    sweeper._consumers = consumers_then_peer_reads  # type: ignore[method-assign]
    await sweeper.sweep_dead_workers()
    assert len(woke) == 3
    assert await pending_of(client, "paused") == woke


async def test_reclaim_finds_a_dead_workers_entries_behind_a_long_run_of_leased_ones(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One XAUTOCLAIM call scans at most ten times its count: 640 pending entries.
    monkeypatch.setattr("workers.upkeep.RECLAIM_PAGES", 1)
    await add_entries(client, BULK, 700)
    await read(client, "busy", 700)  # leased by a live worker, idle for milliseconds
    dead = await add_entries(client, BULK, 3)
    await read(client, "ghost", 3)
    await client.xclaim(BULK, GROUP, "ghost", 0, dead, idle=60_000)
    upkeep = upkeep_for(client, "janitor", visibility_timeout_s=30.0)
    found: list[list[bytes]] = []
    for _ in range(3):
        upkeep._next_reclaim = 0.0
        retry, poison = await upkeep.reclaim_stale()
        found.append([e.entry_id for e in retry + poison])
    assert found == [[], dead, []]  # the walk went on from its cursor, then wrapped
    assert await pending_of(client, "janitor") == dead
    assert len(await pending_of(client, "busy")) == 700


async def test_reclaimed_entries_carry_their_delivery_counts(client: Any) -> None:
    ids = await add_entries(client, BULK, 2)
    await read(client, "ghost", 2)
    await client.xclaim(BULK, GROUP, "ghost", 0, ids[:1], idle=60_000, retrycount=5)
    await client.xclaim(BULK, GROUP, "ghost", 0, ids[1:], idle=60_000)
    upkeep = upkeep_for(client, "janitor", max_deliveries=3)
    retry, poison = await upkeep.reclaim_stale()
    assert [(e.entry_id, e.deliveries) for e in retry] == [(ids[1], 3)]  # read, XCLAIM, reclaim
    assert [(e.entry_id, e.deliveries) for e in poison] == [(ids[0], 6)]


async def test_released_entries_go_to_a_peer_at_once_without_a_delivery_spent(
    client: Any,
) -> None:
    ids = await add_entries(client, BULK, 3)
    await read(client, "leaving", 3)
    leaving = upkeep_for(client, "leaving")
    entries = await leaving.with_deliveries([_entry(entry_id) for entry_id in ids])
    assert await leaving.release(entries[1:]) == 2
    peer = upkeep_for(client, "peer")
    retry, _ = await peer.reclaim_stale()
    assert [(e.entry_id, e.deliveries) for e in retry] == [(ids[1], 1), (ids[2], 1)]
    assert await pending_of(client, "leaving") == ids[:1]
    assert await leaving.release(entries[1:]) == 0  # no longer its to release


def _entry(entry_id: bytes) -> Any:
    from workers.work import Entry

    return Entry(BULK, entry_id, JOB, 0)


async def test_concurrent_sweeps_and_trims_leave_every_pending_entry_claimable(
    client: Any,
) -> None:
    await add_entries(client, BULK, 50)
    janitors = [upkeep_for(client, f"j{i}") for i in range(3)]
    held: list[bytes] = []

    async def reader() -> None:
        for _ in range(25):
            held.extend(await read(client, "flaky", 1))
            with contextlib.suppress(Exception):
                await client.xack(BULK, GROUP, *await read(client, "flaky-acker", 1))

    async def janitor(upkeep: Upkeep) -> None:
        for _ in range(25):
            await upkeep.sweep_dead_workers()
            await upkeep.trim_queues()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader)
            for upkeep in janitors:
                tg.start_soon(janitor, upkeep)
    claimed = await client.xautoclaim(BULK, GROUP, "rescuer", 0, count=1000)
    assert sorted(entry_id for entry_id, fields in claimed[1] if fields) == sorted(held)


async def test_claim_reads_entries_one_by_one_until_their_texts_fill_the_budget(
    client: Any,
) -> None:
    lanes = Lanes(client, ((FAST, BULK),))
    async with client.pipeline(transaction=False) as pipe:
        for size in (3, 3, 3, 1):
            pipe.xadd(FAST, {"req": f"r{size}", "n": size})
        ids = list(await pipe.execute())
    first = await lanes.claim(FAST, "worker", 4)
    assert [(i, f[b"n"]) for i, f in first] == [(ids[0], b"3"), (ids[1], b"3")]
    assert await pending_of(client, "worker", FAST) == ids[:2]
    assert [i for i, _ in await lanes.claim(FAST, "peer", 100)] == ids[2:]
    assert await lanes.claim(FAST, "worker", 4) == []  # nothing new: no entry, no error


async def test_claim_on_a_lane_without_its_group_raises_nogroup(client: Any) -> None:
    await client.delete(FAST)
    with pytest.raises(ResponseError, match="NOGROUP"):
        await Lanes(client, ((FAST, BULK),)).claim(FAST, "worker", 4)
