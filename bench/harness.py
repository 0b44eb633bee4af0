"""`python -m bench`: the throughput matrix, with the machine's own limits measured in the same run.

See bench/README.md for how to read the table and the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from . import report
from .loadgen import CellRun, LoadGenerator, MiB
from .s3peer import S3Direct
from .targets import (
    NGINX_LOCATIONS,
    ResourceSampler,
    S3Stack,
    Target,
    clear_nginx_store,
    nginx_present,
    start_behind_nginx,
    start_chunkserver,
    start_fastapi,
    start_nginx,
    start_s3_stack,
    start_sink,
    start_tus_s3_server,
    start_tus_server,
)
from .tusload import ResumableLoad, TusLoad

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Measure chunkserver's upload throughput against the machine's limits.",
    )
    parser.add_argument("--url", help="measure this running server instead of starting one")
    parser.add_argument("--token", help="bearer token for --url")
    parser.add_argument(
        "--jwt",
        action="store_true",
        help="also a second started server with jwt_secret, sent a JWT on every request "
        "(chunkserver-jwt: the cost of authentication)",
    )
    parser.add_argument(
        "--workers",
        default="1",
        help='workers of the started server, and nginx\'s worker_processes ("auto": one per core)',
    )
    parser.add_argument("--fsync", action="store_true", help="start the server with fsync = true")
    parser.add_argument("--quick", action="store_true", help="256 MiB, fewer cells, 1 repeat")
    parser.add_argument("--smallest", action="store_true", help=argparse.SUPPRESS)  # tests
    parser.add_argument("--volume", type=int, help="MiB per cell (default 1024)")
    parser.add_argument("--repeats", type=int, help="runs per cell; the median is reported")
    parser.add_argument("--chunk-sizes", help="MiB, comma separated (default 1,2,3,4,5)")
    parser.add_argument("--concurrency", help="comma separated (default 1,4,16)")
    parser.add_argument("--shapes", help="files,parallel (default both)")
    parser.add_argument("--no-sink", action="store_true", help="skip the sink (client ceiling)")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx limit")
    parser.add_argument(
        "--no-behind-nginx",
        action="store_true",
        help="skip chunkserver-nginx (a second chunkserver behind deploy/nginx.conf)",
    )
    parser.add_argument(
        "--nginx-site",
        type=Path,
        help="chunkserver-nginx behind this file instead of deploy/nginx.conf (to compare)",
    )
    parser.add_argument(
        "--no-warm",
        action="store_true",
        help="do not write and drop a file of the volume before every run (see README)",
    )
    parser.add_argument(
        "--no-fastapi", action="store_true", help="skip the seed's FastAPI endpoint"
    )
    parser.add_argument(
        "--checksums", help='the started server\'s checksums, e.g. "crc64nvme,sha256"'
    )
    parser.add_argument(
        "--storage",
        choices=("local", "s3"),
        default="local",
        help="s3: chunkserver on a real Swift and PostgreSQL, beside a plain S3 client",
    )
    parser.add_argument(
        "--protocol",
        choices=("seed", "tus"),
        default="seed",
        help="tus: chunkserver's seed and tus loads of the same bytes beside @tus/server",
    )
    parser.add_argument("--data-root", type=Path, help="where temporary data folders go")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument("--name", help="base name of the result files (default: a timestamp)")
    args = parser.parse_args(argv)
    if args.smallest:
        defaults = {"volume": 16, "repeats": 1, "chunk_sizes": "1", "concurrency": "2",
                    "shapes": "files,parallel"}  # fmt: skip
    elif args.quick:
        defaults = {"volume": 256, "repeats": 1, "chunk_sizes": "1,5", "concurrency": "1,4",
                    "shapes": "files,parallel"}  # fmt: skip
    else:
        defaults = {"volume": 1024, "repeats": 3, "chunk_sizes": "1,2,3,4,5",
                    "concurrency": "1,4,16", "shapes": "files,parallel"}  # fmt: skip
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # MiB; fractions allowed (0.015625 is 16 KiB, for the cost per request)
    args.chunk_sizes = [_mib(x) for x in str(args.chunk_sizes).split(",")]
    args.concurrency = [int(x) for x in str(args.concurrency).split(",")]
    args.shapes = str(args.shapes).split(",")
    if args.protocol == "tus":
        args.shapes = ["files"]  # @tus/server has no concatenation: files, PATCH after PATCH
    return args


def _mib(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() else value


def describe_machine(folder: Path) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    df = subprocess.run(["df", "--output=fstype", str(folder)], capture_output=True, text=True)
    filesystem = df.stdout.strip().splitlines()[-1] if df.returncode == 0 else ""
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "filesystem": filesystem or "unknown",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
    }


def disk_limit(
    buffer: memoryview, folder: Path, chunk_size: int, volume: int, fsync: bool
) -> float:
    """MiB/s writing `volume` bytes as files of `chunk_size` (fdatasync each with `fsync`)."""
    target = Path(tempfile.mkdtemp(prefix="bench-disk-", dir=folder))
    started = time.perf_counter()
    written = 0
    index = 0
    while written < volume:
        length = min(chunk_size, volume - written)
        fd = os.open(target / f"c{index}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        view = buffer[:length]
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fdatasync(fd)
        os.close(fd)
        written += length
        index += 1
    seconds = time.perf_counter() - started
    subprocess.run(["rm", "-rf", str(target)], check=False)
    return volume / MiB / seconds


async def server_bytes_received(url: str, token: str | None) -> int | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{url}/metrics", headers=headers) as response,
        ):
            text = await response.text()
    except aiohttp.ClientError:
        return None
    for line in text.splitlines():
        if line.startswith("chunkserver_bytes_received_total "):
            return int(float(line.split()[1]))
    return None


def behind_nginx_wanted(args: argparse.Namespace) -> bool:
    """chunkserver-nginx joins the seed route's local matrix when nginx is here."""
    return (
        not (args.url or args.no_behind_nginx)
        and args.storage == "local"
        and args.protocol == "seed"
        and nginx_present()
    )


