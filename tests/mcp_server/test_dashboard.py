"""The dashboard in headless Chromium, against a real server and worker.

Debian's Chromium (`/usr/bin/chromium`, which `.ci/run` installs) is driven
through Playwright; Playwright's own browser download is not used. The test
is never skipped: a missing Chromium fails it. Screenshots are saved in the
test's output folder.

The worker runs a fake embedder (a few ms a model call), so a 3,000-text job
takes a few seconds and the page shows it running; the probe's ranking is
checked against the ranking the fake's vectors give.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, sync_playwright

from pipeline.settings import Settings
from pipeline.store.embedded import EmbeddedRedis
from tests.support.fakes import expected_vector
from tests.support.live_server import live_server
from tests.support.processes import (
    Process,
    start_server,
    start_worker,
    wait_for_workers,
    wait_until,
)

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
DIMS = 384


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server (stats every 0.5 s) and one fake worker on a Valkey of their own."""
    root = tmp_path_factory.mktemp("dashboard-stack")
    processes: list[Process] = []
    with EmbeddedRedis(root / "redis", binary="valkey") as server:
        try:
            processes.append(start_worker(server.url, root, "fake",
                                          EMBEDSTREAM_BACKEND="tests.support.fakes:SlowEmbedder",
                                          EMBEDSTREAM_CALIBRATE="0",
                                          EMBEDSTREAM_FAKE_DELAY_S="0.05"))
            process, url = start_server(server.url, root, EMBEDSTREAM_STATS_INTERVAL_S="0.5")
            processes.append(process)
            wait_for_workers(url, 1)
            yield url
        finally:
            for process in processes:
                process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "Chromium is missing: apt-get install chromium (.ci/run does)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            chromium.close()


def open_dashboard(browser: Browser, base: str, errors: list[str]) -> Page:
    page = browser.new_page(viewport={"width": 1400, "height": 1500})

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(base + "/")
    page.wait_for_selector("#conn[data-state=live]", timeout=15_000)
    return page


def probe_order(query: str, candidates: list[str]) -> list[str]:
    vectors = [expected_vector(text, DIMS) for text in [query, *candidates]]
    scores = [float(np.dot(vectors[0], v)) for v in vectors[1:]]
    return [candidates[i] for i in np.argsort(scores)[::-1]]


def test_the_dashboard_shows_a_job_to_completion_the_chart_and_a_probe_ranking(
    base: str, browser: Browser, tmp_path: Path
) -> None:
    errors: list[str] = []
    page = open_dashboard(browser, base, errors)
    texts = [f"dashboard text number {i}" for i in range(3000)]
    texts[1] = "<b>not bold</b> " + "a long dashboard text " * 8  # user data, 192 characters
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts}, timeout=30)
    assert reply.status_code == 202
    job_id = reply.json()["id"]

    row = page.locator(f"#job-{job_id}")
    row.wait_for(timeout=10_000)
    assert row.locator("code.jobid").inner_text() == job_id, "the full id is shown"
    page.wait_for_selector(f"#job-{job_id} .progress[data-pct='100']", timeout=60_000)
    page.wait_for_selector(f"#job-{job_id} .status[data-status=completed]", timeout=10_000)
    assert row.locator(".done").inner_text() == "3000"
    links = row.locator(".links a")
    assert links.nth(1).get_attribute("href") == f"/v1/jobs/{job_id}/results"
    assert links.nth(2).get_attribute("href") == f"/v1/jobs/{job_id}/events"

    page.wait_for_function(
        "Number(document.getElementById('chart').dataset.points) >= 2 && "
        "Number(document.getElementById('chart').dataset.peak) > 1", timeout=15_000)
    assert page.locator("#workers tr").count() == 1
    assert page.locator("#lanes tr").count() == 2  # the model's fast and bulk lanes

    query = "a cat sits on the mat"
    candidates = ["a kitten rests on a rug", "dogs bark at the mailman",
                  "the stock market fell today", "a cat is sleeping on a carpet"]
    rows_before = page.locator("#jobs tr").count()
    listed_before = job_ids(base)
    page.fill("#probe-query", query)
    page.fill("#probe-candidates", "\n".join(candidates))
    page.click("#probe-run")
    page.wait_for_selector("#probe-ranking li:nth-child(4)", timeout=20_000)
    shown = page.locator("#probe-ranking li .text").all_inner_texts()
    assert shown == probe_order(query, candidates)
    assert page.locator("#probe-heatmap").get_attribute("data-cells") == "25"
    page.wait_for_timeout(1500)  # three stats ticks: a job.created would have arrived
    assert page.locator("#jobs tr").count() == rows_before, "a probe is not a job"
    assert job_ids(base) == listed_before
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)

    page.click(f"#job-{job_id} .links a >> text=page")
    page.wait_for_selector("#jobpage:not([hidden])")
    page.wait_for_selector("#jp-results tr:nth-child(10)", timeout=10_000)
    assert page.locator("#jp-pct").inner_text().startswith("100%")
    shown = page.locator("#jp-results tr td.text")
    assert shown.nth(0).inner_text() == texts[0]
    assert shown.nth(1).inner_text() == texts[1][:120] + "…", "long texts are cut, as text"
    assert shown.nth(1).get_attribute("title") == texts[1]
    page.screenshot(path=str(tmp_path / "job.png"), full_page=True)
    assert errors == [], errors


