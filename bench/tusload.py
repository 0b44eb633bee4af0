"""The bench's tus load: the same bytes as the seed's load, sent as a tus client does.

Each file is created with POST (Upload-Length, a filename in Upload-Metadata), then sent in
PATCHes of the chunk size, one after the other, `concurrency` files at once (the `files`
shape). Bodies are views of the shared random buffer, never copied here. Used against
chunkserver's /tus/ and against @tus/server (bench/tus_server.js) in the same run.
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
    def __init__(self, endpoint: str, *, buffer: memoryview, token: str | None = None) -> None:
        self.endpoint = endpoint  # ends with "/"
        self.buffer = buffer
        self.headers = {**TUS, **({"Authorization": f"Bearer {token}"} if token else {})}

    async def _one_file(
        self, session: aiohttp.ClientSession, run: CellRun, size: int, chunk_size: int
    ) -> None:
        created = {**self.headers, "Upload-Length": str(size), "Upload-Metadata": FILENAME}
        async with session.post(self.endpoint, headers=created) as resp:
            if resp.status != 201:
                raise RuntimeError(f"HTTP {resp.status} creating a tus upload")
            location = resp.headers["Location"]
        run.requests += 1
        offset = 0
        for data in file_slices(self.buffer, size, chunk_size):
            headers = {
                **self.headers,
                "Content-Type": "application/offset+octet-stream",
                "Upload-Offset": str(offset),
                "Content-Length": str(len(data)),
            }
            started = time.perf_counter()
            async with session.patch(location, data=data, headers=headers) as resp:
                await resp.read()
                if resp.status != 204:
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
