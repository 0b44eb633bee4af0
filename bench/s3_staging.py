"""What staging a small chunk costs the stores: N chunks of 1 MiB PUT as objects of their own
to Swift (4 at once) then deleted, against the same inserted as rows of a `bytea` column of
PostgreSQL (stored uncompressed, out of line) then deleted; each store's CPU from /proc.

    python -m bench.s3_staging --chunks 200 --rounds 2

The measurement behind staging chunks under 5 MiB in PostgreSQL (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import asyncpg
import psutil

from chunkserver.storage.s3.objects import ObjectStore

from .targets import ResourceSampler, S3Stack, start_s3_stack

MiB = 2**20


async def to_swift(store: ObjectStore, count: int, data: bytes) -> float:
    gate = asyncio.Semaphore(4)

    async def one(i: int) -> None:
        async with gate:
            await store.put_object(f"staging/cost/{i}", data, len(data))

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    await store.delete([f"staging/cost/{i}" for i in range(count)])
    return time.perf_counter() - started


async def to_postgres(db: asyncpg.Connection, count: int, data: bytes) -> float:
    started = time.perf_counter()
    for i in range(count):
        await db.execute("INSERT INTO staged_cost VALUES ($1, $2)", f"k{i}", data)
    await db.execute("DELETE FROM staged_cost")
    return time.perf_counter() - started


def postgres_pids(stack: S3Stack) -> list[int]:
    """The server and its backends, the one serving this connection among them."""
    parent = psutil.Process(stack.postgres.process.pid)
    return [parent.pid] + [c.pid for c in parent.children(recursive=True)]


async def measure(stack: S3Stack, count: int, rounds: int) -> None:
    data = os.urandom(MiB)
    store = ObjectStore(stack.object_settings())
    await store.open()
    db = await asyncpg.connect(stack.settings["database_url"])
    try:
        await db.execute(
            "CREATE TABLE IF NOT EXISTS staged_cost (key text PRIMARY KEY, data bytea NOT NULL)"
        )
        await db.execute("ALTER TABLE staged_cost ALTER COLUMN data SET STORAGE EXTERNAL")
        for _ in range(rounds):
            for name in ("swift", "postgresql"):
                swift = name == "swift"
                pids = [p.pid for p in stack.swift.processes] if swift else postgres_pids(stack)
                with ResourceSampler(pids) as sampler:
                    if swift:
                        seconds = await to_swift(store, count, data)
                    else:
                        seconds = await to_postgres(db, count, data)
                print(
                    f"{name}: {count} x 1 MiB stored and deleted in {seconds:.2f} s, "
                    f"{sampler.cpu_seconds / count * 1000:.1f} ms of its CPU per MiB",
                    flush=True,
                )
    finally:
        await db.close()
        await store.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3_staging", description=__doc__)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    stack = start_s3_stack(None)
    try:
        asyncio.run(measure(stack, args.chunks, args.rounds))
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
