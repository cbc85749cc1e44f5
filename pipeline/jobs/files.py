"""Files: what a client uploads for a batch (`POST /v1/files`), kept in Redis in bounded parts.

Every server replica reads them, so they live in Redis, not on a disk: a
file's description in `keys.file(id)` and its bytes in `keys.file_parts(id)`
(part number -> at most `PART_BYTES`), both under the hash tag `{<file id>}`.
An upload is written a part at a time as it is read, so a 20 MB file never
sits whole in the server's memory, and read back the same way
(`Files.parts`, `Files.lines`).

The steps of an upload, each safe to die after:

1. the description is written as `uploading` with `staging_ttl_s` (readers
   are told the file does not exist);
2. each part first reserves its bytes in the owner's file list
   (`keys.files(owner)`, file id -> "<created ms> <bytes>", one script that
   checks the per-key quota: `KEY_QUOTA_BYTES` and `MAX_FILES_PER_KEY`), then
   is written with the description's TTL refreshed;
3. one script makes the file `uploaded` and gives both keys `FILE_TTL_S`,
   only if the description is still there.

An uploader that dies leaves keys that expire by themselves and a list entry
whose file is gone: entries are pruned (their file's description is gone)
before each upload and each listing. The description is written before the
list entry, so pruning never drops a live upload's reservation.

Files are owned like jobs: another key is told a file does not exist.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.errors import InvalidCursor, InvalidRequest, NotFound, PayloadTooLarge, Unavailable
from pipeline.jobs.submitter import shielded
from pipeline.jobs.tenants import Caller, visible
from pipeline.store.connections import outage_is_unavailable, redis_outage, text_of

if TYPE_CHECKING:
    from pipeline.keys import Keys
    from pipeline.settings import Settings
    from pipeline.store.connections import RedisClient

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
PURPOSES = ("batch",)
PART_BYTES = 1024 * 1024
MAX_FILE_BYTES = 200 * 1024 * 1024  # OpenAI's limit for a batch input file
KEY_QUOTA_BYTES = 1024 * 1024 * 1024  # every stored file of one API key, together
MAX_FILES_PER_KEY = 1000
FILE_TTL_S = 7 * 24 * 3600
MAX_FILENAME_CHARS = 255
UPLOADING = "uploading"
UPLOADED = "uploaded"

# KEYS: owner's file list.  ARGV: file id, created ms, bytes to add, quota bytes, max files, ttl.
_RESERVE = """
local entries = redis.call('HGETALL', KEYS[1])
local mine = redis.call('HGET', KEYS[1], ARGV[1])
if not mine and #entries / 2 >= tonumber(ARGV[5]) then return {'files', #entries / 2} end
local total = 0
for i = 2, #entries, 2 do
  total = total + tonumber(string.sub(entries[i], string.find(entries[i], ' ') + 1))
end
if total + tonumber(ARGV[3]) > tonumber(ARGV[4]) then return {'bytes', total} end
local size = tonumber(ARGV[3])
if mine then size = size + tonumber(string.sub(mine, string.find(mine, ' ') + 1)) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. size)
redis.call('EXPIRE', KEYS[1], ARGV[6])
return {'ok', total}
"""

# KEYS: file, parts.  ARGV: bytes, parts, ttl.  0: the upload's keys expired meanwhile.
_FINISH = f"""
if redis.call('HGET', KEYS[1], 'status') ~= '{UPLOADING}' then return 0 end
redis.call('HSET', KEYS[1], 'status', '{UPLOADED}', 'bytes', ARGV[1], 'parts', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
if tonumber(ARGV[2]) > 0 then redis.call('EXPIRE', KEYS[2], ARGV[3]) end
return 1
"""


@dataclass(frozen=True)
class StoredFile:
    """An uploaded file's description (its bytes are read with `Files.parts`)."""

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    parts: int
    created_at: int  # Unix seconds
    expires_at: int


@dataclass(frozen=True)
class FilePage:
    """One page of a key's files, in the order asked for."""

    files: list[StoredFile]
    has_more: bool


def new_file_id() -> str:
    """A fresh, unguessable file id in OpenAI's shape."""
    return f"file-{uuid.uuid4().hex}"


def check_purpose(purpose: object) -> str:
    """The only purpose embedstream keeps files for is `batch`."""
    if purpose not in PURPOSES:
        raise InvalidRequest(f"'purpose' must be one of {', '.join(PURPOSES)} (files are kept "
                             f"for the Batch API only); got {str(purpose)[:40]!r}")
    return str(purpose)


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"file {file_id[:80]!r} does not exist or has expired")


