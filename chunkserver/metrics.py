"""Counters in Prometheus text format, with prometheus-client, summed over every server
process on one data folder.

A real server process (`chunkserver serve`, its workers, or several processes sharing a data
folder) runs prometheus-client's multiprocess mode: the command line sets
`PROMETHEUS_MULTIPROC_DIR` to `<data_dir>/.metrics` before anything imports the library, each
process keeps its counters in a memory-mapped file there (`counter_<pid>.db`), and `/metrics`
sums the files of every process still alive. A process's files are removed when it stops or
is found dead, as its figures go with it. An application made in a process without that
variable (the tests, an embedding program) counts in memory, in a registry of its own.
The gauges (uploads in progress, free disk) are read from the store when `/metrics` is asked.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .processes import pid_alive

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
COUNTERS: dict[str, str] = {
    "bytes_received": "Chunk bytes received from clients",
    "chunks_stored": "Chunks acknowledged and stored",
    "uploads_completed": "Uploads merged and completed",
    "uploads_failed": "Uploads that failed at merge or expired before completion",
    "uploads_aborted": "Uploads aborted or deleted by DELETE /uploads/{file_id}",
    "chunks_rejected": "Chunk requests answered with an error",
    "hooks_delivered": "Hook events the receiver took (2xx)",
    "hooks_retried": "Hook deliveries that failed and were put back for a retry",
}
# Identities named in the labels of one process's counters; the others count as "other", so
# that a server with many users keeps a bounded number of series.
MAX_IDENTITY_LABELS = 100
ANONYMOUS_LABEL = "anonymous"
OTHER_LABEL = "other"
_PROCESS_FILE = re.compile(r"^[a-z_]+_(\d+)\.db$")

disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series


def multiprocess_folder() -> Path | None:
    """The folder of the multiprocess mode, when this process runs it."""
    folder = os.environ.get(MULTIPROCESS_ENV)
    return Path(folder) if folder else None


class _Gauges(Collector):
    def __init__(self, gauges: dict[str, tuple[str, int]]) -> None:
        self.gauges = gauges

    def collect(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(f"chunkserver_{name}", help_text, value=value)
            for name, (help_text, value) in self.gauges.items()
        ]


def _count_in_files() -> None:
    """Make prometheus-client keep new values in the multiprocess folder's files.

    The library picks its value class when it is first imported, which, through this
    package's `__init__`, comes before the command line has set the folder; this is the same
    choice made again, once the folder is known."""
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.folder = multiprocess_folder()
        if self.folder is not None:
            _count_in_files()
        # In the multiprocess mode the values live in the folder's files, not in a registry.
        self.registry = None if self.folder is not None else CollectorRegistry()
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.counters = {
            name: Counter(f"chunkserver_{name}", text, registry=self.registry)
            for name, text in COUNTERS.items()
        }
        self.requests = Counter(
            "chunkserver_requests",
            "HTTP requests answered, by status",
            ["status"],
            registry=self.registry,
        )
        self.by_identity = Counter(
            "chunkserver_identity_requests",
            f"HTTP requests answered, by identity (the first {MAX_IDENTITY_LABELS} a process "
            f'sees by name, then "{OTHER_LABEL}")',
            ["identity", "status"],
            registry=self.registry,
        )
        self._labelled: set[str] = set()

    def inc(self, name: str, amount: int = 1) -> None:
        self.counters[name].inc(amount)

    def count_request(self, status: int, identity: str = "") -> None:
        code = str(status)
        self.requests.labels(code).inc()
        self.by_identity.labels(self._identity_label(identity), code).inc()

    def _identity_label(self, name: str) -> str:
        if not name:
            return ANONYMOUS_LABEL
        if name in self._labelled:
            return name
        if len(self._labelled) >= MAX_IDENTITY_LABELS:
            return OTHER_LABEL
        self._labelled.add(name)
        return name

    def render(self, gauges: dict[str, tuple[str, int]]) -> str:
        """Prometheus text: the counters of every live process, and the gauges."""
        registry = CollectorRegistry()
        if self.folder is None:
            assert self.registry is not None
            text = generate_latest(self.registry).decode()
        else:
            self._forget_dead_processes()
            MultiProcessCollector(registry, path=str(self.folder))  # type: ignore[no-untyped-call]
            text = generate_latest(registry).decode()
            # A counter no process has touched yet is in no file: show it as 0.
            for name, help_text in COUNTERS.items():
                if f"chunkserver_{name}_total " not in text:
                    text += (
                        f"# HELP chunkserver_{name}_total {help_text}\n"
                        f"# TYPE chunkserver_{name}_total counter\n"
                        f"chunkserver_{name}_total 0.0\n"
                    )
        gauges_registry = CollectorRegistry()
        gauges_registry.register(_Gauges(gauges))
        return text + generate_latest(gauges_registry).decode()

    def _forget_dead_processes(self) -> None:
        assert self.folder is not None
        for path in self.folder.glob("*.db"):
            match = _PROCESS_FILE.match(path.name)
            if match and not pid_alive(int(match.group(1))):
                with contextlib.suppress(OSError):
                    path.unlink()

    def forget_this_process(self) -> None:
        """At a clean stop: this process's figures go with it."""
        if self.folder is None:
            return
        for path in self.folder.glob(f"*_{os.getpid()}.db"):
            with contextlib.suppress(OSError):
                path.unlink()
