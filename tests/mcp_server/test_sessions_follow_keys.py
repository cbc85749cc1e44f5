"""Dashboard sessions are worth what their key is worth now, are bounded per key, and their
cookie is `__Host-` prefixed and Secure over https (a trusted proxy's word counts, no one else's).

A restart is a new app with other Settings on the same Redis: sessions signed in under the
first configuration are presented to the second.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from mcp_server.sessions import Session, SessionStore
from pipeline.jobs import Caller, owner_id
from pipeline.keys import Keys
from pipeline.settings import Settings
from pipeline.store.connections import connect
from tests.support.rest import assert_error, serving

pytestmark = pytest.mark.anyio

ALICE, BOB, ADMIN, NEW_ADMIN = "alice-key", "bob-key", "admin-key", "new-admin-key"
PLAIN, SECURE = "embedstream_session", "__Host-embedstream_session"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def sign_in(client: httpx.AsyncClient, key: str, name: str = PLAIN) -> str:
    """Sign in with `key`; the session cookie's value."""
    reply = await client.post("/v1/session", json={"key": key})
    assert reply.status_code == 200, reply.text
    value = reply.cookies.get(name)
    assert value, reply.headers.get_list("set-cookie")
    client.cookies.clear()
    return str(value)


def cookie(value: str, name: str = PLAIN) -> dict[str, str]:
    return {"Cookie": f"{name}={value}"}


async def redis_keys(settings: Settings, pattern: str) -> list[bytes]:
    assert settings.redis_url
    redis = connect(settings.redis_url)
    try:
        return sorted(await redis.keys(pattern))
    finally:
        await redis.aclose()


async def job_ids(client: httpx.AsyncClient, headers: dict[str, str]) -> set[str]:
    reply = await client.get("/v1/jobs", headers=headers)
    assert reply.status_code == 200, reply.text
    return {job["id"] for job in reply.json()["jobs"]}


async def test_a_removed_keys_session_stops_at_once_and_its_record_is_deleted(
    settings: Settings,
) -> None:
    before = settings.replace(api_keys=(ALICE, BOB), admin_keys=(ADMIN,))
    async with serving(before) as client:
        alices = (await client.post("/v1/jobs", json={"inputs": ["a"]},
                                    headers=bearer(ALICE))).json()["id"]
        bobs, admins = await sign_in(client, BOB), await sign_in(client, ADMIN)
        assert alices in await job_ids(client, cookie(admins))
        assert (await client.get("/v1/session", headers=cookie(bobs))).status_code == 200
    assert len(await redis_keys(settings, "es:session:*")) == 2

    after = settings.replace(api_keys=(ALICE,), admin_keys=(NEW_ADMIN,))
    async with serving(after) as client:
        assert_error(await client.get("/v1/jobs", headers=bearer(BOB)), 401, "unauthorized")
        assert_error(await client.get("/v1/jobs", headers=cookie(bobs)), 401, "unauthorized")
        assert_error(await client.get("/v1/jobs", headers=cookie(admins)), 401, "unauthorized")
        assert_error(await client.get("/metrics", headers=cookie(admins)), 401)
        assert (await client.get("/v1/session", headers=cookie(admins))).status_code == 401
    assert await redis_keys(settings, "es:session:*") == []


async def test_a_demoted_admins_session_loses_admin_at_once(settings: Settings) -> None:
    before = settings.replace(api_keys=(ALICE,), admin_keys=(ADMIN,))
    async with serving(before) as client:
        alices = (await client.post("/v1/jobs", json={"inputs": ["a"]},
                                    headers=bearer(ALICE))).json()["id"]
        admins = await sign_in(client, ADMIN)
        assert alices in await job_ids(client, cookie(admins))

    after = settings.replace(api_keys=(ALICE, ADMIN), admin_keys=(NEW_ADMIN,))
    async with serving(after) as client:
        assert alices not in await job_ids(client, cookie(admins))
        me = (await client.get("/v1/session", headers=cookie(admins))).json()
        assert me["admin"] is False and me["owner"] == owner_id(ADMIN)
        assert_error(await client.get(f"/v1/jobs/{alices}", headers=cookie(admins)), 404)
        assert_error(await client.get("/metrics", headers=cookie(admins)), 403, "forbidden")


