"""Claims that one host at a time holds: a completion, a tus writer; and the row's end."""

from __future__ import annotations

import json
import time

from ....model import CompletedUpload, UploadMeta
from .pool import StatePool
from .rows import ChunkRow, Stream, UploadRow, to_signed, upload_row
from .uploads import UploadStatements


class ClaimStatements:
    """Claims that one host at a time holds: a completion, a tus writer; and the row's end."""

    def __init__(self, pool: StatePool, uploads: UploadStatements) -> None:
        self.pool = pool
        self.uploads = uploads

    async def claim_completion(self, meta: UploadMeta, lease_seconds: float) -> UploadRow | None:
        """Claim the completion when every chunk is stored and nobody (alive) completes it."""
        now = time.time()
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                """UPDATE chunkserver_uploads u SET status = 'completing', claimed_at = $3
                   WHERE file_id = $1 AND token = $2
                     AND (status = 'uploading' OR (status = 'completing' AND claimed_at < $4))
                     AND total_chunks = (SELECT count(*) FROM chunkserver_chunks c
                                         WHERE c.file_id = u.file_id AND c.token = u.token)
                     AND (stream_offset IS NULL OR stream_offset = total_size)
                   RETURNING *""",
                meta.file_id,
                meta.token,
                now,
                now - lease_seconds,
            )
        return None if r is None else upload_row(r)

    async def renew_claim(self, meta: UploadMeta) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET claimed_at = $3
                   WHERE file_id = $1 AND token = $2 AND status = 'completing'""",
                meta.file_id,
                meta.token,
                time.time(),
            )

    async def release_claim(self, meta: UploadMeta) -> None:
        """A completion failed: let the next chunk or sweep try again at once."""
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET status = 'uploading', claimed_at = NULL
                   WHERE file_id = $1 AND token = $2 AND status = 'completing'""",
                meta.file_id,
                meta.token,
            )

    async def claim_writer(
        self, meta: UploadMeta, writer: str, lease_seconds: float
    ) -> UploadRow | None:
        """Become the upload's one writer, unless a live one is; the upload as it is then."""
        now = time.time()
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                """UPDATE chunkserver_uploads SET stream_writer = $3, stream_writer_until = $4
                   WHERE file_id = $1 AND token = $2 AND status = 'uploading'
                     AND (stream_writer IS NULL OR stream_writer_until < $5)
                   RETURNING *""",
                meta.file_id,
                meta.token,
                writer,
                now + lease_seconds,
                now,
            )
        return None if r is None else upload_row(r)

    async def renew_writer(self, meta: UploadMeta, writer: str, lease_seconds: float) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET stream_writer_until = $4
                   WHERE file_id = $1 AND token = $2 AND stream_writer = $3""",
                meta.file_id,
                meta.token,
                writer,
                time.time() + lease_seconds,
            )

    async def release_writer(self, meta: UploadMeta, writer: str) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET stream_writer = NULL
                   WHERE file_id = $1 AND token = $2 AND stream_writer = $3""",
                meta.file_id,
                meta.token,
                writer,
            )

    async def commit_stream(
        self,
        meta: UploadMeta,
        writer: str,
        before: Stream,
        after: Stream,
        parts: list[ChunkRow],
    ) -> UploadRow | None:
        """Record a PATCH: its parts, the new offset, CRC and tail, in one transaction, and
        end the writer's lease; None when this writer lost the upload (removed, taken)."""
        async with self.pool.connection() as db, db.transaction():
            r = await db.fetchrow(
                """UPDATE chunkserver_uploads SET stream_offset = $5, stream_crc = $6,
                       stream_tail = $7, total_chunks = total_chunks + $8,
                       last_activity = $9, stream_writer = NULL
                   WHERE file_id = $1 AND token = $2 AND stream_writer = $3
                     AND stream_offset = $4 AND status = 'uploading'
                   RETURNING *""",
                meta.file_id,
                meta.token,
                writer,
                before.offset,
                after.offset,
                to_signed(after.crc),
                json.dumps([list(piece) for piece in after.tail]),
                len(parts),
                time.time(),
            )
            if r is None:
                return None
            await db.executemany(
                """INSERT INTO chunkserver_chunks (file_id, token, idx, length, crc, etag)
                   VALUES ($1, $2, $3, $4, $5, $6)""",
                [
                    (meta.file_id, meta.token, p.index, p.length, to_signed(p.crc), p.etag)
                    for p in parts
                ],
            )
        return upload_row(r)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadRow | None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET total_size = $3
                   WHERE file_id = $1 AND token = $2 AND total_size IS NULL""",
                meta.file_id,
                meta.token,
                length,
            )
        return await self.uploads.get(meta.file_id)

    async def declare_digest(self, meta: UploadMeta, sha256: str) -> UploadRow | None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET repr_sha256 = $3
                   WHERE file_id = $1 AND token = $2 AND repr_sha256 IS NULL""",
                meta.file_id,
                meta.token,
                sha256,
            )
        return await self.uploads.get(meta.file_id)

    async def forget_chunk(self, meta: UploadMeta, index: int, unless_etag: str) -> None:
        """A part was overwritten by bytes that were then refused: its chunk is missing."""
        async with self.pool.connection() as db:
            await db.execute(
                """DELETE FROM chunkserver_chunks WHERE file_id = $1 AND token = $2
                   AND idx = $3 AND etag IS DISTINCT FROM $4""",
                meta.file_id,
                meta.token,
                index,
                unless_etag,
            )

    async def mark_completed(self, meta: UploadMeta, record: CompletedUpload) -> bool:
        """Record the completion and forget the chunks; False when the upload was removed."""
        async with self.pool.connection() as db, db.transaction():
            done = await db.fetchval(
                """UPDATE chunkserver_uploads SET status = 'completed', size = $3,
                       crc64nvme = $4, sha256 = $5, completed_at = $6, claimed_at = NULL
                   WHERE file_id = $1 AND token = $2 AND status = 'completing'
                   RETURNING file_id""",
                meta.file_id,
                meta.token,
                record.size,
                record.crc64nvme,
                record.sha256,
                record.completed_at,
            )
            for table in ("chunkserver_chunks", "chunkserver_parts"):
                await db.execute(
                    f"DELETE FROM {table} WHERE file_id = $1 AND token = $2",
                    meta.file_id,
                    meta.token,
                )
        return done is not None
