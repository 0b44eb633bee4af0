"""`UploadState`: the S3 backend's upload state, its statements grouped by what they touch."""

from __future__ import annotations

import contextlib

import asyncpg

from .chunks import ChunkStatements
from .claims import ClaimStatements
from .pool import StatePool
from .staged import StagedStatements
from .uploads import UploadStatements


class UploadState:
    """The upload state in PostgreSQL, shared by every host: the pool, and the statements on
    upload rows (`uploads`), on claims (`claims`), on chunk and part rows (`chunks`) and
    on the bytes of small staged chunks (`staged`)."""

    def __init__(self, url: str) -> None:
        self.pool = StatePool(url)
        self.uploads = UploadStatements(self.pool)
        self.claims = ClaimStatements(self.pool, self.uploads)
        self.chunks = ChunkStatements(self.pool)
        self.staged = StagedStatements(self.pool)

    async def open(self) -> None:
        """Connect, and migrate the schema, before the first request."""
        await self.pool.open()

    async def close(self) -> None:
        await self.pool.close()

    def connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection whose errors answer 503 (the outbox's and ledger's statements)."""
        return self.pool.connection()

    async def is_reachable(self) -> bool:
        return await self.pool.is_reachable()
