"""Every Redis key name, pinned, and the hash tags that keep multi-key commands on one slot."""

import hashlib

import pytest

from pipeline.jobs.record import new_job_id
from pipeline.keys import GROUP, LANES, Keys, model_slug

JOB = "0123456789abcdef0123456789abcdef"
MODEL = "all-MiniLM-L6-v2"
SLUG = "all-MiniLM-L6-v2-" + hashlib.sha1(MODEL.encode()).hexdigest()[:8]


def crc16_xmodem(data: bytes) -> int:
    """CRC16-CCITT (XMODEM), the checksum Redis Cluster hashes keys with."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def key_slot(key: str) -> int:
    """The cluster slot of a key, honouring a non-empty `{hash tag}`."""
    raw = key.encode()
    start = raw.find(b"{")
    if start != -1:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1:end]
    return crc16_xmodem(raw) % 16384


def test_slot_function_agrees_with_redis_cluster_reference_values() -> None:
    assert crc16_xmodem(b"123456789") == 0x31C3
    assert key_slot("foo") == 12182
    assert key_slot("somekey") == 11058
    assert key_slot("{user1000}.following") == key_slot("{user1000}.followers")


def test_every_key_name_is_pinned() -> None:
    keys = Keys("es")
    assert keys.job(JOB) == f"es:{{{JOB}}}:job"
    assert keys.inputs(JOB) == f"es:{{{JOB}}}:inputs"
    assert keys.vectors(JOB) == f"es:{{{JOB}}}:vectors"
    assert keys.events(JOB) == f"es:{{{JOB}}}:events"
    assert keys.job_keys(JOB) == (
        f"es:{{{JOB}}}:job", f"es:{{{JOB}}}:inputs", f"es:{{{JOB}}}:vectors",
        f"es:{{{JOB}}}:events",
    )
    assert keys.attempt(JOB, 7) == f"es:{{{JOB}}}:attempt:7"
    assert keys.queue(MODEL, "fast") == f"es:{{q:{SLUG}}}:fast"
    assert keys.queue(MODEL, "bulk") == f"es:{{q:{SLUG}}}:bulk"
    assert keys.queues(MODEL) == (f"es:{{q:{SLUG}}}:fast", f"es:{{q:{SLUG}}}:bulk")
    assert keys.feed == "es:feed"
    assert keys.workers == "es:workers"
    assert keys.heartbeat("host-1-abc") == "es:worker:host-1-abc"
    assert keys.models == "es:models"
    assert keys.metrics == "es:metrics"
    assert keys.calibration(MODEL) == f"es:calibration:{SLUG}"
    assert keys.calibration_lock(MODEL) == f"es:calibrating:{SLUG}"
    digest = hashlib.sha256(b"owner\0retry-1").hexdigest()[:32]
    assert keys.idempotency("owner", "retry-1") == f"es:idem:{digest}"
    assert keys.texts_counter == "es:stats:texts"
    assert keys.job_index(None) == "es:jobs"
    assert keys.job_index("0123abcd0123abcd") == "es:jobs:0123abcd0123abcd"
    assert keys.job_index("") == "es:jobs:-"
    session = hashlib.sha256(b"s3cret").hexdigest()[:32]
    assert keys.session("s3cret") == f"es:session:{session}"
    assert keys.sessions("0123abcd0123abcd") == "es:sessions:0123abcd0123abcd"
    assert keys.active_jobs == "es:janitor:jobs"
    assert keys.owner_jobs("0123abcd0123abcd") == "es:active:0123abcd0123abcd"
    assert GROUP == "workers"
    assert LANES == ("fast", "bulk")


def test_the_prefix_leads_every_key() -> None:
    keys = Keys("tenant7")
    names = [*keys.job_keys(JOB), *keys.queues(MODEL), keys.feed, keys.workers,
             keys.heartbeat("w"), keys.models, keys.idempotency("", "k"), keys.texts_counter,
             keys.calibration(MODEL), keys.calibration_lock(MODEL), keys.job_index(None),
             keys.job_index("o"), keys.session("s"), keys.sessions("o")]
    assert all(name.startswith("tenant7:") for name in names)


def test_all_keys_of_one_job_hash_to_one_slot() -> None:
    for job_id in (JOB, new_job_id(), new_job_id()):
        job_keys = (*Keys("es").job_keys(job_id), Keys("es").attempt(job_id, 3))
        assert all(f"{{{job_id}}}" in key for key in job_keys)
        assert len({key_slot(key) for key in job_keys}) == 1


def test_different_jobs_use_different_hash_tags() -> None:
    keys = Keys("es")
    assert keys.job(new_job_id()) != keys.job(new_job_id())
    tags = {keys.job(job_id).split("}")[0] for job_id in (JOB, "f" * 32)}
    assert len(tags) == 2


@pytest.mark.parametrize("model", [MODEL, "sentence-transformers/all-mpnet-base-v2",
                                   "/models/my model {v2}", "é" * 80])
def test_both_lanes_of_a_model_share_one_hash_tag(model: str) -> None:
    fast, bulk = Keys("es").queues(model)
    tag = f"{{q:{model_slug(model)}}}"
    assert fast == f"es:{tag}:fast" and bulk == f"es:{tag}:bulk"
    assert key_slot(fast) == key_slot(bulk)


def test_model_slugs_are_key_safe_short_and_distinct() -> None:
    awkward = ["/models/my model {v2}", "a:b", "a_b", "x" * 500, "モデル"]
    slugs = [model_slug(name) for name in awkward]
    assert len(set(slugs)) == len(slugs)
    for slug in slugs:
        assert not set(slug) & set("{}: ")
        assert len(slug) <= 48 + 1 + 8
    assert model_slug(MODEL) == model_slug(MODEL)


def test_jobs_spread_over_every_third_of_the_slots() -> None:
    # A three-primary cluster gives each node a third of the slots (tests/support/cluster.py).
    thirds = {key_slot(Keys("es").job(new_job_id())) * 3 // 16384 for _ in range(60)}
    assert thirds == {0, 1, 2}


def test_keys_shared_across_jobs_have_slots_of_their_own() -> None:
    # No key of one job shares a slot with a global key by design, so no script
    # can be written that needs both; these pin which keys are single-slot.
    keys = Keys("es")
    job_slot = key_slot(keys.job(JOB))
    shared = [*keys.queues(MODEL), keys.feed, keys.workers, keys.models,
              keys.heartbeat("w"), keys.idempotency("", "k"), keys.texts_counter,
              keys.active_jobs]
    assert job_slot not in {key_slot(name) for name in shared}
    assert key_slot(keys.queue(MODEL, "fast")) == key_slot(keys.queue(MODEL, "bulk"))


def test_cache_keys_are_pinned_and_spread_over_slots() -> None:
    keys = Keys("es")
    assert keys.cache_entry("fp1", "ab12") == "es:cache:fp1:ab12"
    assert keys.cache_index == "es:cache:index"
    assert keys.reply("ab" * 16) == f"es:{{r:{'ab' * 16}}}:reply"
    entries = [keys.cache_entry("fp1", f"{i:032x}") for i in range(64)]
    assert not any("{" in name for name in entries)
    assert len({key_slot(name) for name in entries}) > 32
