"""Events waiting to be delivered to the hook receiver, kept across restarts and crashes.

An event is added once, claimed by one process at a time (so that with several processes or
hosts each event is sent by one of them), then either removed once delivered or put back
with a later due time. A claim dies with its process: a claim whose process is gone (local)
or whose lease ran out (PostgreSQL) is claimed again, so an event is delivered at least
once, at worst twice with the same id.

Each backend keeps its own: `local/outbox.py` (a file per event) and `s3/outbox.py` (a
table of the database).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


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
