"""The dashboard with API keys on, in headless Chromium: sign in, see your jobs only, sign out.

The browser cannot send a bearer header on a page load or an EventSource,
so `/` shows a sign-in form that exchanges the key for a session cookie.
The test checks what a user sees (their job, not another tenant's) and what
a script on the page can and cannot do: read the cookie (no, it is
HttpOnly), change state without the CSRF token (no, 403), with it (yes).

Debian's Chromium is used (`/usr/bin/chromium`); Playwright's own browser
download is not needed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, async_playwright

from pipeline.settings import Settings
from tests.support.live_server import live_server

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
ALICE, BOB = "alice-dashboard-key", "bob-dashboard-key"


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip("Chromium is not installed at /usr/bin/chromium")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-background-networking"])
        try:
            yield chromium
        finally:
            await chromium.close()


def submit(base: str, key: str, texts: list[str]) -> str:
    reply = httpx.post(f"{base}/v1/jobs", json={"inputs": texts},
                       headers={"Authorization": f"Bearer {key}"})
    assert reply.status_code == 202, reply.text
    return str(reply.json()["id"])


async def test_signing_in_shows_that_keys_jobs_only_with_an_httponly_strict_cookie(
    settings: Settings, browser: Browser
) -> None:
    keyed = settings.replace(api_keys=(ALICE, BOB), stats_interval_s=0.5)
    with live_server(keyed, with_mcp=False) as base:
        alices = submit(base, ALICE, ["a sentence of alice's"])
        bobs = submit(base, BOB, ["a sentence of bob's"])
        page = await browser.new_page()
        await page.goto(base + "/")
        assert await page.locator("input[type=password]").count() == 1
        assert alices[:12] not in await page.content()

        await page.fill("input[type=password]", "not the key")
        await page.click("button[type=submit]")
        await page.wait_for_selector("text=invalid API key")

        await page.fill("input[type=password]", ALICE)
        await page.click("button[type=submit]")
        await page.wait_for_selector(f"text={alices[:12]}", timeout=15_000)
        assert bobs[:12] not in await page.content()
        assert await page.locator("#metrics-link").is_hidden()  # /metrics is for admins

        cookies = {c["name"]: c for c in await page.context.cookies()}
        session = cookies["embedstream_session"]
        assert session["httpOnly"] is True
        assert session["sameSite"] == "Strict"
        assert "embedstream_session" not in await page.evaluate("document.cookie")

        statuses = await page.evaluate("""async ([mine, theirs]) => {
            const del = (id, headers) => fetch('/v1/jobs/' + id, {method: 'DELETE', headers});
            const token = (await (await fetch('/v1/session')).json()).csrf_token;
            return [(await del(mine, {})).status,
                    (await del(mine, {'X-CSRF-Token': 'forged'})).status,
                    (await del(theirs, {'X-CSRF-Token': token})).status,
                    (await del(mine, {'X-CSRF-Token': token})).status];
        }""", [alices, bobs])
        assert statuses == [403, 403, 404, 200]

        signed_out = await page.evaluate("""async () => {
            const token = (await (await fetch('/v1/session')).json()).csrf_token;
            return (await fetch('/v1/session', {method: 'DELETE',
                                                headers: {'X-CSRF-Token': token}})).status;
        }""")
        assert signed_out == 200
        assert "embedstream_session" not in {c["name"] for c in await page.context.cookies()}
        await page.reload()
        assert await page.locator("input[type=password]").count() == 1
        assert (await page.request.get(base + f"/v1/jobs/{alices}")).status == 401
