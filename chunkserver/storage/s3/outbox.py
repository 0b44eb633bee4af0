"""The S3 backend's outbox (storage/outbox.py): the table `chunkserver_outbox`; a claim is
`UPDATE ... FOR UPDATE SKIP LOCKED` with a lease, which another host takes over once it runs
out."""

from __future__ import annotations

import json
import time
from typing import Any

from ..outbox import Pending
from .state import UploadState

CLAIM_LEASE_SECONDS = 60.0


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
