"""The janitor walks every active job, a bounded page at a time, however many there are."""

import anyio
import pytest

from pipeline.inputs import Item, JobOptions
from pipeline.jobs import janitor
from pipeline.jobs.record import JobStatus
from pipeline.keys import Keys
from pipeline.service import Pipeline
from pipeline.settings import Settings

pytestmark = pytest.mark.anyio

KEYS = Keys("es")
PAGE = 10


async def test_the_newest_of_more_jobs_than_a_page_still_times_out(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(janitor, "SWEEP_PAGE_JOBS", PAGE)
    pipeline = Pipeline(settings)
    try:
        older = [await pipeline.submit([Item(f"waits {n}")], JobOptions(timeout_s=3600))
                 for n in range(34)]
        stuck = await pipeline.submit([Item("stuck")], JobOptions(timeout_s=0.2))
        with anyio.fail_after(10):
            while True:
                sweep = await janitor.sweep_jobs(pipeline.scripts, settings)
                assert sweep.seen == 35
                if (await pipeline.job(stuck.id)).status is not JobStatus.QUEUED:
                    break
                await anyio.sleep(0.05)
        end = await pipeline.job(stuck.id)
        assert end.status is JobStatus.FAILED and "no live worker serves" in end.error
        statuses = {(await pipeline.job(job.id)).status for job in older}
        assert statuses == {JobStatus.QUEUED}
    finally:
        await pipeline.close()


@pytest.mark.parametrize("drop", [True, False], ids=["dropping", "keeping"])
async def test_a_page_walk_sees_every_member_once_despite_equal_scores_and_removals(
    settings: Settings, drop: bool
) -> None:
    pipeline = Pipeline(settings)
    index = "es:test:walk"
    try:
        # 25 members share one score (more than a page), then 12 with scores of their own.
        await pipeline.redis.zadd(index, {f"tie-{n:02d}": 5.0 for n in range(25)})
        await pipeline.redis.zadd(index, {f"own-{n:02d}": 10.0 + n for n in range(12)})
        seen: list[str] = []
        async for page in janitor.active_pages(pipeline.redis, index, PAGE):
            assert 0 < len(page) <= PAGE
            seen += page
            if drop:  # as the sweep drops finished jobs
                await pipeline.redis.zrem(index, *page)
        assert sorted(seen) == sorted([f"tie-{n:02d}" for n in range(25)]
                                      + [f"own-{n:02d}" for n in range(12)])
        assert len(seen) == len(set(seen))
    finally:
        await pipeline.close()


async def test_a_page_walk_of_an_empty_index_yields_nothing(settings: Settings) -> None:
    pipeline = Pipeline(settings)
    try:
        assert [page async for page in janitor.active_pages(pipeline.redis, "es:none", PAGE)] \
            == []
    finally:
        await pipeline.close()
