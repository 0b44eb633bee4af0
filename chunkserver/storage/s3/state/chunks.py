"""Chunk rows, and the parts gathered from them ahead of the completion."""

from __future__ import annotations

import json
import time

from ....model import UploadMeta
from .pool import StatePool
from .rows import ChunkRow, PartRow, UploadRow, chunk_row, to_signed, upload_row


class ChunkStatements:
    """Chunk rows, and the parts gathered from them ahead of the completion."""

    def __init__(self, pool: StatePool) -> None:
        self.pool = pool

    async def rows(self, meta: UploadMeta) -> list[ChunkRow]:
        async with self.pool.connection() as db:
            rows = await db.fetch(
                """SELECT * FROM chunkserver_chunks WHERE file_id = $1 AND token = $2
                   ORDER BY idx""",
                meta.file_id,
                meta.token,
            )
        return [chunk_row(r) for r in rows]

    async def stored_indexes(self, meta: UploadMeta) -> list[int]:
        async with self.pool.connection() as db:
            rows = await db.fetch(
                "SELECT idx FROM chunkserver_chunks WHERE file_id = $1 AND token = $2",
                meta.file_id,
                meta.token,
            )
        return [r["idx"] for r in rows]

    async def record_chunk(
        self, meta: UploadMeta, chunk: ChunkRow, *, is_last: bool, run: tuple[int, int]
    ) -> tuple[UploadRow | None, int, str | None, int]:
        """Record a stored chunk: one call of `chunkserver_record_chunk` (one round trip, one
        transaction, the upload's row locked).

        Returns the upload as it is now (None: gone or begun again), how many chunks it has,
        the staging key this chunk replaced, and how many chunks of `run` (first, last
        index) are stored. A chunk of an upload that is completing or completed is not
        recorded.
        """
        async with self.pool.connection() as db:
            r = await db.fetchrow(
                "SELECT * FROM chunkserver_record_chunk($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                "$10, $11)",
                meta.file_id,
                meta.token,
                chunk.index,
                chunk.length,
                to_signed(chunk.crc),
                chunk.etag,
                chunk.staging_key,
                None if is_last else chunk.length,
                time.time(),
                *run,
            )
        if r["o_upload"] is None:
            return None, 0, None, 0
        row = upload_row(json.loads(r["o_upload"]))
        replaced = r["o_replaced"]
        if replaced == chunk.staging_key:
            replaced = None
        return row, int(r["o_stored"]), replaced, int(r["o_run_stored"])

    async def claim_group(
        self, meta: UploadMeta, number: int, first: int, last: int
    ) -> list[ChunkRow] | None:
        """Claim the building of part `number` from chunks first..last once they are all
        stored; their rows, or None when they are not all there or another claimed it."""
        async with self.pool.connection() as db, db.transaction():
            rows = await db.fetch(
                """SELECT * FROM chunkserver_chunks WHERE file_id = $1 AND token = $2
                   AND idx BETWEEN $3 AND $4 ORDER BY idx""",
                meta.file_id,
                meta.token,
                first,
                last,
            )
            if len(rows) != last - first + 1:
                return None
            claimed = await db.fetchval(
                """INSERT INTO chunkserver_parts (file_id, token, part_number, first_idx,
                       last_idx)
                   SELECT $1, $2, $3, $4, $5 WHERE EXISTS (SELECT 1 FROM chunkserver_uploads
                       WHERE file_id = $1 AND token = $2 AND status = 'uploading')
                   ON CONFLICT DO NOTHING RETURNING part_number""",
                meta.file_id,
                meta.token,
                number,
                first,
                last,
            )
        return None if claimed is None else [chunk_row(r) for r in rows]

    async def record_part(self, meta: UploadMeta, part: PartRow) -> None:
        async with self.pool.connection() as db:
            await db.execute(
                """UPDATE chunkserver_parts SET sources = $6, etag = $7, first_idx = $4,
                       last_idx = $5
                   WHERE file_id = $1 AND token = $2 AND part_number = $3""",
                meta.file_id,
                meta.token,
                part.number,
                part.first,
                part.last,
                part.sources,
                part.etag,
            )

    async def parts(self, meta: UploadMeta) -> dict[int, PartRow]:
        async with self.pool.connection() as db:
            rows = await db.fetch(
                "SELECT * FROM chunkserver_parts WHERE file_id = $1 AND token = $2",
                meta.file_id,
                meta.token,
            )
        return {
            r["part_number"]: PartRow(
                r["part_number"], r["first_idx"], r["last_idx"], r["sources"], r["etag"]
            )
            for r in rows
        }