async def test_a_key_at_its_session_quota_is_refused_while_another_key_signs_in(
    settings: Settings,
) -> None:
    quota = 3
    keyed = settings.replace(api_keys=(ALICE, BOB), key_quota_sessions=quota)
    async with serving(keyed) as client:
        bobs = [await sign_in(client, BOB) for _ in range(quota)]
        refused = await client.post("/v1/session", json={"key": BOB})
        assert_error(refused, 429, "overloaded", "EMBEDSTREAM_KEY_QUOTA_SESSIONS")
        assert 1 <= int(refused.headers["Retry-After"]) <= keyed.session_ttl_s
        assert "set-cookie" not in refused.headers
        alices = await sign_in(client, ALICE)
        assert (await client.get("/v1/jobs", headers=cookie(alices))).status_code == 200
        for value in bobs:  # B's own dashboards keep working at the bound
            assert (await client.get("/v1/jobs", headers=cookie(value))).status_code == 200

        token = (await client.get("/v1/session", headers=cookie(bobs[0]))).json()["csrf_token"]
        out = await client.delete("/v1/session", headers={**cookie(bobs[0]),
                                                          "X-CSRF-Token": token})
        assert out.status_code == 200
        assert_error(await client.get("/v1/jobs", headers=cookie(bobs[0])), 401)
        await sign_in(client, BOB)  # the slot signing out freed
    index = await redis_keys(settings, "es:sessions:*")
    assert index == sorted([Keys("es").sessions(owner_id(ALICE)).encode(),
                            Keys("es").sessions(owner_id(BOB)).encode()])
    assert len(await redis_keys(settings, "es:session:*")) == quota + 1


class Failing:
    """Raises in place of one step of a session write: the process died there."""

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("the process died here")


async def test_a_sign_in_that_dies_after_its_record_holds_no_quota_slot_and_no_session(
    any_redis_url: str,
) -> None:
    redis, keys, alice = connect(any_redis_url), Keys("es"), Caller(owner_id(ALICE))
    try:
        store = SessionStore(redis, keys, 3600)
        store._admit = Failing()  # type: ignore[assignment]
        with pytest.raises(ConnectionError):
            await store.create(alice, quota=1)  # its record written, no cookie sent
        await redis.set(keys.session("guessed"), b'{"owner": "x", "csrf": "t"}')
        assert await store.get("guessed") is None  # a record no index names is no session

        store = SessionStore(redis, keys, 3600)
        session = await store.create(alice, quota=1)
        assert isinstance(session, Session), "the dead sign-in held the only slot"
        assert await store.get(session.id) is not None

        redis.delete = Failing()  # type: ignore[method-assign]
        with pytest.raises(ConnectionError):
            await store.end(session)  # signing out died after the index, before the record
        del redis.delete
        assert await store.get(session.id) is None  # its record is left, worthless, to expire
    finally:
        await redis.aclose()


@pytest.mark.parametrize("base,headers,proxies,name", [
    ("https://127.0.0.1", {}, (), SECURE),
    ("http://127.0.0.1", {}, (), PLAIN),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https"}, (), PLAIN),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https"}, ("10.0.0.0/8",), PLAIN),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https"}, ("127.0.0.0/8",), SECURE),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https"}, ("127.0.0.1",), SECURE),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https"}, ("*",), SECURE),
    ("http://127.0.0.1", {"X-Forwarded-Proto": "https, http"}, ("*",), PLAIN),
], ids=["https", "http", "untrusted-forwarded", "other-proxy", "trusted-cidr",
        "trusted-address", "any-proxy", "proxy-said-http"])
async def test_the_cookie_is_host_prefixed_and_secure_only_over_https(
    settings: Settings, base: str, headers: dict[str, str], proxies: tuple[str, ...], name: str,
) -> None:
    keyed = settings.replace(api_keys=(ALICE,), trusted_proxies=proxies)
    async with serving(keyed, base_url=base) as client:
        client.headers.update(headers)
        reply = await client.post("/v1/session", json={"key": ALICE})
        assert reply.status_code == 200, reply.text
        [set_cookie] = reply.headers.get_list("set-cookie")
        assert set_cookie.startswith(f"{name}=")
        assert ("; secure" in set_cookie.lower()) == (name == SECURE)
        assert "domain=" not in set_cookie.lower() and "Path=/" in set_cookie
        value = reply.cookies[name]
        client.cookies.clear()
        assert (await client.get("/v1/jobs", headers=cookie(value, name))).status_code == 200
        other = PLAIN if name == SECURE else SECURE
        assert_error(await client.get("/v1/jobs", headers=cookie(value, other)), 401)
        token = (await client.get("/v1/session", headers=cookie(value, name))).json()
        out = await client.delete("/v1/session", headers={**cookie(value, name),
                                                          "X-CSRF-Token": token["csrf_token"]})
        assert f'{name}=""' in out.headers["set-cookie"]