def start_jwt_chunkserver(args: argparse.Namespace, data_root: Path) -> Target:
    """The same server with authentication on: a JWT (HS256) verified on every request."""
    import jwt

    secret = "bench-secret-" + os.urandom(16).hex()
    target = start_chunkserver(
        workers=args.workers,
        fsync=args.fsync,
        data_root=data_root,
        checksums=args.checksums,
        extra_config=f'jwt_secret = "{secret}"\n',
    )
    target.name = "chunkserver-jwt"
    claims = {"sub": "bench", "exp": int(time.time()) + 86_400}
    target.token = jwt.encode(claims, secret, "HS256")
    return target


def warm_pages(folder: Path, volume: int, buffer: memoryview) -> None:
    """Write a file of `volume` bytes on the data filesystem and drop it, untimed, before
    every run of every target. This VM hands memory free for a few seconds back to its host
    (virtio free-page reporting), and the first write into such a page costs about 10 us per
    4 KiB: a server that keeps its uploads would otherwise pay for the machine's cold pages
    (measured: a fresh page-cache write at ~400 MB/s, one into just-freed pages at ~5,000)."""
    fd, name = tempfile.mkstemp(prefix="bench-warm-", dir=folder)
    try:
        written = 0
        while written < volume:
            written += os.write(fd, buffer[: min(len(buffer), volume - written)])
    finally:
        os.close(fd)
        os.unlink(name)  # its pages are freed at once: warm for the run that follows


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] if ordered else 0.0


