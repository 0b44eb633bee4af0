"""Downloads of completed files: chunkserver sending them itself (`chunkserver`) beside
chunkserver behind deploy/nginx.conf (`chunkserver-nginx`), where chunkserver checks the id
and answers X-Accel-Redirect and nginx sends the file with sendfile.

    python -m bench.downloads --size-mib 64 --files 8 --concurrency 4 --repeats 3

Each target gets the same files, uploaded once (not timed); then each repeat downloads every
file from each target in turn (interleaved), with the server's processes' CPU counted (nginx's
with chunkserver's behind it). The page cache holds the files: this measures the servers'
sending, not the disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from .targets import ResourceSampler, Target, start_behind_nginx, start_chunkserver

MiB = 2**20
READ_BYTES = 4 * MiB


async def upload(session: aiohttp.ClientSession, url: str, data: bytes) -> str:
    """One file as one chunk of the seed route; its file_id."""
    file_id = uuid.uuid4().hex
    form = aiohttp.FormData()
    fields = {"file_id": file_id, "chunk_index": "0", "total_chunks": "1", "filename": "f.bin"}
    for name, value in fields.items():
        form.add_field(name, value)
    form.add_field("chunk", data, filename="f.bin", content_type="application/octet-stream")
    async with session.post(f"{url}/upload-chunk", data=form) as answer:
        body = await answer.json()
        if answer.status != 200 or body.get("status") != "completed":
            raise RuntimeError(f"upload failed: {answer.status} {body}")
    return file_id


async def download_all(url: str, file_ids: list[str], concurrency: int, size: int) -> float:
    """Seconds to download every file, `concurrency` at a time, each checked for its size."""
    gate = asyncio.Semaphore(concurrency)

    async def one(session: aiohttp.ClientSession, file_id: str) -> None:
        async with gate, session.get(f"{url}/files/{file_id}") as answer:
            received = 0
            async for piece in answer.content.iter_chunked(READ_BYTES):
                received += len(piece)
            if answer.status != 200 or received != size:
                raise RuntimeError(f"download of {file_id}: {answer.status}, {received} bytes")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        started = time.perf_counter()
        await asyncio.gather(*(one(session, f) for f in file_ids))
        return time.perf_counter() - started


async def measure(args: argparse.Namespace, targets: list[Target]) -> dict[str, Any]:
    size = args.size_mib * MiB
    data = os.urandom(size)
    files: dict[str, list[str]] = {}
    async with aiohttp.ClientSession() as session:
        for target in targets:
            files[target.name] = [
                await upload(session, target.url, data) for _ in range(args.files)
            ]
    runs: dict[str, list[dict[str, float]]] = {t.name: [] for t in targets}
    for _ in range(args.repeats):
        for target in targets:
            with ResourceSampler(target.pids()) as sampler:
                seconds = await download_all(target.url, files[target.name], args.concurrency, size)
            gib = size * args.files / 2**30
            runs[target.name].append(
                {"MiB_per_s": gib * 1024 / seconds, "cpu_s_per_GiB": sampler.cpu_seconds / gib}
            )
    return {
        name: {
            "MiB_per_s": statistics.median(r["MiB_per_s"] for r in results),
            "cpu_s_per_GiB": statistics.median(r["cpu_s_per_GiB"] for r in results),
            "runs": results,
        }
        for name, results in runs.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.downloads", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=64, help="each file's size")
    parser.add_argument("--files", type=int, default=8, help="files per target")
    parser.add_argument("--concurrency", type=int, default=4, help="downloads at once")
    parser.add_argument("--repeats", type=int, default=3, help="runs; medians reported")
    parser.add_argument("--workers", default="1", help="workers of each chunkserver")
    parser.add_argument("--data-root", type=Path, help="where temporary data folders go")
    parser.add_argument("--out", type=Path, help="write the figures to this JSON file")
    args = parser.parse_args(argv)
    targets: list[Target] = []
    try:
        targets.append(
            start_chunkserver(workers=args.workers, fsync=False, data_root=args.data_root)
        )
        targets.append(
            start_behind_nginx(workers=args.workers, fsync=False, data_root=args.data_root)
        )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            figures = runner.run(measure(args, targets))
    finally:
        for target in targets:
            target.stop()
    result = {
        "command": "python -m bench.downloads " + " ".join(sys.argv[1:] if argv is None else argv),
        "options": {k: str(v) for k, v in vars(args).items()},
        "targets": figures,
    }
    for name, figure in figures.items():
        print(
            f"{name}: {figure['MiB_per_s']:.0f} MiB/s, {figure['cpu_s_per_GiB']:.2f} CPU s/GiB",
            file=sys.stderr,
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
