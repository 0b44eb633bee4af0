"""The bench's tus load: the same bytes as the seed's load, sent as a tus client does.

Each file is created with POST (Upload-Length, a filename in Upload-Metadata), then sent in
PATCHes of the chunk size, one after the other, `concurrency` files at once (the `files`
shape). Bodies are views of the shared random buffer, never copied here. Used against
chunkserver's /tus/ and against @tus/server (bench/tus_server.js) in the same run.

`ResumableLoad` sends the same bytes as the IETF draft's client does to /resumable/: POST
with `Upload-Complete: ?0` and `Upload-Length`, then PATCHes of `application/partial-upload`,
the last with `Upload-Complete: ?1` (answered 200 with the completed upload).
"""

from __future__ import annotations

import asyncio
import base64
import time

import aiohttp

from .loadgen import CellRun, file_slices, files_shape_sizes

TUS = {"Tus-Resumable": "1.0.0"}
FILENAME = "filename " + base64.b64encode(b"bench.bin").decode()


class TusLoad:
    protocol_headers = TUS
    content_type = "application/offset+octet-stream"

    def __init__(self, endpoint: str, *, buffer: memoryview, token: str | None = None) -> None:
        self.endpoint = endpoint  # ends with "/"
        self.buffer = buffer
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        self.headers = {**self.protocol_headers, **auth}

    def creation_headers(self, size: int) -> dict[str, str]:
        return {**self.headers, "Upload-Length": str(size), "Upload-Metadata": FILENAME}

    def append_headers(self, offset: int, length: int, last: bool) -> dict[str, str]:
        return {
            **self.headers,
            "Content-Type": self.content_type,
            "Upload-Offset": str(offset),
            "Content-Length": str(length),
        }

    def appended(self, status: int, last: bool) -> bool:
        return status == 204

    async def _one_file(
        self, session: aiohttp.ClientSession, run: CellRun, size: int, chunk_size: int
    ) -> None:
        created = self.creation_headers(size)
        async with session.post(self.endpoint, headers=created) as resp:
            if resp.status != 201:
                raise RuntimeError(f"HTTP {resp.status} creating a tus upload")
            location = resp.headers["Location"]
        run.requests += 1
        offset = 0
        for data in file_slices(self.buffer, size, chunk_size):
            last = offset + len(data) == size
            headers = self.append_headers(offset, len(data), last)
            started = time.perf_counter()
            async with session.patch(location, data=data, headers=headers) as resp:
                await resp.read()
                if not self.appended(resp.status, last):
                    raise RuntimeError(f"HTTP {resp.status} for a PATCH at {offset}")
                offset = int(resp.headers["Upload-Offset"])
            run.latencies.append(time.perf_counter() - started)
            run.bytes_sent += len(data)
            run.requests += 1
        run.uploads.append(
            {
                "file_id": location,
                "size": size,
                "answered_size": offset,
                "completed": offset == size,
            }
        )

    async def run_cell(
        self, *, shape: str, chunk_size: int, concurrency: int, volume: int
    ) -> CellRun:
        if shape != "files":
            raise ValueError("the tus load sends files PATCH after PATCH (shape 'files')")
        run = CellRun()
        connector = aiohttp.TCPConnector(limit=concurrency)
        timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.perf_counter()
            sizes = files_shape_sizes(volume)

            async def files_worker() -> None:
                while sizes:
                    await self._one_file(session, run, sizes.pop(), chunk_size)

            await asyncio.gather(*(files_worker() for _ in range(concurrency)))
            run.seconds = time.perf_counter() - started
        return run

    async def delete_uploads(self, run: CellRun) -> None:
        """Free the disk after a cell (not timed): tus termination."""
        async with aiohttp.ClientSession() as session:
            for upload in run.uploads:
                async with session.delete(upload["file_id"], headers=self.headers):
                    pass


class ResumableLoad(TusLoad):
    """The IETF draft's requests (revision 15's rules, no interop version: no 104)."""

    protocol_headers: dict[str, str] = {}  # noqa: RUF012
    content_type = "application/partial-upload"

    def creation_headers(self, size: int) -> dict[str, str]:
        return {**super().creation_headers(size), "Upload-Complete": "?0"}

    def append_headers(self, offset: int, length: int, last: bool) -> dict[str, str]:
        flag = "?1" if last else "?0"
        return {**super().append_headers(offset, length, last), "Upload-Complete": flag}

    def appended(self, status: int, last: bool) -> bool:
        return status == (200 if last else 204)