def test_the_dashboard_lists_jobs_older_than_the_feed_and_cancelled_ones(
    base: str, browser: Browser, tmp_path: Path
) -> None:
    cancelled = httpx.post(f"{base}/v1/jobs", json={"inputs": ["to cancel"] * 200}).json()["id"]
    assert httpx.delete(f"{base}/v1/jobs/{cancelled}").json()["status"] == "cancelled"
    for _ in range(60):  # 2 feed events each: the cancelled job leaves the 100-event replay
        assert httpx.post(f"{base}/v1/jobs", json={"inputs": ["filler"]}).status_code == 202
    errors: list[str] = []
    page = open_dashboard(browser, base, errors)
    page.locator(f"#job-{cancelled}").wait_for(timeout=10_000)
    assert page.locator(f"#job-{cancelled} .status").inner_text() == "cancelled"
    assert errors == [], errors


def test_with_api_keys_the_signed_in_dashboard_ranks_a_probe_through_its_csrf_token(
    browser: Browser, settings: Settings, tmp_path: Path
) -> None:
    assert settings.redis_url
    keyed = settings.replace(api_keys=("probe-key",), stats_interval_s=0.5)
    worker = start_worker(settings.redis_url, tmp_path, "keyed",
                          EMBEDSTREAM_BACKEND="tests.support.fakes:HashEmbedder",
                          EMBEDSTREAM_CALIBRATE="0")
    try:
        with live_server(keyed, with_mcp=False) as url:
            wait_for_workers_keyed(url, "probe-key")
            errors: list[str] = []
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(url + "/")
            page.fill("input[type=password]", "probe-key")
            page.click("button[type=submit]")
            page.wait_for_selector("#conn[data-state=live]", timeout=15_000)
            assert page.locator("#signout").is_visible()
            page.click("#probe-run")  # a POST: the session's CSRF token must go with it
            page.wait_for_selector("#probe-ranking li:nth-child(4)", timeout=20_000)
            page.screenshot(path=str(tmp_path / "signed-in.png"), full_page=True)
            assert errors == [], errors
    finally:
        worker.stop()


def wait_for_workers_keyed(url: str, key: str) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    wait_until(lambda: httpx.get(f"{url}/readyz", headers=headers).status_code == 200, 60,
               "a worker")


def job_ids(base: str) -> list[str]:
    return [job["id"] for job in httpx.get(f"{base}/v1/jobs?limit=100").json()["jobs"]]


def test_the_chart_shows_the_minutes_before_the_page_loaded(
    base: str, browser: Browser
) -> None:
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": [f"past {i}" for i in range(600)]})
    job_id = reply.json()["id"]
    wait_until(lambda: httpx.get(f"{base}/v1/jobs/{job_id}").json()["status"] == "completed",
               60, "the job to complete")
    errors: list[str] = []
    page = open_dashboard(browser, base, errors)
    # At once, before two live stats could make a rate: the points come from the feed's past.
    page.wait_for_function("Number(document.getElementById('chart').dataset.history) > 0 && "
                           "Number(document.getElementById('chart').dataset.peak) > 1",
                           timeout=5_000)
    assert errors == [], errors
