"""/metrics: only admins (and the metrics token) read it once keys are set, and no request,
however odd its method or path, adds a series to it."""

from __future__ import annotations

import random
import string

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.settings import Settings
from tests.support.rest import assert_error, serving

pytestmark = pytest.mark.anyio

ALICE, ADMIN, TOKEN = "alice-key", "admin-key", "scraper-token"
METHODS = ["GET", "POST", "DELETE", "PUT", "PATCH", "OPTIONS", "HEAD"]


def series(text: str) -> int:
    """How many samples (series) a scrape holds."""
    return sum(len(family.samples) for family in text_string_to_metric_families(text))


def odd_request(rng: random.Random) -> tuple[str, str]:
    """A made-up method (or a real one) on a made-up path (or a real route with a made-up id)."""
    word = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 12)))
    method = rng.choice([word, word, rng.choice(METHODS)])
    tail = "".join(rng.choices(string.ascii_lowercase + string.digits, k=rng.randint(1, 20)))
    path = rng.choice([f"/{tail}", f"/v1/jobs/{tail}", f"/v1/{tail}/x", "/v1/jobs", "/metrics"])
    return method, path


async def send_odd_requests(client: httpx.AsyncClient, rng: random.Random, count: int) -> None:
    for _ in range(count):
        method, path = odd_request(rng)
        await client.request(method, path)


async def test_thousands_of_odd_methods_and_paths_add_no_metric_series(
    settings: Settings,
) -> None:
    rng = random.Random(7)
    async with serving(settings) as client:
        await send_odd_requests(client, rng, 300)
        await client.get("/metrics")  # counted once answered: the next scrape shows its series
        before = series((await client.get("/metrics")).text)
        await send_odd_requests(client, rng, 3000)
        after = series((await client.get("/metrics")).text)
    assert after == before


async def test_metrics_answers_only_admins_and_the_metrics_token_when_keys_are_set(
    settings: Settings,
) -> None:
    keyed = settings.replace(api_keys=(ALICE,), admin_keys=(ADMIN,), metrics_token=TOKEN)
    async with serving(keyed) as client:
        assert_error(await client.get("/metrics"), 401, "unauthorized")
        assert_error(await client.get("/metrics", headers={"Authorization": f"Bearer {ALICE}"}),
                     403, "forbidden", "admin")
        for key in (ADMIN, TOKEN):
            reply = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert reply.status_code == 200 and "embedstream_cache_hits" in reply.text
        # The token reads /metrics and nothing else.
        assert_error(await client.get("/v1/jobs", headers={"Authorization": f"Bearer {TOKEN}"}),
                     401, "unauthorized")
        for key, status in ((ADMIN, 200), (ALICE, 403)):
            assert (await client.post("/v1/session", json={"key": key})).status_code == 200
            assert (await client.get("/metrics")).status_code == status
            client.cookies.clear()


async def test_metrics_stays_open_without_keys(settings: Settings) -> None:
    async with serving(settings.replace(metrics_token=TOKEN)) as client:
        assert (await client.get("/metrics")).status_code == 200
