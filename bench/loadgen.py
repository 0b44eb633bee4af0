"""The load generator: sends uploads as fast as it can, without re-copying the bytes.

Every chunk body is a small multipart head, a memoryview slice of one shared random buffer,
and a small tail, handed to aiohttp as they are. Two shapes:

- `files`: many files, each sent chunk after chunk, `concurrency` files at once;
- `parallel`: one file at a time, all its chunks in flight `concurrency` at once.

Against chunkserver each file's completed answer is checked for its size; against a sink or
nginx (which answer any 200) only the status is checked.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp

from .targets import NGINX_LOCATIONS

MiB = 2**20
FILES_SHAPE_FILE_BYTES = 64 * MiB  # the size of each file in the `files` shape


@dataclass
class CellRun:
    """One run of one cell of the matrix."""

    seconds: float = 0.0
    bytes_sent: int = 0
    requests: int = 0
    latencies: list[float] = field(default_factory=list)  # whole request, seconds
    completion_waits: list[float] = field(default_factory=list)  # last body byte -> completed
    uploads: list[dict] = field(default_factory=list)  # file_id, size, answered size
    errors: list[str] = field(default_factory=list)


def files_shape_sizes(volume: int) -> list[int]:
    """The files of the `files` shape: FILES_SHAPE_FILE_BYTES each, the rest in a last one."""
    file_size = min(FILES_SHAPE_FILE_BYTES, volume)
    sizes = [file_size] * (volume // file_size)
    if volume % file_size:
        sizes.append(volume % file_size)
    return sizes


def file_slices(buffer: memoryview, size: int, chunk_size: int) -> list[memoryview]:
    """The chunks of a file: consecutive slices of the shared buffer, wrapping around."""
    slices = []
    offset = 0
    for start in range(0, size, chunk_size):
        length = min(chunk_size, size - start)
        if offset + length > len(buffer):
            offset = 0
        slices.append(buffer[offset : offset + length])
        offset += length
    return slices


def _head(boundary: str, fields: dict[str, str]) -> bytes:
    text = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    )
    text += f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n'
    return (text + "Content-Type: application/octet-stream\r\n\r\n").encode()


# Targets that speak the seed's protocol and answer JSON (the others take any body).
ANSWERING = ("chunkserver", "chunkserver-jwt", "chunkserver-nginx", "fastapi", "fastapi-async")


class LoadGenerator:
    def __init__(self, url: str, *, target: str, buffer: memoryview, token: str | None = None):
        self.url = url.rstrip("/")
        self.target = target  # "chunkserver", "sink" or "nginx"
        self.buffer = buffer
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def _send_chunk(
        self,
        session: aiohttp.ClientSession,
        run: CellRun,
        file_id: str,
        index: int,
        total: int,
        data: memoryview,
    ) -> dict:
        boundary = uuid.uuid4().hex
        fields = {"file_id": file_id, "chunk_index": str(index), "total_chunks": str(total),
                  "filename": "bench.bin"}  # fmt: skip
        head, tail = _head(boundary, fields), f"\r\n--{boundary}--\r\n".encode()
        body_done = [0.0]

        async def body() -> AsyncIterator[bytes | memoryview]:
            yield head
            yield data  # a view of the shared buffer: never copied here
            yield tail
            body_done[0] = time.perf_counter()

        length = len(head) + len(data) + len(tail)
        headers = {**self.headers, "Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(length)}  # fmt: skip
        location = NGINX_LOCATIONS.get(self.target)
        path = f"/{location}/{file_id}/{index}" if location else "/upload-chunk"
        method = "PUT" if location else "POST"
        started = time.perf_counter()
        async with session.request(method, self.url + path, data=body(), headers=headers) as resp:
            text = await resp.read()
            if resp.status not in (200, 201, 204):
                raise RuntimeError(f"HTTP {resp.status} for chunk {index}: {text[:200]!r}")
        finished = time.perf_counter()
        run.latencies.append(finished - started)
        run.bytes_sent += len(data)
        run.requests += 1
        if self.target not in ANSWERING:
            return {}
        import json

        answer: dict = json.loads(text)
        if answer.get("status") == "completed" and body_done[0]:
            run.completion_waits.append(finished - body_done[0])
        return answer

    async def _one_file(
        self, session: aiohttp.ClientSession, run: CellRun, size: int, chunk_size: int,
        in_flight: int,
    ) -> None:  # fmt: skip
        file_id = uuid.uuid4().hex
        slices = file_slices(self.buffer, size, chunk_size)
        answers: list[dict] = []
        queue = list(enumerate(slices))
        queue.reverse()

        async def worker() -> None:
            while queue:
                index, data = queue.pop()
                answers.append(
                    await self._send_chunk(session, run, file_id, index, len(slices), data)
                )

        await asyncio.gather(*(worker() for _ in range(min(in_flight, len(slices)))))
        completed = [a for a in answers if a.get("status") == "completed"]
        run.uploads.append(
            {
                "file_id": file_id,
                "size": size,
                "answered_size": completed[0].get("size") if completed else None,
                "completed": bool(completed) or self.target not in ANSWERING,
            }
        )

    async def run_cell(
        self, *, shape: str, chunk_size: int, concurrency: int, volume: int
    ) -> CellRun:
        run = CellRun()
        connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.perf_counter()
            if shape == "parallel":
                remaining = volume
                while remaining > 0:
                    size = min(remaining, volume)
                    await self._one_file(session, run, size, chunk_size, concurrency)
                    remaining -= size
            else:
                sizes = files_shape_sizes(volume)

                async def files_worker() -> None:
                    while sizes:
                        await self._one_file(session, run, sizes.pop(), chunk_size, 1)

                await asyncio.gather(*(files_worker() for _ in range(concurrency)))
            run.seconds = time.perf_counter() - started
        return run

    async def delete_uploads(self, run: CellRun) -> None:
        """Free the disk after a cell (not timed)."""
        if self.target not in ANSWERING:
            return
        async with aiohttp.ClientSession() as session:
            for upload in run.uploads:
                async with session.delete(
                    f"{self.url}/uploads/{upload['file_id']}", headers=self.headers
                ):
                    pass
