"""Events waiting to be delivered to the hook receiver, kept across restarts and crashes.

An event is added once, claimed by one process at a time (so that with several processes or
hosts each event is sent by one of them), then either removed once delivered or put back
with a later due time. A claim dies with its process: a claim whose process is gone (local)
or whose lease ran out (PostgreSQL) is claimed again, so an event is delivered at least
once, at worst twice with the same id.

- `FolderOutbox`: one file per event in `<data_dir>/outbox/`, named `<due ms>-<id>.json`;
  a claim is a rename to `<name>.<pid>`, which only one process can make.
- `PostgresOutbox`: the table `chunkserver_outbox`; a claim is `UPDATE ... FOR UPDATE SKIP
  LOCKED` with a lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .locks import pid_alive

if TYPE_CHECKING:
    from .s3state import UploadState

CLAIM_LEASE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Pending:
    id: str
    event: dict[str, Any]
    attempts: int
    claim: str  # the backend's handle of this claim


class Outbox(Protocol):
    async def add(self, event: dict[str, Any]) -> None: ...
    async def claim_due(self, limit: int) -> list[Pending]: ...
    async def delivered(self, pending: Pending) -> None: ...
    async def retry_at(self, pending: Pending, due: float) -> None: ...
    async def count(self) -> int: ...


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


class PostgresOutbox:
    """The outbox in the S3 backend's database (the table of migrations/0002_*.sql), through
    `UploadState`'s pool."""

    def __init__(self, state: UploadState) -> None:
        self.state = state

    async def add(self, event: dict[str, Any]) -> None:
        async with self.state.connection() as db:
            await db.execute(
                """INSERT INTO chunkserver_outbox (id, event, due) VALUES ($1, $2, $3)
                   ON CONFLICT (id) DO NOTHING""",
                event["id"],
                json.dumps(event),
                time.time(),
            )

    async def claim_due(self, limit: int) -> list[Pending]:
        now = time.time()
        async with self.state.connection() as db:
            rows = await db.fetch(
                """UPDATE chunkserver_outbox SET claimed_until = $1 + $2
                   WHERE id IN (SELECT id FROM chunkserver_outbox
                                WHERE due <= $1 AND claimed_until < $1
                                ORDER BY due LIMIT $3 FOR UPDATE SKIP LOCKED)
                   RETURNING id, event, attempts""",
                now,
                CLAIM_LEASE_SECONDS,
                limit,
            )
        return [Pending(r["id"], json.loads(r["event"]), r["attempts"], r["id"]) for r in rows]

    async def delivered(self, pending: Pending) -> None:
        async with self.state.connection() as db:
            await db.execute("DELETE FROM chunkserver_outbox WHERE id = $1", pending.id)

    async def retry_at(self, pending: Pending, due: float) -> None:
        async with self.state.connection() as db:
            await db.execute(
                """UPDATE chunkserver_outbox SET due = $2, attempts = attempts + 1,
                       claimed_until = 0 WHERE id = $1""",
                pending.id,
                due,
            )

    async def count(self) -> int:
        async with self.state.connection() as db:
            return int(await db.fetchval("SELECT count(*) FROM chunkserver_outbox"))
