"""The Python client: `Client` and `AsyncClient`, with `Job` and `AsyncJob`.

    from embedstream import Client
    client = Client()                       # EMBEDSTREAM_URL, first of EMBEDSTREAM_API_KEYS
    vectors = client.embed(["a cat", "a dog"])          # numpy, one row a text
    job = client.submit(open("lines.txt"))              # an iterable is streamed as NDJSON
    for result in job.results():                        # as they are made, each exactly once
        ...
    job = client.submit(docs, chunk=True, chunk_output="chunks")
    for result in job.results():                        # result.chunks: Chunk(start, end,
        ...                                             # tokens, embedding) each

`Job.stream()` is the primitive under `results()`: it follows the job's SSE
events and reconnects by itself (with `Last-Event-ID`) after a dropped
connection, a server restart or a transient 5xx, for up to
`reconnect_for_s` seconds without progress. The server guarantees no gap and
no duplicate across a resume; the client also drops any index it has already
yielded, so `results()` is exactly once even against a misbehaving proxy.
Each `Update` carries the cursor after it, which is what a caller that
persists its own progress (the `submit` command) saves.

Blank inputs: a list (or tuple) is sent as it is, one input an item, so a
blank string in it is refused (`422 invalid_input`) rather than dropped, and
`embed()` keeps one row a text. Any other iterable is streamed as NDJSON, a
file's lines as a rule, and a blank string in it is a blank line, not an
input: it is skipped, as `embedstream submit` skips a file's blank lines, and
the indexes count the inputs sent.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import numpy as np

from embedstream.protocol import (
    STREAM_READ_TIMEOUT_S,
    TERMINAL,
    Backoff,
    EmbedstreamError,
    EventParser,
    JobStatus,
    Progress,
    Result,
    Seen,
    ServerEvent,
    body_options,
    decode_result,
    default_api_key,
    default_url,
    headers_for,
    ndjson_apieces,
    ndjson_pieces,
    query_options,
    raise_for_error,
    retryable,
    unreachable,
)

TIMEOUT = httpx.Timeout(30.0, read=STREAM_READ_TIMEOUT_S)


@dataclass
class Update:
    """One step of a job's stream: new results, progress, or the end (with its status)."""

    cursor: str | None
    results: list[Result] = field(default_factory=list)
    progress: Progress | None = None
    end: JobStatus | None = None


@dataclass(frozen=True)
class _SubmitRequest:
    """POST /v1/jobs for some inputs: a JSON body for a list, else NDJSON with query options."""

    headers: dict[str, str]
    body: dict[str, object] | None = None
    params: dict[str, str] | None = None


def _update(event: ServerEvent, seen: Seen) -> Update | None:
    if event.event == "result":
        rows = [decode_result(row) for row in event.data]
        return Update(event.id, [r for r in rows if seen.add(r.index)])
    if event.event == "progress":
        return Update(event.id, progress=event.data)
    if event.event == "end":
        return Update(event.id, end=event.data)
    return None


def _matrix(results: list[Result]) -> np.ndarray[Any, np.dtype[np.float32]]:
    failed = [r for r in results if r.embedding is None]
    if failed:
        raise EmbedstreamError(f"{len(failed)} inputs could not be embedded; input "
                               f"{failed[0].index}: {failed[0].error}", code="input_failed")
    results.sort(key=lambda r: r.index)
    return np.vstack([r.embedding for r in results if r.embedding is not None])


class _Base:
    def __init__(self, url: str | None, api_key: str | None, reconnect_for_s: float) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.api_key = api_key if api_key is not None else default_api_key()
        self.reconnect_for_s = reconnect_for_s

    def _submit_request(
        self, inputs: object, idempotency_key: str | None, options: Mapping[str, object]
    ) -> _SubmitRequest:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        if isinstance(inputs, list | tuple):
            return _SubmitRequest(headers, {"inputs": list(inputs), **body_options(options)})
        return _SubmitRequest({**headers, "Content-Type": "application/x-ndjson"},
                              params=query_options(options))


