"""An upload's row: created once, joined by chunks, adopted, expired, removed."""

from __future__ import annotations

import json

from ....model import UploadMeta
from .pool import StatePool
from .rows import UploadRow, upload_row


class UploadStatements:
    """An upload's row: created once, joined by chunks, adopted, expired, removed."""

    def __init__(self, pool: StatePool) -> None:
        self.pool = pool

    async def get(self, file_id: str) -> UploadRow | None:
        async with self.pool.connection() as db:
            r = await db.fetchrow("SELECT * FROM chunkserver_uploads WHERE file_id = $1", file_id)
        return None if r is None else upload_row(r)

    async def insert(
        self, meta: UploadMeta, object_key: str, upload_id: str, direct: bool | None
    ) -> bool:
        """Create the upload unless one of its id exists; whether this call created it."""
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                """INSERT INTO chunkserver_uploads (file_id, token, filename, total_chunks,
                       total_size, chunk_size, chunk_size_declared, direct, created_at,
                       last_activity, object_key, s3_upload_id, metadata, protocol, concat,
                       stream_offset, stream_crc, repr_sha256, owner)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12, $13, $14,
                       $15, $15, $16, $17)
                   ON CONFLICT (file_id) DO NOTHING RETURNING file_id""",
                meta.file_id,
                meta.token,
                meta.filename,
                0 if meta.is_stream else meta.total_chunks,  # a tus upload counts its parts
                meta.total_size,
                meta.chunk_size,
                meta.chunk_size_declared,
                direct,
                meta.created_at,
                object_key,
                upload_id,
                None if meta.metadata is None else json.dumps(meta.metadata),
                meta.protocol,
                meta.stored()["concat"],
                0 if meta.is_stream else None,
                meta.repr_sha256,
                meta.owner,
            )
        return r is not None

    async def adopt_metadata(self, meta: UploadMeta, metadata: dict[str, str]) -> UploadRow | None:
        """Take the client's metadata when the upload has none yet."""
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET metadata = $3
                   WHERE file_id = $1 AND token = $2 AND metadata IS NULL""",
                meta.file_id,
                meta.token,
                json.dumps(metadata),
            )
        return await self.get(meta.file_id)

    async def declare_chunk_size(
        self, meta: UploadMeta, chunk_size: int, direct: bool
    ) -> UploadRow | None:
        """Adopt a declared chunk size when the upload has none yet."""
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads
                   SET chunk_size = $3, chunk_size_declared = true, direct = COALESCE(direct, $4)
                   WHERE file_id = $1 AND token = $2 AND chunk_size IS NULL""",
                meta.file_id,
                meta.token,
                chunk_size,
                direct,
            )
        return await self.get(meta.file_id)

    async def fix_layout(self, meta: UploadMeta, direct: bool) -> bool | None:
        """Decide once whether chunks are parts; the decision as stored (None: gone)."""
        async with self.pool.connection() as db:
            value: bool | None = await db.fetchval(
                """UPDATE chunkserver_uploads SET direct = COALESCE(direct, $3)
                   WHERE file_id = $1 AND token = $2 RETURNING direct""",
                meta.file_id,
                meta.token,
                direct,
            )
        return value

    async def join(self, file_id: str) -> UploadRow | None:
        """The upload, counting one more chunk request receiving into it (in the same round
        trip as reading it): an upload that a request other than its creator's has begun
        receiving into is not abandoned when the creator's request fails."""
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                """UPDATE chunkserver_uploads SET receivers = receivers + 1
                   WHERE file_id = $1 RETURNING *""",
                file_id,
            )
        return None if r is None else upload_row(r)

    async def remove_if_empty(self, meta: UploadMeta) -> UploadRow | None:
        """Remove an upload whose creating request failed: only while it holds no chunk and
        no request but (at most) that one has begun receiving into it."""
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                """DELETE FROM chunkserver_uploads u WHERE file_id = $1 AND token = $2
                     AND status = 'uploading' AND receivers <= 1
                     AND NOT EXISTS (SELECT 1 FROM chunkserver_chunks c
                                     WHERE c.file_id = u.file_id AND c.token = u.token)
                   RETURNING *""",
                meta.file_id,
                meta.token,
            )
        return None if r is None else upload_row(r)

    async def remove(self, file_id: str) -> UploadRow | None:
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                "DELETE FROM chunkserver_uploads WHERE file_id = $1 RETURNING *", file_id
            )
        return None if r is None else upload_row(r)

    async def remove_expired(self, older_than: float) -> list[UploadRow]:
        async with self.pool.connection() as db:
            rows = await db.fetch(
                """DELETE FROM chunkserver_uploads
                   WHERE status = 'uploading' AND last_activity < $1 RETURNING *""",
                older_than,
            )
        return [upload_row(r) for r in rows]

    async def ready_to_finish(self, claimed_before: float) -> list[UploadRow]:
        """Uploads with every chunk stored and no live completion: a host died before or
        during it."""
        async with self.pool.connection() as db:
            rows = await db.fetch(
                """SELECT * FROM chunkserver_uploads u
                   WHERE (status = 'uploading' OR (status = 'completing' AND claimed_at < $1))
                     AND total_chunks = (SELECT count(*) FROM chunkserver_chunks c
                                         WHERE c.file_id = u.file_id AND c.token = u.token)
                     AND (stream_offset IS NULL OR stream_offset = total_size)""",
                claimed_before,
            )
        return [upload_row(r) for r in rows]

    async def in_progress(self) -> list[str]:
        async with self.pool.connection() as db:
            rows = await db.fetch(
                "SELECT file_id FROM chunkserver_uploads WHERE status <> 'completed'"
            )
        return [r["file_id"] for r in rows]

    async def live_uploads(self) -> tuple[set[str], set[tuple[str, str]]]:
        """The S3 UploadIds and (file_id, token) pairs of every upload not yet completed."""
        async with self.pool.connection() as db:
            rows = await db.fetch(
                """SELECT file_id, token, s3_upload_id FROM chunkserver_uploads
                   WHERE status <> 'completed'"""
            )
        return {r["s3_upload_id"] for r in rows}, {(r["file_id"], r["token"]) for r in rows}
