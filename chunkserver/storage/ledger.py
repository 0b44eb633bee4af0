"""What a backend counts for quotas and keeps of stopped uploads (service/quotas.py), so that
every process and host sees the same: `local/ledger.py`, `s3/ledger.py`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..model import SEPARATOR


@dataclass(frozen=True, slots=True)
class Usage:
    uploads: int  # uploads in progress
    bytes: int  # their declared lengths, or the bytes stored of those without one


class Ledger(Protocol):
    """A backend's shared counts (local/ledger.py, s3/ledger.py); `namespace` is an
    identity's (owners.namespace_of), "" for the anonymous one."""

    async def usage(self, namespace: str) -> Usage: ...
    async def take_request(self, namespace: str, rate: float) -> float:
        """Take one request from the identity's bucket: 0 when taken, else the seconds
        until one is there."""
        ...

    async def stop(self, file_id: str, token: str, detail: str) -> None: ...
    async def stopped(self, file_id: str, token: str) -> str | None: ...


def in_namespace(owned: str, space: str) -> bool:
    """Whether the upload of owned id `owned` belongs to the namespace `space`."""
    if not space:
        return SEPARATOR not in owned
    return owned.startswith(space + SEPARATOR)
