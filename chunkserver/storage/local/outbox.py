"""The local disk's outbox (storage/outbox.py): one file per event in `<data_dir>/outbox/`,
named `<due ms>-<id>.json`; a claim is a rename to `<name>.<pid>`, which only one process can
make, and dies with its process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from ...processes import pid_alive
from ..outbox import Pending


class FolderOutbox:
    def __init__(self, folder: Path, *, fsync: bool = False) -> None:
        self.folder = folder
        self.fsync = fsync
        folder.mkdir(parents=True, exist_ok=True)

    def _write(self, event: dict[str, Any], attempts: int, due: float) -> None:
        name = f"{int(due * 1000):013d}-{event['id']}.json"
        temp = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(temp, "w") as f:
            json.dump({"event": event, "attempts": attempts}, f)
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, self.folder / name)

    def _add(self, event: dict[str, Any]) -> None:
        marker = f"-{event['id']}.json"
        if any(marker in name for name in os.listdir(self.folder)):
            return  # queued already (waiting, claimed or being written)
        self._write(event, 0, time.time())

    async def add(self, event: dict[str, Any]) -> None:
        await asyncio.to_thread(self._add, event)

    def _claim_due(self, limit: int) -> list[Pending]:
        now_ms = int(time.time() * 1000)
        claimed: list[Pending] = []
        for name in sorted(os.listdir(self.folder)):
            if name.startswith("."):
                self._drop_stale_temp(name)
                continue
            if not name.endswith(".json"):
                self._release_if_dead(name)
                continue
            due_ms, _, _ = name.partition("-")
            if not due_ms.isdigit() or int(due_ms) > now_ms:
                break  # sorted by due time: the rest are later
            mine = f"{name}.{os.getpid()}"
            try:
                os.rename(self.folder / name, self.folder / mine)
            except FileNotFoundError:
                continue  # another process claimed it first
            with contextlib.suppress(OSError, ValueError):
                data = json.loads((self.folder / mine).read_text())
                claimed.append(Pending(data["event"]["id"], data["event"], data["attempts"], mine))
            if len(claimed) >= limit:
                break
        return claimed

    def _release_if_dead(self, name: str) -> None:
        """A claim (`<name>.json.<pid>`) of a process that died goes back to the queue."""
        base, _, pid = name.rpartition(".")
        if base.endswith(".json") and pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.rename(self.folder / name, self.folder / base)

    def _drop_stale_temp(self, name: str) -> None:
        pid = name.rsplit(".", 2)[-2] if name.endswith(".tmp") else ""
        if pid.isdigit() and not pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                os.unlink(self.folder / name)

    async def claim_due(self, limit: int) -> list[Pending]:
        return await asyncio.to_thread(self._claim_due, limit)

    async def delivered(self, pending: Pending) -> None:
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(os.unlink, self.folder / pending.claim)

    def _retry_at(self, pending: Pending, due: float) -> None:
        self._write(pending.event, pending.attempts + 1, due)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.folder / pending.claim)

    async def retry_at(self, pending: Pending, due: float) -> None:
        await asyncio.to_thread(self._retry_at, pending, due)

    async def count(self) -> int:
        names = await asyncio.to_thread(os.listdir, self.folder)
        return sum(1 for n in names if not n.startswith("."))
