"""Counters in Prometheus text format, summed over every server process on one data folder.

Each process keeps its own counters in memory and publishes them every few seconds (and at
exit) as `<data_dir>/.metrics/<pid>.json`; `/metrics` adds up its own live figures and the
files of the other processes that are still alive. So with `--workers N`, or several
processes behind nginx, any one of them answers for all.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .locks import pid_alive

COUNTERS: dict[str, str] = {
    "bytes_received": "Chunk bytes received from clients",
    "chunks_stored": "Chunks acknowledged and stored",
    "uploads_completed": "Uploads merged and completed",
    "uploads_failed": "Uploads that failed at merge or expired before completion",
    "uploads_aborted": "Uploads aborted or deleted by DELETE /uploads/{file_id}",
    "chunks_rejected": "Chunk requests answered with an error",
}


@dataclass(slots=True)
class Metrics:
    counters: Counter[str] = field(default_factory=Counter)
    requests: Counter[str] = field(default_factory=Counter)  # by status code

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name] += amount

    def count_request(self, status: int) -> None:
        self.requests[str(status)] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"counters": dict(self.counters), "requests": dict(self.requests)}

    def publish(self, folder: Path) -> None:
        """Write this process's figures for the others to read (atomically)."""
        folder.mkdir(parents=True, exist_ok=True)
        temp = _unfinished_path(folder, os.getpid())
        temp.write_text(json.dumps(self.snapshot()))
        os.replace(temp, _figures_path(folder, os.getpid()))

    def unpublish(self, folder: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            _figures_path(folder, os.getpid()).unlink()

    def render(self, folder: Path, gauges: dict[str, tuple[str, int]]) -> str:
        counters = Counter(self.counters)
        requests = Counter(self.requests)
        for snapshot in _other_processes(folder):
            counters.update(snapshot.get("counters", {}))
            requests.update(snapshot.get("requests", {}))
        lines: list[str] = []
        for name, help_text in COUNTERS.items():
            metric = f"chunkserver_{name}_total"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} counter"]
            lines.append(f"{metric} {counters.get(name, 0)}")
        metric = "chunkserver_requests_total"
        lines += [f"# HELP {metric} HTTP requests answered, by status", f"# TYPE {metric} counter"]
        for status in sorted(requests):
            lines.append(f'{metric}{{status="{status}"}} {requests[status]}')
        for name, (help_text, value) in gauges.items():
            metric = f"chunkserver_{name}"
            lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge", f"{metric} {value}"]
        return "\n".join(lines) + "\n"


def _figures_path(folder: Path, pid: int) -> Path:
    return folder / f"{pid}.json"


def _unfinished_path(folder: Path, pid: int) -> Path:
    """Where a process writes its figures before renaming them into place."""
    return folder / f".{pid}.json.tmp"


def _other_processes(folder: Path) -> list[dict[str, dict[str, int]]]:
    snapshots = []
    try:
        paths = list(folder.glob("*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            pid = int(path.stem)
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        if not pid_alive(pid):  # its figures died with it; so did any write it had begun
            for leftover in (path, _unfinished_path(folder, pid)):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            continue
        with contextlib.suppress(OSError, ValueError):
            snapshots.append(json.loads(path.read_text()))
    return snapshots
