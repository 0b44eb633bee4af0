"""What one chunk request costs the server, apart from its bytes, thread by thread.

Starts `chunkserver serve` on a temporary folder, sends many small chunks (16 KiB by
default, so the per-request work dominates), and prints the server's CPU time per request
for each thread group, read from /proc. Thread names come from `py-spy dump` when py-spy is
installed; otherwise the loop thread is told from the executor threads only.

    python bench/per_request.py                       # 4 files x 500 chunks of 16 KiB
    python bench/per_request.py --files 4 --chunks 500 --chunk-kib 16
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp

LISTENING = re.compile(r"listening on (http://\S+)")


def thread_times(pid: int) -> dict[str, tuple[float, float]]:
    """tid -> (user, system) CPU seconds of each thread of `pid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    times = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:
            continue
        times[tid] = (int(fields[11]) / ticks, int(fields[12]) / ticks)
    return times


def thread_names(pid: int) -> dict[str, str]:
    """tid -> Python thread name, from py-spy when it is installed."""
    names = {str(pid): "loop (MainThread)"}
    if shutil.which("py-spy") is None:
        return names
    dump = subprocess.run(["py-spy", "dump", "--pid", str(pid)], capture_output=True, text=True)
    for tid, name in re.findall(r'Thread (\d+) \(\w+\): "([^"]+)"', dump.stdout):
        names.setdefault(tid, re.sub(r"_\d+$", "", name))
    return names


async def upload(session: aiohttp.ClientSession, url: str, chunks: int, payload: bytes) -> None:
    file_id = uuid.uuid4().hex
    for index in range(chunks):
        form = aiohttp.FormData()
        for key, value in (
            ("file_id", file_id),
            ("chunk_index", str(index)),
            ("total_chunks", str(chunks)),
            ("filename", "small.bin"),
        ):
            form.add_field(key, value)
        form.add_field("chunk", payload, filename="blob", content_type="application/octet-stream")
        async with session.post(f"{url}/upload-chunk", data=form) as response:
            if response.status != 200:
                raise RuntimeError(f"{response.status}: {await response.text()}")


async def send_all(url: str, files: int, chunks: int, chunk_bytes: int) -> float:
    payload = os.urandom(chunk_bytes)
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(upload(session, url, chunks, payload) for _ in range(files)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=4, help="uploads at once")
    parser.add_argument("--chunks", type=int, default=500, help="chunks per upload")
    parser.add_argument("--chunk-kib", type=int, default=16, help="chunk size in KiB")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the median is printed")
    parser.add_argument("--data-root", type=Path, help="where the temporary data folder goes")
    parser.add_argument(
        "--sink", action="store_true", help="measure bench/sink.py (aiohttp's floor) instead"
    )
    parser.add_argument(
        "--profile", type=Path, help="py-spy's collapsed stacks of the server, into this file"
    )
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-per-request-", dir=args.data_root))
    config = folder / "bench.toml"
    config.write_text('access_log = false\nlog_level = "warning"\nmin_free_bytes = 0\n')
    command = [sys.executable, "-m", "chunkserver", "serve", "--config", str(config),
               "--port", "0", "--data-dir", str(folder / "data")]  # fmt: skip
    if args.sink:
        command = [sys.executable, "-m", "bench.sink", "--port", "0"]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        url = None
        while url is None:
            line = server.stdout.readline()
            if not line:
                raise SystemExit("the server stopped before listening")
            if match := LISTENING.search(line):
                url = match.group(1)
        profiler = None
        if args.profile:
            profiler = subprocess.Popen(
                ["py-spy", "record", "--pid", str(server.pid), "--format", "raw", "--nonblocking",
                 "--rate", "250", "--output", str(args.profile)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            time.sleep(1)
        rounds = []
        for _ in range(args.repeats):
            before = thread_times(server.pid)
            seconds = asyncio.run(send_all(url, args.files, args.chunks, args.chunk_kib * 1024))
            rounds.append((before, thread_times(server.pid), seconds))
        names = thread_names(server.pid)
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes what it has
            profiler.wait()
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    requests = args.files * args.chunks
    # The median round by total CPU: this machine's timings are noisy.
    rounds.sort(
        key=lambda r: sum(u + s for u, s in r[1].values()) - sum(u + s for u, s in r[0].values())
    )
    before, after, seconds = rounds[len(rounds) // 2]
    totals = sorted(
        (sum(u + s for u, s in a.values()) - sum(u + s for u, s in b.values())) / requests * 1e6
        for b, a, _ in rounds
    )
    print(
        f"{len(rounds)} rounds, server CPU per request (us): "
        + " ".join(f"{t:.0f}" for t in totals)
    )
    groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for tid, (user, system) in after.items():
        user0, system0 = before.get(tid, (0.0, 0.0))
        group = groups[names.get(tid, "executor threads")]
        group[0] += user - user0
        group[1] += system - system0
    total_user = sum(g[0] for g in groups.values())
    total_system = sum(g[1] for g in groups.values())
    print(
        f"{requests} requests of {args.chunk_kib} KiB, {args.files} uploads at once: "
        f"{requests / seconds:.0f} requests/s; server CPU per request "
        f"{total_user / requests * 1e6:.0f} us user + {total_system / requests * 1e6:.0f} us system"
    )
    for name, (user, system) in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        per_user, per_system = user / requests * 1e6, system / requests * 1e6
        print(f"  {name:28s} {per_user:6.0f} us user {per_system:6.0f} us system")


if __name__ == "__main__":
    main()
