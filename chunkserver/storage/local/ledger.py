"""The local disk's shared counts (quotas.Ledger), read from the data folder so that every
process on it sees the same: an identity's uploads in progress are the folders of its
namespace under `chunks/`; its request bucket is a small file under `quotas/`, read and
written under its flock; an upload stopped by the application has a `.stopped` file in its
folder (gone with the folder)."""

from __future__ import annotations

import fcntl
import os
import struct
import time
from pathlib import Path

from ..ledger import Usage, in_namespace
from .disk import OPEN_FLAGS
from .layout import LocalLayout

STOPPED_NAME = ".stopped"
BUCKET = struct.Struct("<dd")  # tokens, the time they were counted at
ANONYMOUS_BUCKET = "anonymous"


class LocalLedger:
    def __init__(self, layout: LocalLayout) -> None:
        self.layout = layout
        self.buckets = layout.root / "quotas"
        self.buckets.mkdir(parents=True, exist_ok=True)

    async def usage(self, namespace: str) -> Usage:
        return await self.layout.run(self._usage, namespace)

    def _usage(self, namespace: str) -> Usage:
        uploads = stored = 0
        with os.scandir(self.layout.chunks_dir) as entries:
            names = [e.name for e in entries if not e.name.startswith(".")]
        for name in names:
            if not in_namespace(name, namespace):
                continue
            counted = self.layout.bytes_in_progress(name)
            if counted is not None:
                uploads += 1
                stored += counted
        return Usage(uploads, stored)

    async def take_request(self, namespace: str, rate: float) -> float:
        # A few microseconds on a file in the page cache, the flock held for as long: no
        # thread hop.
        return take_from_bucket(self.buckets / (namespace or ANONYMOUS_BUCKET), rate)

    async def stop(self, file_id: str, token: str, detail: str) -> None:
        await self.layout.run(self._stop, file_id, token, detail)

    def _stop(self, file_id: str, token: str, detail: str) -> None:
        meta = self.layout.read_meta(file_id)
        if meta is None or meta.token != token:
            return  # ended, or another upload of the same id now
        path = self.layout.folder(file_id) / STOPPED_NAME
        temp = path.with_name(f"{STOPPED_NAME}.{os.getpid()}.tmp")
        try:
            temp.write_text(detail, encoding="utf-8")
            os.replace(temp, path)
        except FileNotFoundError:  # the upload ended meanwhile
            temp.unlink(missing_ok=True)

    async def stopped(self, file_id: str, token: str) -> str | None:
        # One failed open when not stopped: no thread hop either.
        try:
            return (self.layout.folder(file_id) / STOPPED_NAME).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None


def take_from_bucket(path: Path, rate: float) -> float:
    """Take one token from the bucket in `path` (as deep as one second of `rate`, at least
    one): 0 when taken, else the seconds until one is there."""
    depth = max(rate, 1.0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | OPEN_FLAGS, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        now = time.time()
        kept = os.pread(fd, BUCKET.size, 0)
        tokens, counted_at = BUCKET.unpack(kept) if len(kept) == BUCKET.size else (depth, now)
        tokens = min(depth, tokens + max(0.0, now - counted_at) * rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / rate
        os.pwrite(fd, BUCKET.pack(tokens, now), 0)
        return wait
    finally:
        os.close(fd)
