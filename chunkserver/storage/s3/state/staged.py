"""Staged chunks kept in PostgreSQL: the bytes of chunks smaller than a part, until their run
is gathered into one."""

from __future__ import annotations

import time

from ....model import UploadMeta
from .pool import StatePool


class StagedStatements:
    """Staged chunks' bytes by staging key (`chunkserver_staged`)."""

    def __init__(self, pool: StatePool) -> None:
        self.pool = pool

    async def put(self, key: str, meta: UploadMeta, data: bytes | bytearray) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                """INSERT INTO chunkserver_staged (key, file_id, token, created, data)
                   VALUES ($1, $2, $3, $4, $5)""",
                key,
                meta.file_id,
                meta.token,
                time.time(),
                data,
            )

    async def read(self, key: str) -> bytes | None:
        async with self.pool.connection() as db:
            data: bytes | None = await db.fetchval(
                "SELECT data FROM chunkserver_staged WHERE key = $1", key
            )
        return data

    async def delete(self, keys: list[str]) -> None:
        if keys:
            async with self.pool.connection() as db:
                await db.execute("DELETE FROM chunkserver_staged WHERE key = ANY($1)", keys)

    async def delete_upload(self, meta: UploadMeta) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                "DELETE FROM chunkserver_staged WHERE file_id = $1 AND token = $2",
                meta.file_id,
                meta.token,
            )

    async def delete_orphans(self, older_than: float) -> int:
        """Remove staged chunks of uploads that no longer exist (a host died between staging
        and recording, or a removal's clean-up was cut short); how many."""
        async with self.pool.connection() as db:
            removed = await db.fetch(
                """DELETE FROM chunkserver_staged s WHERE s.created < $1 AND NOT EXISTS (
                       SELECT 1 FROM chunkserver_uploads u
                       WHERE u.file_id = s.file_id AND u.token = s.token)
                   RETURNING 1""",
                older_than,
            )
        return len(removed)