class Files:
    """Upload, describe, list, read and delete one Redis's files."""

    def __init__(self, redis: RedisClient, keys: Keys, settings: Settings) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self._reserve = redis.register_script(_RESERVE)
        self._finish = redis.register_script(_FINISH)

    @outage_is_unavailable
    async def upload(self, owner: str, filename: str, purpose: str,
                     source: AsyncIterable[bytes]) -> StoredFile:
        """Store `source` a part at a time; the file, once wholly written (see the module)."""
        purpose = check_purpose(purpose)
        file_id = new_file_id()
        created = time.time()
        await self._prune(owner)
        filename = filename[:MAX_FILENAME_CHARS] or "file"
        async with self.redis.pipeline(transaction=True) as pipe:  # never a key without a TTL
            fields: dict[str, str | int] = {
                "id": file_id, "owner": owner, "filename": filename, "purpose": purpose,
                "created_at": int(created), "status": UPLOADING}
            for name, value in fields.items():
                pipe.hset(self.keys.file(file_id), name, value)
            pipe.expire(self.keys.file(file_id), self.settings.staging_ttl_s)
            await pipe.execute()
        try:
            size, parts = await self._write_parts(owner, file_id, int(created * 1000), source)
            if not await self._finish(keys=[self.keys.file(file_id), self.keys.file_parts(file_id)],
                                      args=[size, parts, FILE_TTL_S]):
                raise Unavailable("the upload stalled for longer than its staging time "
                                  f"({self.settings.staging_ttl_s} s) allows; upload it again")
        except BaseException:
            await shielded(self._drop(owner, file_id))
            raise
        return StoredFile(file_id, owner, filename, purpose, size, parts, int(created),
                          int(created) + FILE_TTL_S)

    async def _write_parts(self, owner: str, file_id: str, created_ms: int,
                           source: AsyncIterable[bytes]) -> tuple[int, int]:
        """Write `source` in parts of `PART_BYTES`; (bytes, parts) written."""
        buffer = bytearray()
        size = parts = 0
        async for piece in source:
            buffer += piece
            if size + len(buffer) > MAX_FILE_BYTES:
                raise PayloadTooLarge(f"a file is limited to {MAX_FILE_BYTES} bytes")
            while len(buffer) >= PART_BYTES:
                part = bytes(buffer[:PART_BYTES])
                await self._write_part(owner, file_id, created_ms, parts, part)
                del buffer[:PART_BYTES]
                size, parts = size + PART_BYTES, parts + 1
        if buffer:
            await self._write_part(owner, file_id, created_ms, parts, bytes(buffer))
            size, parts = size + len(buffer), parts + 1
        if size == 0:
            raise InvalidRequest("the uploaded file is empty")
        return size, parts

    async def _write_part(self, owner: str, file_id: str, created_ms: int, number: int,
                          data: bytes) -> None:
        """Reserve the part's bytes against the key's quota, then write it."""
        reply = await self._reserve(keys=[self.keys.files(owner)], args=[
            file_id, created_ms, len(data), KEY_QUOTA_BYTES, MAX_FILES_PER_KEY, FILE_TTL_S])
        outcome = text_of(reply[0])
        if outcome == "files":
            raise PayloadTooLarge(f"this API key already keeps {MAX_FILES_PER_KEY} files; "
                                  "delete some (DELETE /v1/files/{id}) before uploading more")
        if outcome == "bytes":
            raise PayloadTooLarge(f"this API key's files may hold {KEY_QUOTA_BYTES} bytes "
                                  "together; delete some (DELETE /v1/files/{id}) first")
        ttl = self.settings.staging_ttl_s
        async with self.redis.pipeline(transaction=True) as pipe:  # one slot: the file's
            pipe.hset(self.keys.file_parts(file_id), str(number), data)
            pipe.expire(self.keys.file_parts(file_id), ttl)
            pipe.expire(self.keys.file(file_id), ttl)
            await pipe.execute()

    async def _drop(self, owner: str, file_id: str) -> None:
        """Delete a file's keys, then its list entry (a reader prunes one left behind)."""
        with redis_outage():
            await self.redis.delete(self.keys.file(file_id), self.keys.file_parts(file_id))
            await self.redis.hdel(self.keys.files(owner), file_id)

    @outage_is_unavailable
    async def get(self, file_id: str, caller: Caller) -> StoredFile:
        """The file `caller` may see; NotFound for a malformed id, another key's, an expired one."""
        if not FILE_ID.fullmatch(file_id):
            raise _not_found(file_id)
        raw = await self.redis.hgetall(self.keys.file(file_id))
        stored = _parse(raw) if raw else None
        if stored is None or not visible(stored.owner, caller):
            raise _not_found(file_id)
        return stored

    @outage_is_unavailable
    async def delete(self, file_id: str, caller: Caller) -> None:
        """Delete a file `caller` may see (a batch made from it keeps running)."""
        stored = await self.get(file_id, caller)
        await self._drop(stored.owner, stored.id)

    @outage_is_unavailable
    async def list(self, caller: Caller, *, after: str | None = None, limit: int = 10_000,
                   order: str = "desc", purpose: str | None = None) -> FilePage:
        """The caller's own files by creation time, one page after the file id `after`."""
        entries = await self._prune(caller.owner)
        ids = [file_id for file_id, _ in sorted(entries.items(), key=lambda e: (e[1], e[0]),
                                                reverse=order == "desc")]
        if after:
            if after not in ids:
                raise InvalidCursor(f"'after' names no file of this key: {after[:80]!r}")
            ids = ids[ids.index(after) + 1:]
        files: list[StoredFile] = []
        for file_id in ids:
            try:
                stored = await self.get(file_id, caller)
            except NotFound:  # still uploading, or expired since the prune
                continue
            if purpose is None or stored.purpose == purpose:
                files.append(stored)
            if len(files) > limit:
                break
        return FilePage(files[:limit], len(files) > limit)

    async def _prune(self, owner: str) -> dict[str, int]:
        """The owner's file list (id -> created ms), less the entries whose file is gone."""
        raw = await self.redis.hgetall(self.keys.files(owner))
        entries = {text_of(k): int(text_of(v).split(" ")[0]) for k, v in raw.items()}
        if not entries:
            return entries
        async with self.redis.pipeline(transaction=False) as pipe:
            for file_id in entries:
                pipe.exists(self.keys.file(file_id))
            exists = await pipe.execute()
        gone = [file_id for file_id, alive in zip(entries, exists, strict=True) if not alive]
        if gone:
            await self.redis.hdel(self.keys.files(owner), *gone)
        return {k: v for k, v in entries.items() if k not in gone}

    async def parts(self, stored: StoredFile) -> AsyncIterator[bytes]:
        """The file's bytes, one part at a time (NotFound if it is deleted meanwhile)."""
        for number in range(stored.parts):
            with redis_outage():
                data = await self.redis.hget(self.keys.file_parts(stored.id), str(number))
            if data is None:
                raise NotFound(f"file {stored.id} was deleted or expired while it was read")
            yield data

    async def lines(self, stored: StoredFile, max_line_bytes: int
                    ) -> AsyncIterator[tuple[int, bytes | None]]:
        """(line number, line without its newline) of every line; None for one over
        `max_line_bytes`, which is skipped rather than held."""
        pending = bytearray()
        number = 0
        oversized = False
        async for part in self.parts(stored):
            start = 0
            while (end := part.find(b"\n", start)) != -1:
                number += 1
                oversized = oversized or len(pending) + end - start > max_line_bytes
                yield number, None if oversized else bytes(pending + part[start:end])
                pending.clear()
                oversized = False
                start = end + 1
            if not oversized and len(pending) + len(part) - start > max_line_bytes:
                oversized = True
                pending.clear()
            elif not oversized:
                pending += part[start:]
        if pending or oversized:
            yield number + 1, None if oversized else bytes(pending)


def _parse(raw: dict[bytes, bytes]) -> StoredFile | None:
    """A file's description from its hash; None while it is still being uploaded."""
    f = {text_of(k): text_of(v) for k, v in raw.items()}
    if f.get("status") != UPLOADED:
        return None
    created = int(f["created_at"])
    return StoredFile(f["id"], f["owner"], f["filename"], f["purpose"], int(f["bytes"]),
                      int(f["parts"]), created, created + FILE_TTL_S)
