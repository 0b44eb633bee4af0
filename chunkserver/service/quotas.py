"""Quotas per identity: bytes of uploads in progress, uploads in progress, requests per second.

The counts are the store's, not a process's memory (`Ledger`, one per backend: the data
folder's uploads and a file per identity's request bucket; PostgreSQL's rows), so they hold
across processes on one data folder and hosts on one database. A quota of 0 is none, the
default. A token's `max_bytes` claim lowers the bytes quota for what that token sends.

- Requests per second: a token bucket per identity, as deep as one second of requests.
- Uploads in progress: checked when an upload is created.
- Bytes in progress: an upload in progress counts for its declared length when it has one
  (tus's Upload-Length, the seed's total_size), else for the bytes stored so far. A new
  upload is admitted when its declared length (or its first request's body) fits; a request
  adding bytes to an upload of unknown length when its body fits.

Over a quota the request is answered 429 with Retry-After before a byte of it is stored.
Requests of one identity arriving at the same moment are each checked against the store's
count before the other's bytes are in it: the bytes quota can be passed by what those
requests carry, never by more.
"""

from __future__ import annotations

import math

from ..auth.identities import Identity
from ..auth.owners import namespace_of
from ..config import Config
from ..errors import QuotaExceeded
from ..model import UploadMeta
from ..storage.ledger import Ledger, Usage

# What an identity over an in-progress quota is told to wait: its uploads end on their own.
IN_PROGRESS_RETRY_SECONDS = 5


class Quotas:
    def __init__(self, config: Config, ledger: Ledger) -> None:
        self.ledger = ledger
        self.rate = config.quota_requests_per_second
        self.max_uploads = config.quota_uploads_in_progress
        self.max_bytes = config.quota_bytes_in_progress

    def bytes_limit(self, identity: Identity) -> int | None:
        limits = [self.max_bytes] if self.max_bytes else []
        if identity.scope is not None and identity.scope.max_bytes is not None:
            limits.append(identity.scope.max_bytes)
        return min(limits) if limits else None

    async def admit_request(self, identity: Identity) -> None:
        if not self.rate:
            return
        wait = await self.ledger.take_request(namespace_of(identity), self.rate)
        if wait > 0:
            raise QuotaExceeded(
                f"Over the quota of {self.rate:g} requests per second", math.ceil(wait)
            )

    async def admit_upload(self, identity: Identity, length: int | None) -> None:
        """A new upload of `identity`, of `length` bytes (declared, or its first body)."""
        limit = self.bytes_limit(identity)
        if not self.max_uploads and limit is None:
            return
        usage = await self.ledger.usage(namespace_of(identity))
        if self.max_uploads and usage.uploads >= self.max_uploads:
            raise QuotaExceeded(
                f"Over the quota of {self.max_uploads} uploads in progress "
                f"({usage.uploads} in progress)",
                IN_PROGRESS_RETRY_SECONDS,
            )
        self._check_bytes(limit, usage, length or 0)

    async def admit_bytes(self, identity: Identity, meta: UploadMeta, length: int | None) -> None:
        """`length` more bytes for an upload in progress; one of declared length counts
        for all of it already."""
        limit = self.bytes_limit(identity)
        if limit is None or meta.total_size is not None or not length:
            return
        self._check_bytes(limit, await self.ledger.usage(namespace_of(identity)), length)

    @staticmethod
    def _check_bytes(limit: int | None, usage: Usage, length: int) -> None:
        if limit is not None and usage.bytes + length > limit:
            raise QuotaExceeded(
                f"Over the quota of {limit} bytes in progress ({usage.bytes} in progress, "
                f"{length} more asked)",
                IN_PROGRESS_RETRY_SECONDS,
            )
