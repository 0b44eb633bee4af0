"""The limit of the S3 bench: the same bytes sent straight to the object store by a plain S3
client, with no chunkserver between: a multipart upload per file, the same part size (at
least 5 MiB, S3's smallest part), the same concurrency and the same two shapes as the load
generator. It streams views of the same shared buffer with presigned PUTs on aiohttp, the
cheapest client there is, so that the ratio shows what chunkserver costs on top.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from chunkserver.storage.s3.objects import ObjectStore, Settings

from .loadgen import CellRun, file_slices, files_shape_sizes

MiB = 2**20
MIN_PART = 5 * MiB


class S3Direct:
    def __init__(self, settings: Settings, buffer: memoryview) -> None:
        self.settings = settings
        self.buffer = buffer

    async def _one_file(
        self, store: ObjectStore, run: CellRun, size: int, part_size: int, in_flight: int
    ) -> None:
        key = f"bench-direct/{uuid.uuid4().hex}"
        upload_id = await store.create_multipart(key)
        parts = file_slices(self.buffer, size, part_size)
        etags: dict[int, str] = {}
        queue = list(enumerate(parts, start=1))
        queue.reverse()

        async def worker() -> None:
            while queue:
                number, data = queue.pop()
                started = time.perf_counter()
                etags[number] = await store.put_part(key, upload_id, number, data, len(data))
                run.latencies.append(time.perf_counter() - started)
                run.bytes_sent += len(data)
                run.requests += 1

        await asyncio.gather(*(worker() for _ in range(min(in_flight, len(parts)))))
        started = time.perf_counter()
        await store.complete(key, upload_id, sorted(etags.items()))
        run.completion_waits.append(time.perf_counter() - started)
        run.requests += 2  # create and complete
        run.uploads.append({"file_id": key, "size": size, "answered_size": size, "completed": True})

    async def run_cell(
        self, *, shape: str, chunk_size: int, concurrency: int, volume: int
    ) -> CellRun:
        run = CellRun()
        part_size = max(chunk_size, MIN_PART)
        store = ObjectStore(self.settings)
        await store.open()
        try:
            started = time.perf_counter()
            if shape == "parallel":
                await self._one_file(store, run, volume, part_size, concurrency)
            else:
                sizes = files_shape_sizes(volume)

                async def files_worker() -> None:
                    while sizes:
                        await self._one_file(store, run, sizes.pop(), part_size, 1)

                await asyncio.gather(*(files_worker() for _ in range(concurrency)))
            run.seconds = time.perf_counter() - started
        finally:
            await store.close()
        return run

    async def delete_uploads(self, run: CellRun) -> None:
        store = ObjectStore(self.settings)
        await store.open()
        try:
            await store.delete([u["file_id"] for u in run.uploads])
        finally:
            await store.close()