class Client(_Base):
    """A synchronous client of one embedstream server."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 reconnect_for_s: float = 300.0, http: httpx.Client | None = None) -> None:
        super().__init__(url, api_key, reconnect_for_s)
        self.http = http or httpx.Client(base_url=self.url, headers=headers_for(self.api_key),
                                         timeout=TIMEOUT)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connections."""
        self.http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer, or EmbedstreamError/ServerUnreachable."""
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        raise_for_error(response)
        return response.json()

    def submit(self, inputs: Iterable[Any], *, idempotency_key: str | None = None,
               **options: Any) -> Job:
        """Queue a job; a list is sent as JSON (a blank text in it is refused), any other
        iterable streamed as NDJSON (its blank strings, a file's blank lines, skipped)."""
        request = self._submit_request(inputs, idempotency_key, options)
        if request.body is not None:
            reply = self.request("POST", "/v1/jobs", json=request.body,
                                 headers=request.headers)
        else:
            reply = self.request("POST", "/v1/jobs", content=ndjson_pieces(inputs),
                                 params=request.params, headers=request.headers)
        return Job(self, reply["id"], int(reply["total"]))

    def job(self, job_id: str) -> Job:
        """The Job of an existing id (its status is checked)."""
        status = self.request("GET", f"/v1/jobs/{job_id}")
        return Job(self, job_id, int(status["total"]))

    def embed(self, texts: Iterable[str], **options: Any) -> np.ndarray[Any, np.dtype[Any]]:
        """Embed texts through the queue; a float32 array, one row a text, in order.

        The texts are sent as a list, so a blank one is refused, never dropped."""
        job = self.submit(list(texts), **options)
        return _matrix(list(job.results()))


class Job:
    """A job on the server: its id, status, results; cancel or wait for it."""

    def __init__(self, client: Client, job_id: str, total: int | None = None) -> None:
        self.client = client
        self.id = job_id
        self.total = total

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def status(self) -> JobStatus:
        """The job's status object (`status`, `done`, `failed`, `total`, …)."""
        status: JobStatus = self.client.request("GET", f"/v1/jobs/{self.id}")
        return status

    def cancel(self) -> JobStatus:
        """Cancel the job; results already made stay readable."""
        status: JobStatus = self.client.request("DELETE", f"/v1/jobs/{self.id}")
        return status

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.5) -> JobStatus:
        """Block until the job ends; its final status (TimeoutError past `timeout_s`)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status()
            if status["status"] in TERMINAL:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {status['status']} after {timeout_s}s")
            time.sleep(poll_s)

    def results(self, *, after: str | None = None) -> Iterator[Result]:
        """Results as they are made, each exactly once, resuming after dropped connections."""
        for update in self.stream(after=after):
            yield from update.results

    def stream(self, *, after: str | None = None) -> Iterator[Update]:
        """Results, progress and the end, reconnecting with Last-Event-ID as needed."""
        cursor, seen = after, Seen()
        backoff = Backoff(self.client.reconnect_for_s)
        delays = backoff.delays()
        while True:
            try:
                for event in self._events(cursor):
                    update = _update(event, seen)
                    if update is None:
                        continue
                    cursor = update.cursor
                    backoff.reset()
                    yield update
                    if update.end is not None:
                        return
                raise httpx.RemoteProtocolError("the event stream closed before its end")
            except (httpx.TransportError, EmbedstreamError) as exc:
                if not retryable(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise unreachable(self.client.url, exc) from exc
                time.sleep(delay)

    def _events(self, cursor: str | None) -> Iterator[ServerEvent]:
        headers = {"Last-Event-ID": cursor} if cursor else {}
        with self.client.http.stream("GET", f"/v1/jobs/{self.id}/events",
                                     params={"encoding": "base64"}, headers=headers) as response:
            if not response.is_success:
                response.read()
                raise_for_error(response)
            parser = EventParser()
            for line in response.iter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event


class AsyncClient(_Base):
    """The same API as Client, awaitable."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *,
                 reconnect_for_s: float = 300.0, http: httpx.AsyncClient | None = None) -> None:
        super().__init__(url, api_key, reconnect_for_s)
        self.http = http or httpx.AsyncClient(base_url=self.url,
                                              headers=headers_for(self.api_key),
                                              timeout=TIMEOUT)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self.http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """One API call; the decoded JSON answer, or EmbedstreamError/ServerUnreachable."""
        try:
            response = await self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.url, exc) from exc
        raise_for_error(response)
        return response.json()

    async def submit(self, inputs: Iterable[Any] | AsyncIterable[Any], *,
                     idempotency_key: str | None = None, **options: Any) -> AsyncJob:
        """Queue a job; a list is sent as JSON (a blank text in it is refused), any other
        iterable streamed as NDJSON (its blank strings, a file's blank lines, skipped)."""
        request = self._submit_request(inputs, idempotency_key, options)
        if request.body is not None:
            reply = await self.request("POST", "/v1/jobs", json=request.body,
                                       headers=request.headers)
        else:
            reply = await self.request("POST", "/v1/jobs", content=ndjson_apieces(inputs),
                                       params=request.params, headers=request.headers)
        return AsyncJob(self, reply["id"], int(reply["total"]))

    async def job(self, job_id: str) -> AsyncJob:
        """The AsyncJob of an existing id (its status is checked)."""
        status = await self.request("GET", f"/v1/jobs/{job_id}")
        return AsyncJob(self, job_id, int(status["total"]))

    async def embed(self, texts: Iterable[str], **options: Any) -> np.ndarray[Any, np.dtype[Any]]:
        """Embed texts through the queue; a float32 array, one row a text, in order.

        The texts are sent as a list, so a blank one is refused, never dropped."""
        job = await self.submit(list(texts), **options)
        return _matrix([r async for r in job.results()])


