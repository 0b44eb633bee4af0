"""A simple local client: upload one file in chunks and report the throughput.

    python bench/quick_upload.py --url http://127.0.0.1:8000 --size 1GiB --chunk-size 1MiB

It sends each chunk as one multipart body built from a shared buffer (a memoryview slice
between a small head and tail), so the client costs little CPU; the full harness is
`python -m bench` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import time
import uuid

import aiohttp

UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def parse_size(text: str) -> int:
    lowered = text.strip().lower()
    for unit, factor in sorted(UNITS.items(), key=lambda u: -len(u[0])):
        if lowered.endswith(unit):
            return int(float(lowered[: -len(unit)]) * factor)
    return int(lowered)


def chunk_body(boundary: str, fields: dict[str, str], data: memoryview) -> list[bytes | memoryview]:
    head = "".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    )
    head += f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="blob"\r\n'
    head += "Content-Type: application/octet-stream\r\n\r\n"
    return [head.encode(), data, f"\r\n--{boundary}--\r\n".encode()]


async def upload(url: str, size: int, chunk_size: int, concurrency: int) -> dict:
    data = memoryview(os.urandom(size))
    expected = hashlib.sha256(data).hexdigest()
    total = (size + chunk_size - 1) // chunk_size
    file_id = uuid.uuid4().hex
    boundary = uuid.uuid4().hex
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)
    result: dict = {}
    latencies: list[float] = []

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            fields = {"file_id": file_id, "chunk_index": str(i), "total_chunks": str(total),
                      "filename": "bench.bin"}  # fmt: skip
            parts = chunk_body(boundary, fields, data[i * chunk_size : (i + 1) * chunk_size])
            length = sum(len(p) for p in parts)

            async def body(parts: list[bytes | memoryview] = parts) -> object:
                for part in parts:
                    yield part

            started = time.perf_counter()
            async with session.post(
                f"{url}/upload-chunk",
                data=body(),
                headers={
                    "Content-Type": f"multipart/form-data; boundary={boundary}",
                    "Content-Length": str(length),
                },
            ) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            latencies.append(time.perf_counter() - started)
            if answer["status"] == "completed":
                result.update(answer)

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(600)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    assert result.get("sha256") == expected, "the merged file does not match"
    latencies.sort()
    return {
        "size": size,
        "chunk_size": chunk_size,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "MiB_per_s": round(size / 2**20 / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--chunk-size", default="1MiB")
    parser.add_argument("--concurrency", type=int, default=4)
    args = parser.parse_args()
    print(asyncio.run(upload(args.url, parse_size(args.size), parse_size(args.chunk_size),
                             args.concurrency)))  # fmt: skip


if __name__ == "__main__":
    main()
