"""The Python client: upload a file in parallel chunks, with retries, resume and verification.

    from chunkserver.client.uploader import upload_file
    result = upload_file("big.iso", "http://127.0.0.1:8000", chunk_size=4 * 2**20)

`upload_file_async` is the async API; `upload_file` runs it in a fresh event loop. Each chunk
is read from disk when it is sent, so memory holds at most `concurrency` chunks whatever the
file size. Each chunk's CRC-64/NVME is computed from that same read and sent with it
(`chunk_crc64nvme`, checked by the server); the file's CRC is combined from the chunks' and
checked against the server's `crc64nvme` at the end. Chunks not sent (a resume) are read once
for their CRC. When the server also answers `sha256` (its `checksums` hold "sha256"), the file
is read once more to check that too.

Retries: connection errors, timeouts, 408, 429, 5xx and 507 are retried up to `retries`
times per chunk, waiting `min(backoff_cap, backoff_base * 2**attempt)` seconds times a random
factor in [0.5, 1] (capped exponential backoff with jitter), or the server's Retry-After.
Any other 4xx fails at once with the server's `detail`; an answer that is not chunkserver's
(not its JSON: a wrong URL, another server) fails at once, naming the URL and what came back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .. import checksums
from ..backoff import jittered_delay
from .rules import UploadError, answer_of, check_file_id

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
# A bearer credential, or a function that returns a fresh one before each request.
Token = str | Callable[[], str] | None
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504, 507})
# How long the client waits for the server to complete an upload whose chunks are all stored.
COMPLETION_WAIT_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Progress:
    """What the progress callback is told after each acknowledged chunk."""

    file_id: str
    bytes_done: int
    total_bytes: int
    chunks_done: int
    total_chunks: int
    elapsed: float

    @property
    def fraction(self) -> float:
        return self.bytes_done / self.total_bytes if self.total_bytes else 1.0


ProgressCallback = Callable[[Progress], None]


@dataclass(slots=True)
class Backoff:
    """Capped exponential backoff with jitter; `sleep` is replaceable for tests."""

    base: float = 0.25
    cap: float = 10.0
    sleep: Callable[[float], Any] = asyncio.sleep

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        if retry_after is not None:
            return min(self.cap, retry_after)
        return jittered_delay(attempt, base=self.base, cap=self.cap, least_fraction=0.5)


def crc64nvme_of_range(path: Path, offset: int, length: int) -> int:
    """The CRC-64/NVME of `length` bytes of the file from `offset`."""
    crc = 0
    with open(path, "rb") as f:
        f.seek(offset)
        while length > 0:
            block = f.read(min(length, 4 * 1024 * 1024))
            if not block:
                raise UploadError(f"{path} changed size while it was being uploaded")
            crc = checksums.crc64nvme(block, crc)
            length -= len(block)
    return crc


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * 1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


def _multipart(fields: dict[str, str], data: bytes, boundary: str) -> tuple[list[bytes], int]:
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    )
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="chunk"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    parts = [head.encode(), data, f"\r\n--{boundary}--\r\n".encode()]
    return parts, sum(len(p) for p in parts)


async def _stream(parts: list[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class Uploader:
    """One file's upload: plan, send the missing chunks in parallel, verify."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        path: Path,
        *,
        chunk_size: int,
        concurrency: int,
        file_id: str | None,
        retries: int,
        token: Token,
        progress: ProgressCallback | None,
        backoff: Backoff,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.session = session
        self.url = url.rstrip("/")
        self.path = path
        self.size = path.stat().st_size
        self.chunk_size = chunk_size
        self.total_chunks = max(1, -(-self.size // chunk_size))
        self.concurrency = concurrency
        self.file_id = check_file_id(file_id) if file_id else str(uuid.uuid4())
        self.retries = retries
        self.token = token
        self.progress = progress
        self.backoff = backoff
        self.metadata = metadata
        self.chunk_crcs: dict[int, int] = {}
        self.completed: dict[str, Any] | None = None
        self.started = time.monotonic()
        self.bytes_done = 0
        self.chunks_done = 0
        self.requests_sent = 0

    def _auth(self) -> dict[str, str]:
        """The Authorization header of the next request: the token, or what the token's
        callback returns now (a short-lived JWT the application renews)."""
        token = self.token() if callable(self.token) else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def _chunk_length(self, index: int) -> int:
        return min(self.chunk_size, self.size - index * self.chunk_size)

    async def status(self) -> dict[str, Any]:
        """The upload's status (404 included), asked again like a chunk while the server
        cannot be reached or answers a retryable status."""
        url = f"{self.url}/upload-status/{self.file_id}"
        return await self._retried(
            "status check", lambda: self.session.get(url, headers=self._auth()), (200, 404)
        )

    async def _retried(
        self,
        what: str,
        send: Callable[[], AbstractAsyncContextManager[aiohttp.ClientResponse]],
        done: tuple[int, ...],
    ) -> dict[str, Any]:
        """The JSON answer of `send()` once its status is in `done`; connection errors,
        timeouts and RETRYABLE_STATUSES are retried up to `retries` times with backoff (or
        the server's Retry-After); another status raises UploadError with its detail."""
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with send() as response:
                    body = await response.read()
                    if response.status not in RETRYABLE_STATUSES:
                        return answer_of(what, str(response.url), response.status, body, done)
                    problem = f"{what}: HTTP {response.status}: {body[:200]!r}"
                    retry_after = _retry_after(response.headers.get("Retry-After"))
            except (TimeoutError, aiohttp.ClientError) as e:
                problem = f"{what}: {type(e).__name__}: {e}"
            if attempt >= self.retries:
                raise UploadError(f"giving up after {attempt + 1} attempts: {problem}")
            await self.backoff.sleep(self.backoff.delay(attempt, retry_after))
            attempt += 1

    async def completion(self) -> dict[str, Any]:
        """The completed status once every chunk is stored. A completion that another server
        is running (or that one which died left to be taken over, which takes up to 30 s)
        reads as uploading with no missing chunk meanwhile: ask again, with backoff, for up
        to COMPLETION_WAIT_SECONDS."""
        deadline = time.monotonic() + COMPLETION_WAIT_SECONDS
        attempt = 0
        while True:
            status = await self.status()
            if status.get("status") == "completed" or status.get("missing_chunks") != []:
                return status
            if time.monotonic() > deadline:
                return status
            await self.backoff.sleep(self.backoff.delay(attempt))
            attempt += 1

    async def run(self) -> dict[str, Any]:
        missing = list(range(self.total_chunks))
        status = await self.status()
        if status["status"] == "completed":
            self.completed = status
            missing = []
        elif status["status"] == "uploading":
            if status.get("total_chunks", self.total_chunks) != self.total_chunks:
                raise UploadError(
                    f"the server's upload {self.file_id} has {status['total_chunks']} chunks, "
                    f"this file in chunks of {self.chunk_size} bytes has {self.total_chunks}; "
                    "use the chunk size of the first attempt"
                )
            missing = list(status.get("missing_chunks", missing))
        to_send = set(missing)
        already = [i for i in range(self.total_chunks) if i not in to_send]
        self.chunks_done = len(already)
        self.bytes_done = sum(self._chunk_length(i) for i in already)
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in missing:
            queue.put_nowait(index)
        workers = [asyncio.create_task(self._worker(queue)) for _ in range(self.concurrency)]
        try:
            await asyncio.gather(*workers)
        finally:
            for worker in workers:
                worker.cancel()
        for index in already:  # not sent now, so not read now: read them for their CRC
            self.chunk_crcs[index] = await asyncio.to_thread(
                crc64nvme_of_range, self.path, index * self.chunk_size, self._chunk_length(index)
            )
        local_crc = checksums.to_s3(
            checksums.combine(
                (self.chunk_crcs[i], self._chunk_length(i)) for i in range(self.total_chunks)
            )
        )
        if self.completed is None:
            self.completed = await self.completion()
        if self.completed.get("status") != "completed":
            raise UploadError(f"every chunk was sent but the server says {self.completed}")
        if self.completed.get("crc64nvme") != local_crc:
            raise UploadError(
                f"crc64nvme mismatch: server {self.completed.get('crc64nvme')}, local {local_crc}"
            )
        verified = {"crc64nvme": local_crc}
        if "sha256" in self.completed:
            local_sha256 = await asyncio.to_thread(sha256_of, self.path)
            if self.completed["sha256"] != local_sha256:
                raise UploadError(
                    f"sha256 mismatch: server {self.completed['sha256']}, local {local_sha256}"
                )
            verified["sha256"] = local_sha256
        return {
            "status": "completed",
            "file_id": self.file_id,
            "filename": self.completed.get("filename", self.path.name),
            "size": self.completed.get("size", self.size),
            **verified,
            "verified": True,
            "chunks_sent": len(missing),
            "requests": self.requests_sent,
            "seconds": round(time.monotonic() - self.started, 3),
        }

    async def _worker(self, queue: asyncio.Queue[int]) -> None:
        loop = asyncio.get_running_loop()
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            while not queue.empty():
                index = queue.get_nowait()
                length = self._chunk_length(index)
                data = await loop.run_in_executor(
                    None, os.pread, fd, length, index * self.chunk_size
                )
                if len(data) != length:
                    raise UploadError(f"{self.path} changed size while it was being uploaded")
                crc = checksums.crc64nvme(data)
                self.chunk_crcs[index] = crc
                answer = await self._send(index, data, crc)
                if answer.get("status") == "completed":
                    self.completed = answer
                self.chunks_done += 1
                self.bytes_done += length
                if self.progress is not None:
                    self.progress(
                        Progress(
                            self.file_id,
                            self.bytes_done,
                            self.size,
                            self.chunks_done,
                            self.total_chunks,
                            time.monotonic() - self.started,
                        )
                    )
        finally:
            os.close(fd)

    async def _send(self, index: int, data: bytes, crc: int) -> dict[str, Any]:
        fields = {
            "file_id": self.file_id,
            "chunk_index": str(index),
            "total_chunks": str(self.total_chunks),
            "filename": self.path.name,
            "total_size": str(self.size),
            "chunk_size": str(self.chunk_size),
            "chunk_crc64nvme": checksums.to_s3(crc),
        }
        if self.metadata is not None:  # on every chunk: whichever arrives first fixes it
            fields["metadata"] = json.dumps(self.metadata)

        def post() -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
            boundary = uuid.uuid4().hex  # a new body for every attempt
            parts, length = _multipart(fields, data, boundary)
            headers = {
                **self._auth(),
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Content-Length": str(length),
            }
            self.requests_sent += 1
            return self.session.post(
                f"{self.url}/upload-chunk", data=_stream(parts), headers=headers
            )

        return await self._retried(f"chunk {index}", post, (200,))


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def upload_file_async(
    path: str | os.PathLike[str],
    url: str,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    concurrency: int = 4,
    file_id: str | None = None,
    retries: int = 5,
    token: Token = None,
    progress: ProgressCallback | None = None,
    timeout: float = 300.0,
    backoff: Backoff | None = None,
    session: aiohttp.ClientSession | None = None,
    metadata: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Upload `path` to the server at `url`; return the verified result.

    With `file_id` of an earlier attempt, only the chunks the server lacks are sent.
    `metadata` (string keys and values) is stored with the upload and passed to hooks.
    `token` is a bearer credential, or a function called before each request that returns
    one (a short-lived JWT the application renews).
    Raises UploadError when the upload cannot complete or does not verify.
    """
    if chunk_size < 1 or concurrency < 1 or retries < 0:
        raise ValueError("chunk_size and concurrency must be positive, retries not negative")
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency + 1),
            timeout=aiohttp.ClientTimeout(total=timeout),
        )
    try:
        uploader = Uploader(
            session,
            url,
            Path(path),
            chunk_size=chunk_size,
            concurrency=concurrency,
            file_id=file_id,
            retries=retries,
            token=token,
            progress=progress,
            backoff=backoff or Backoff(),
            metadata=metadata,
        )
        return await uploader.run()
    finally:
        if own_session:
            await session.close()


def upload_file(path: str | os.PathLike[str], url: str, **options: Any) -> dict[str, Any]:
    """The synchronous form of `upload_file_async` (runs its own event loop)."""
    return asyncio.run(upload_file_async(path, url, **options))


async def get_status_async(url: str, file_id: str, *, token: str | None = None) -> dict[str, Any]:
    """The upload's status answer (`not_found` included). ValueError for an id the server
    would refuse; UploadError for an answer that is not a status (another server, an error)."""
    check_file_id(file_id)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.get(f"{url.rstrip('/')}/upload-status/{file_id}", headers=headers) as response,
    ):
        body = await response.read()
        return answer_of("status", str(response.url), response.status, body, (200, 404))


def get_status(url: str, file_id: str, *, token: str | None = None) -> dict[str, Any]:
    return asyncio.run(get_status_async(url, file_id, token=token))