class AsyncJob:
    """A job on the server, awaitable: the same methods as Job."""

    def __init__(self, client: AsyncClient, job_id: str, total: int | None = None) -> None:
        self.client = client
        self.id = job_id
        self.total = total

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"

    async def status(self) -> JobStatus:
        """The job's status object."""
        status: JobStatus = await self.client.request("GET", f"/v1/jobs/{self.id}")
        return status

    async def cancel(self) -> JobStatus:
        """Cancel the job; results already made stay readable."""
        status: JobStatus = await self.client.request("DELETE", f"/v1/jobs/{self.id}")
        return status

    async def wait(self, timeout_s: float | None = None, poll_s: float = 0.5) -> JobStatus:
        """Wait until the job ends; its final status (TimeoutError past `timeout_s`)."""
        with anyio.fail_after(timeout_s):
            while True:
                status = await self.status()
                if status["status"] in TERMINAL:
                    return status
                await anyio.sleep(poll_s)

    async def results(self, *, after: str | None = None) -> AsyncIterator[Result]:
        """Results as they are made, each exactly once, resuming after dropped connections."""
        async for update in self.stream(after=after):
            for result in update.results:
                yield result

    async def stream(self, *, after: str | None = None) -> AsyncIterator[Update]:
        """Results, progress and the end, reconnecting with Last-Event-ID as needed."""
        cursor, seen = after, Seen()
        backoff = Backoff(self.client.reconnect_for_s)
        delays = backoff.delays()
        while True:
            try:
                async for event in self._events(cursor):
                    update = _update(event, seen)
                    if update is None:
                        continue
                    cursor = update.cursor
                    backoff.reset()
                    yield update
                    if update.end is not None:
                        return
                raise httpx.RemoteProtocolError("the event stream closed before its end")
            except (httpx.TransportError, EmbedstreamError) as exc:
                if not retryable(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise unreachable(self.client.url, exc) from exc
                await anyio.sleep(delay)

    async def _events(self, cursor: str | None) -> AsyncIterator[ServerEvent]:
        headers = {"Last-Event-ID": cursor} if cursor else {}
        async with self.client.http.stream("GET", f"/v1/jobs/{self.id}/events",
                                           params={"encoding": "base64"},
                                           headers=headers) as response:
            if not response.is_success:
                await response.aread()
                raise_for_error(response)
            parser = EventParser()
            async for line in response.aiter_lines():
                event = parser.feed(line)
                if event is not None:
                    yield event