async def measure(
    target: Target,
    buffer: memoryview,
    token: str | None,
    cell: dict[str, Any],
    volume: int,
    store_pids: list[int] | None = None,
) -> dict[str, Any]:
    """One run of a cell against one target, with its resource figures where visible."""
    generator: Any = (
        target.peer
        if target.peer is not None
        else LoadGenerator(
            target.url, target=target.name, buffer=buffer, token=target.token or token
        )
    )
    store_sampler = ResourceSampler(store_pids) if store_pids else None
    if store_sampler:
        store_sampler.__enter__()
    counted_before = (
        await server_bytes_received(target.url, token) if target.name == "chunkserver" else None
    )
    pids = target.pids()
    sampler = ResourceSampler(pids) if pids else None
    if sampler:
        sampler.__enter__()
    try:
        run: CellRun = await generator.run_cell(
            shape=cell["shape"],
            chunk_size=int(cell["chunk_mib"] * MiB),
            concurrency=cell["concurrency"],
            volume=volume,
        )
    finally:
        if sampler:
            sampler.__exit__(None, None, None)
        if store_sampler:
            store_sampler.__exit__(None, None, None)
    counted_after = (
        await server_bytes_received(target.url, token) if target.name == "chunkserver" else None
    )
    await generator.delete_uploads(run)
    if target.name in NGINX_LOCATIONS:
        clear_nginx_store(target)
    gib = run.bytes_sent / 2**30
    return {
        "MiB_per_s": run.bytes_sent / MiB / run.seconds,
        "seconds": run.seconds,
        "bytes_sent": run.bytes_sent,
        "bytes_counted": (
            counted_after - counted_before
            if counted_before is not None and counted_after is not None
            else None
        ),
        "requests": run.requests,
        "latency_p50_ms": percentile(run.latencies, 0.5) * 1000,
        "latency_p99_ms": percentile(run.latencies, 0.99) * 1000,
        "completion_p50_ms": (
            percentile(run.completion_waits, 0.5) * 1000 if run.completion_waits else None
        ),
        "completion_max_ms": max(run.completion_waits) * 1000 if run.completion_waits else None,
        "peak_rss_mib": sampler.peak_rss / MiB if sampler else None,
        "cpu_s_per_gib": sampler.cpu_seconds / gib if sampler and gib else None,
        "store_cpu_s_per_gib": (store_sampler.cpu_seconds / gib if store_sampler and gib else None),
        "cpu_ms_per_request": (
            sampler.cpu_seconds * 1000 / run.requests if sampler and run.requests else None
        ),
        "requests_per_s": run.requests / run.seconds,
        "dirtied_per_byte": (
            sampler.written_bytes / run.bytes_sent if sampler and run.bytes_sent else None
        ),
        "uploads": len(run.uploads),
        "uploads_completed_right_size": sum(
            1
            for u in run.uploads
            if u["completed"] and (target.name != "chunkserver" or u["answered_size"] == u["size"])
        ),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median run's figures, with min and max of the throughput beside them."""
    speeds = [r["MiB_per_s"] for r in runs]
    median_run = sorted(runs, key=lambda r: r["MiB_per_s"])[len(runs) // 2]
    summary = {k: v for k, v in median_run.items() if k != "MiB_per_s"}
    numeric_keys = ("peak_rss_mib",)
    for key in numeric_keys:
        values = [r[key] for r in runs if r[key] is not None]
        summary[key] = max(values) if values else None
    summary.update(
        {
            "MiB_per_s": statistics.median(speeds),
            "min_MiB_per_s": min(speeds),
            "max_MiB_per_s": max(speeds),
            "runs": runs,
            "bytes_sent_total": sum(r["bytes_sent"] for r in runs),
            "bytes_counted_total": (
                sum(r["bytes_counted"] for r in runs)
                if all(r["bytes_counted"] is not None for r in runs)
                else None
            ),
            "uploads_total": sum(r["uploads"] for r in runs),
            "uploads_completed_right_size_total": sum(
                r["uploads_completed_right_size"] for r in runs
            ),
        }
    )
    return summary


async def run_matrix(
    args: argparse.Namespace,
    targets: list[Target],
    buffer: memoryview,
    store_pids: list[int] | None = None,
) -> list[dict[str, Any]]:
    cells = [
        {"shape": shape, "chunk_mib": chunk, "concurrency": concurrency}
        for shape in args.shapes
        for chunk in args.chunk_sizes
        for concurrency in args.concurrency
    ]
    volume = args.volume * MiB
    # Pages are warmed on the filesystem the servers write to (not with --url: not ours).
    warm_root = (
        None if args.url or args.no_warm else (args.data_root or Path(tempfile.gettempdir()))
    )
    for number, cell in enumerate(cells, 1):
        # tus has no concatenation: its loads send files, PATCH after PATCH.
        active = [t for t in targets if cell["shape"] == "files" or not isinstance(t.peer, TusLoad)]
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in active}
        for _ in range(args.repeats):
            for target in active:  # interleaved, so that drift hits every target alike
                if warm_root is not None:
                    warm_pages(warm_root, volume, buffer)
                runs[target.name].append(
                    await measure(target, buffer, args.token, cell, volume, store_pids)
                )
        cell["targets"] = {name: summarize(r) for name, r in runs.items()}
        line = ", ".join(f"{n} {s['MiB_per_s']:.0f}" for n, s in cell["targets"].items())
        where = f"{cell['shape']} {cell['chunk_mib']} MiB x{cell['concurrency']}"
        print(f"[{number}/{len(cells)}] {where}: {line} MiB/s", file=sys.stderr, flush=True)
    return cells


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_root = args.data_root or Path(tempfile.gettempdir())
    buffer = memoryview(os.urandom(64 * MiB))
    started = datetime.datetime.now(datetime.UTC)
    limits: dict[str, Any] = {"disk_MiB_per_s": {}, "disk_fsync": args.fsync}
    if args.storage == "local":
        print("measuring the disk limit", file=sys.stderr, flush=True)
    for chunk in args.chunk_sizes if args.storage == "local" else []:
        speeds = []
        for _ in range(args.repeats):
            if not args.no_warm:
                warm_pages(data_root, args.volume * MiB, buffer)
            speeds.append(
                disk_limit(buffer, data_root, int(chunk * MiB), args.volume * MiB, args.fsync)
            )
        limits["disk_MiB_per_s"][str(chunk)] = statistics.median(speeds)
    targets: list[Target] = []
    stack: S3Stack | None = None
    try:
        if args.storage == "s3":
            # The S3 matrix: chunkserver on a real Swift and PostgreSQL beside a plain S3
            # client sending the same bytes straight to the same Swift (bench/s3peer.py).
            stack = start_s3_stack(data_root)
        if args.url:
            targets.append(Target("chunkserver", args.url.rstrip("/")))
        else:
            targets.append(
                start_chunkserver(
                    workers=args.workers,
                    fsync=args.fsync,
                    data_root=data_root,
                    checksums=args.checksums,
                    extra_config=stack.config_lines() if stack is not None else "",
                )
            )
        if args.jwt and not args.url:
            targets.append(start_jwt_chunkserver(args, data_root))
        if behind_nginx_wanted(args):
            targets.append(
                start_behind_nginx(
                    workers=args.workers,
                    fsync=args.fsync,
                    data_root=data_root,
                    site=args.nginx_site,
                )
            )
        if stack is not None:
            targets.append(Target("s3-direct", "", peer=S3Direct(stack.object_settings(), buffer)))
            tus_s3 = start_tus_s3_server(stack, buffer)
            if tus_s3 is not None:
                targets.append(tus_s3)
        if args.protocol == "tus":
            ours = targets[0]
            tus_load = TusLoad(f"{ours.url}/tus/", buffer=buffer, token=args.token)
            # The same process as `chunkserver` (its CPU and memory), sent tus's requests.
            targets.append(Target("chunkserver-tus", ours.url, ours.process, peer=tus_load))
            resumable_load = ResumableLoad(
                f"{ours.url}/resumable/", buffer=buffer, token=args.token
            )
            targets.append(
                Target("chunkserver-resumable", ours.url, ours.process, peer=resumable_load)
            )
            peer = start_tus_server(data_root, buffer)
            if peer is None:
                raise SystemExit("--protocol tus needs Node.js and `npm ci` in tests/js")
            targets.append(peer)
        elif args.storage == "local":
            for variant in () if args.no_fastapi else ("def", "async"):
                fastapi = start_fastapi(data_root, variant)
                if fastapi is not None:
                    targets.append(fastapi)
            if not args.no_sink:
                targets.append(start_sink())
            if not args.no_nginx:
                targets += start_nginx(data_root, args.workers)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            store_pids = stack.pids() if stack is not None else None
            cells = runner.run(run_matrix(args, targets, buffer, store_pids))
    finally:
        for target in targets:
            target.stop()
        if stack is not None:
            stack.stop()
    result = {
        "schema": 1,
        "started": started.isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "unit": "MiB/s (2^20 bytes per second), counted until each upload's completed answer",
        "machine": describe_machine(data_root),
        "options": {
            "url": args.url,
            "workers": None if args.url else args.workers,
            "fsync": args.fsync,
            "checksums": args.checksums,
            "volume_mib": args.volume,
            "repeats": args.repeats,
            "chunk_sizes_mib": args.chunk_sizes,
            "concurrency": args.concurrency,
            "shapes": args.shapes,
            "storage": args.storage,
            "protocol": args.protocol,
        },
        "limits": limits,
        "targets": [t.name for t in targets],
        "cells": cells,
    }
    report.add_fractions(result)
    name = args.name or started.strftime("run-%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=1))
    markdown = report.markdown(result)
    (args.out / f"{name}.md").write_text(markdown)
    plotted = report.plot(result, args.out / f"{name}.png")
    print(markdown)
    plot_note = ", .png" if plotted else " (no plot: matplotlib is not installed)"
    print(f"results: {args.out / name}.json, .md{plot_note}", file=sys.stderr)
    return 0
