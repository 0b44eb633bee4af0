"""Which way of writing a chunk's bytes is cheapest on this machine?

    python bench/write_strategies.py [--size 1GiB] [--dir /tmp]

Feeds 256 KiB pieces (what the socket hands over at chunkserver's read_bufsize) through the
event loop into files of `--chunk` bytes, three ways, and prints wall time and CPU per GiB:

- executor:  pieces batched to 1 MiB, one os.writev per batch in a thread, the next batch
             gathered while the previous one is written (what chunkserver does);
- aiofiles:  one `await f.write(piece)` per piece (a thread hop each);
- direct:    os.writev of each 1 MiB batch on the loop itself.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import shutil
import tempfile
import time
from pathlib import Path

import aiofiles
import uvloop

PIECE = 256 * 1024
BATCH = 1024 * 1024


async def pieces(data: memoryview, chunk: int):
    for start in range(0, chunk, PIECE):
        await asyncio.sleep(0)  # a read from the socket
        yield data[start : start + PIECE]


async def with_executor(path: Path, data: memoryview, chunk: int, pool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    batch: list[memoryview] = []
    size = 0
    pending = None
    async for piece in pieces(data, chunk):
        batch.append(piece)
        size += len(piece)
        if size >= BATCH:
            if pending is not None:
                await asyncio.wrap_future(pending)
            pending = pool.submit(os.writev, fd, batch)
            batch, size = [], 0
    if pending is not None:
        await asyncio.wrap_future(pending)
    if batch:
        os.writev(fd, batch)
    os.close(fd)


async def with_aiofiles(path: Path, data: memoryview, chunk: int, pool) -> None:
    async with aiofiles.open(path, "wb") as f:
        async for piece in pieces(data, chunk):
            await f.write(piece)


async def direct(path: Path, data: memoryview, chunk: int, pool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    batch: list[memoryview] = []
    size = 0
    async for piece in pieces(data, chunk):
        batch.append(piece)
        size += len(piece)
        if size >= BATCH:
            os.writev(fd, batch)
            batch, size = [], 0
    if batch:
        os.writev(fd, batch)
    os.close(fd)


async def measure(
    strategy, folder: Path, total: int, chunk: int, parallel: int
) -> tuple[float, float]:
    data = memoryview(os.urandom(chunk))
    pool = concurrent.futures.ThreadPoolExecutor(16)
    count = total // chunk
    gate = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with gate:
            await strategy(folder / f"c{i}", data, chunk, pool)

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(count)))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    pool.shutdown()
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=1024, help="MiB to write per strategy")
    parser.add_argument("--chunk", type=int, default=4, help="chunk size in MiB")
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    total, chunk = args.size * 2**20, args.chunk * 2**20
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeats):
        for name, strategy in (("executor", with_executor), ("aiofiles", with_aiofiles),
                               ("direct", direct)):  # fmt: skip
            folder = Path(tempfile.mkdtemp(dir=args.dir))
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                results.setdefault(name, []).append(
                    runner.run(measure(strategy, folder, total, chunk, args.parallel))
                )
            shutil.rmtree(folder)
    gib = total / 2**30
    print(
        f"{args.size} MiB in {args.chunk} MiB chunks, {args.parallel} at once, "
        f"median of {args.repeats}"
    )
    print("| strategy | wall s/GiB | process CPU s/GiB |")
    print("| --- | --- | --- |")
    for name, runs in results.items():
        walls = sorted(r[0] for r in runs)
        cpus = sorted(r[1] for r in runs)
        print(f"| {name} | {walls[len(walls) // 2] / gib:.2f} | {cpus[len(cpus) // 2] / gib:.2f} |")


if __name__ == "__main__":
    main()
