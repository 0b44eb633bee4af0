"""Resident memory stays flat: it does not grow with the chunk or the file size."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import psutil
import pytest

from .conftest import ServerProcess, chunk_form

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def peak_rss_while(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        try:
            rss = process.memory_info().rss + sum(c.memory_info().rss for c in process.children())
        except psutil.Error:
            return
        peak[0] = max(peak[0], rss)
        time.sleep(0.02)


def test_256_mib_in_16_mib_chunks_4_in_flight(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    server = servers()
    process = psutil.Process(server.process.pid)
    chunk = os.urandom(16 * MiB)
    total = 16
    # warm up: the first request loads code and buffers that are not per-upload growth
    asyncio.run(_upload(server.url, "warmup", chunk[: 2 * MiB], 2, 2))
    baseline = process.memory_info().rss
    peak = [baseline]
    stop = threading.Event()
    watcher = threading.Thread(target=peak_rss_while, args=(process, stop, peak))
    watcher.start()
    try:
        answer = asyncio.run(_upload(server.url, "big", chunk, total, 4))
    finally:
        stop.set()
        watcher.join()
    assert answer["status"] == "completed" and answer["size"] == total * len(chunk)
    growth = peak[0] - baseline
    print(
        f"server RSS: baseline {baseline / MiB:.1f} MiB, peak {peak[0] / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB"
    )
    assert growth < 64 * MiB


async def _upload(url: str, file_id: str, chunk: bytes, total: int, in_flight: int) -> dict:
    gate = asyncio.Semaphore(in_flight)
    answers: list[dict] = []

    async def send(session: aiohttp.ClientSession, index: int) -> None:
        async with gate:
            form = chunk_form(file_id, index, total, chunk)
            async with session.post(f"{url}/upload-chunk", data=form) as resp:
                assert resp.status == 200, await resp.text()
                answers.append(await resp.json())

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(send(session, i) for i in range(total)))
    return next(a for a in answers if a["status"] == "completed")
