"""The state of every upload of the S3 backend, in PostgreSQL, shared by every host.

Each step that two hosts could race on is one atomic statement: an upload is created once
(`INSERT ... ON CONFLICT DO NOTHING`), its completion is claimed once (`UPDATE ... WHERE
status = 'uploading' RETURNING`), an expiry removes a row once (`DELETE ... RETURNING`). No
lock is held across a request to the object store.

An upload's row keeps its S3 multipart UploadId; a chunk's row says where its bytes are: a
part of that upload (its ETag) or a staging object (its key), with its length and CRC.

A tus upload's row also keeps its offset, the CRC of its bytes so far and its tail (the
staged pieces not yet in a part), and a writer's lease: one PATCH at a time across hosts.
Its chunk rows are its parts (index = part number - 1), and its total_chunks counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import asyncpg

from .errors import StoreUnavailable
from .model import CompletedUpload, UploadMeta

SCHEMA_LOCK = 0x63686B73  # pg_advisory_xact_lock key: one host migrates at a time

# Numbered migrations (chunkserver/migrations/NNNN_name.sql), applied in order, each once, by
# one host at a time, each recorded in chunkserver_schema. A host that finds the database at
# the newest version runs no DDL at all: an ALTER TABLE takes an exclusive lock and would
# deadlock with the hosts already serving.
MIGRATIONS_DIR = resources.files(__package__) / "migrations"


def _migrations() -> tuple[tuple[int, str], ...]:
    found = sorted(
        (int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8"))
        for entry in MIGRATIONS_DIR.iterdir()
        if entry.name.endswith(".sql")
    )
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("chunkserver/migrations/*.sql must be numbered 0001, 0002, ...")
    return tuple(found)


MIGRATIONS = _migrations()
SCHEMA_VERSION = MIGRATIONS[-1][0]


@dataclass(frozen=True, slots=True)
class UploadRow:
    meta: UploadMeta
    status: str  # uploading | completing | completed
    direct: bool | None  # chunks are their own parts; None until the first chunk decides
    object_key: str
    upload_id: str
    last_activity: float
    claimed_at: float | None
    completed: CompletedUpload | None
    stream: Stream | None = None  # a tus upload's


@dataclass(frozen=True, slots=True)
class Stream:
    """A tus upload's state: `tail` holds the staged pieces past the last part, as
    (key, length, crc), which the next part starts with."""

    offset: int
    crc: int
    tail: tuple[tuple[str, int, int], ...]

    @property
    def tail_bytes(self) -> int:
        return sum(length for _, length, _ in self.tail)


@dataclass(frozen=True, slots=True)
class PartRow:
    """A part gathered from staged chunks first..last while the upload went on."""

    number: int
    first: int
    last: int
    sources: str  # the staging keys it was built from, in order
    etag: str | None


@dataclass(frozen=True, slots=True)
class ChunkRow:
    index: int
    length: int
    crc: int
    etag: str | None
    staging_key: str | None


def _to_signed(crc: int) -> int:
    return crc - (1 << 64) if crc >= 1 << 63 else crc


def _to_unsigned(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _upload_row(r: Mapping[str, Any]) -> UploadRow:
    meta = UploadMeta(
        file_id=r["file_id"],
        filename=r["filename"],
        total_chunks=r["total_chunks"],
        total_size=r["total_size"],
        created_at=r["created_at"],
        token=r["token"],
        chunk_size=r["chunk_size"],
        chunk_size_declared=r["chunk_size_declared"],
        metadata=_metadata(r.get("metadata")),
        protocol=r.get("protocol") or "chunks",
        concat=r.get("concat"),
    )
    completed = None
    if r["status"] == "completed":
        completed = CompletedUpload.of(
            meta,
            size=r["size"],
            crc64nvme=r["crc64nvme"],
            sha256=r["sha256"],
            completed_at=r["completed_at"],
        )
    stream = None
    if r.get("stream_offset") is not None:
        tail = json.loads(r["stream_tail"] or "[]")
        stream = Stream(
            r["stream_offset"],
            _to_unsigned(r["stream_crc"]),
            tuple((key, length, crc) for key, length, crc in tail),
        )
    return UploadRow(
        meta,
        r["status"],
        r["direct"],
        r["object_key"],
        r["s3_upload_id"],
        r["last_activity"],
        r["claimed_at"],
        completed,
        stream,
    )


def _metadata(text: str | None) -> dict[str, str] | None:
    return None if text is None else dict(json.loads(text))


def _chunk_row(r: asyncpg.Record) -> ChunkRow:
    return ChunkRow(r["idx"], r["length"], _to_unsigned(r["crc"]), r["etag"], r["staging_key"])


# What a database that cannot be reached, or went away mid-operation, raises. asyncpg's
# InternalClientError ("cannot switch to state ...") is a connection left mid-operation by
# such a failure: the connection is dropped (see UploadState._db), the request answers 503.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,
)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """A database that cannot be reached (or is restarting) answers 503, never 500."""
    try:
        yield
    except UNREACHABLE as e:
        raise StoreUnavailable(f"the database cannot be reached ({type(e).__name__})") from e


async def schema_version(db: asyncpg.Connection) -> int:
    if await db.fetchval("SELECT to_regclass('chunkserver_schema')") is None:
        return 0
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM chunkserver_schema"))


async def migrate(db: asyncpg.Connection) -> None:
    """Bring the database to SCHEMA_VERSION; read-only when it is there already."""
    if await schema_version(db) >= SCHEMA_VERSION:
        return
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS chunkserver_schema (version integer NOT NULL)")
        version = await schema_version(db)
        for number, statements in MIGRATIONS:
            if number > version:
                await db.execute(statements)
                await db.execute("INSERT INTO chunkserver_schema (version) VALUES ($1)", number)


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """No reset query when a connection goes back to the pool: this code keeps no session
    state (its one advisory lock is a transaction's), and the query cost a round trip."""

    def get_reset_query(self) -> str:
        return ""


class UploadState:
    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            await self._open()
        except asyncpg.PostgresError as e:  # a wrong password or database name, say
            raise StoreUnavailable(f"the database refused the connection: {e}") from e

    async def _open(self) -> None:
        with translated_errors():
            self._pool = await asyncpg.create_pool(
                self.url,
                # No floor: asyncpg would restore one with a traceback a second while the
                # database is down; a request opens what it needs.
                min_size=0,
                max_size=20,
                command_timeout=30,
                timeout=10,
                connection_class=_Connection,
            )
            async with self._pool.acquire() as db:
                await migrate(db)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    def connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """A pooled connection whose errors answer 503, for the outbox's statements."""
        return self._db()

    @contextlib.asynccontextmanager
    async def _db(self) -> AsyncIterator[asyncpg.Connection]:
        assert self._pool is not None, "UploadState.open() first"
        with translated_errors():
            async with self._pool.acquire() as db:
                try:
                    yield db
                except (*UNREACHABLE, asyncio.CancelledError):
                    # Cut off mid-operation (the database went away, a timeout, a cancelled
                    # request): never hand this connection to another request.
                    if not db.is_closed():
                        db.terminate()
                    raise

    async def is_reachable(self) -> bool:
        try:
            async with self._db() as db:
                await db.fetchval("SELECT 1")
        except StoreUnavailable:
            return False
        return True

    # -- uploads --

    async def get(self, file_id: str) -> UploadRow | None:
        async with self._db() as db:
            r = await db.fetchrow("SELECT * FROM chunkserver_uploads WHERE file_id = $1", file_id)
        return None if r is None else _upload_row(r)

    async def insert(
        self, meta: UploadMeta, object_key: str, upload_id: str, direct: bool | None
    ) -> bool:
        """Create the upload unless one of its id exists; whether this call created it."""
        async with self._db() as db:
            r = await db.fetchrow(
                """INSERT INTO chunkserver_uploads (file_id, token, filename, total_chunks,
                       total_size, chunk_size, chunk_size_declared, direct, created_at,
                       last_activity, object_key, s3_upload_id, metadata, protocol, concat,
                       stream_offset, stream_crc)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11, $12, $13, $14,
                       $15, $15)
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
                meta.concat,
                0 if meta.is_stream else None,
            )
        return r is not None

    async def adopt_metadata(self, meta: UploadMeta, metadata: dict[str, str]) -> UploadRow | None:
        """Take the client's metadata when the upload has none yet."""
        async with self._db() as db:
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
        async with self._db() as db:
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
        async with self._db() as db:
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
        async with self._db() as db:
            r = await db.fetchrow(
                """UPDATE chunkserver_uploads SET receivers = receivers + 1
                   WHERE file_id = $1 RETURNING *""",
                file_id,
            )
        return None if r is None else _upload_row(r)

    async def remove_if_empty(self, meta: UploadMeta) -> UploadRow | None:
        """Remove an upload whose creating request failed: only while it holds no chunk and
        no request but (at most) that one has begun receiving into it."""
        async with self._db() as db:
            r = await db.fetchrow(
                """DELETE FROM chunkserver_uploads u WHERE file_id = $1 AND token = $2
                     AND status = 'uploading' AND receivers <= 1
                     AND NOT EXISTS (SELECT 1 FROM chunkserver_chunks c
                                     WHERE c.file_id = u.file_id AND c.token = u.token)
                   RETURNING *""",
                meta.file_id,
                meta.token,
            )
        return None if r is None else _upload_row(r)

    async def remove(self, file_id: str) -> UploadRow | None:
        async with self._db() as db:
            r = await db.fetchrow(
                "DELETE FROM chunkserver_uploads WHERE file_id = $1 RETURNING *", file_id
            )
        return None if r is None else _upload_row(r)

    async def remove_expired(self, older_than: float) -> list[UploadRow]:
        async with self._db() as db:
            rows = await db.fetch(
                """DELETE FROM chunkserver_uploads
                   WHERE status = 'uploading' AND last_activity < $1 RETURNING *""",
                older_than,
            )
        return [_upload_row(r) for r in rows]

    async def ready_to_finish(self, claimed_before: float) -> list[UploadRow]:
        """Uploads with every chunk stored and no live completion: a host died before or
        during it."""
        async with self._db() as db:
            rows = await db.fetch(
                """SELECT * FROM chunkserver_uploads u
                   WHERE (status = 'uploading' OR (status = 'completing' AND claimed_at < $1))
                     AND total_chunks = (SELECT count(*) FROM chunkserver_chunks c
                                         WHERE c.file_id = u.file_id AND c.token = u.token)
                     AND (stream_offset IS NULL OR stream_offset = total_size)""",
                claimed_before,
            )
        return [_upload_row(r) for r in rows]

    async def in_progress(self) -> list[str]:
        async with self._db() as db:
            rows = await db.fetch(
                "SELECT file_id FROM chunkserver_uploads WHERE status <> 'completed'"
            )
        return [r["file_id"] for r in rows]

    async def live_uploads(self) -> tuple[set[str], set[tuple[str, str]]]:
        """The S3 UploadIds and (file_id, token) pairs of every upload not yet completed."""
        async with self._db() as db:
            rows = await db.fetch(
                """SELECT file_id, token, s3_upload_id FROM chunkserver_uploads
                   WHERE status <> 'completed'"""
            )
        return {r["s3_upload_id"] for r in rows}, {(r["file_id"], r["token"]) for r in rows}

    # -- chunks --

    async def chunks(self, meta: UploadMeta) -> list[ChunkRow]:
        async with self._db() as db:
            rows = await db.fetch(
                """SELECT * FROM chunkserver_chunks WHERE file_id = $1 AND token = $2
                   ORDER BY idx""",
                meta.file_id,
                meta.token,
            )
        return [_chunk_row(r) for r in rows]

    async def stored_indexes(self, meta: UploadMeta) -> list[int]:
        async with self._db() as db:
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
        async with self._db() as db:
            r = await db.fetchrow(
                "SELECT * FROM chunkserver_record_chunk($1, $2, $3, $4, $5, $6, $7, $8, $9, "
                "$10, $11)",
                meta.file_id,
                meta.token,
                chunk.index,
                chunk.length,
                _to_signed(chunk.crc),
                chunk.etag,
                chunk.staging_key,
                None if is_last else chunk.length,
                time.time(),
                *run,
            )
        if r["o_upload"] is None:
            return None, 0, None, 0
        row = _upload_row(json.loads(r["o_upload"]))
        replaced = r["o_replaced"]
        if replaced == chunk.staging_key:
            replaced = None
        return row, int(r["o_stored"]), replaced, int(r["o_run_stored"])

    # -- parts gathered ahead of the completion --

    async def claim_group(
        self, meta: UploadMeta, number: int, first: int, last: int
    ) -> list[ChunkRow] | None:
        """Claim the building of part `number` from chunks first..last once they are all
        stored; their rows, or None when they are not all there or another claimed it."""
        async with self._db() as db, db.transaction():
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
        return None if claimed is None else [_chunk_row(r) for r in rows]

    async def record_part(self, meta: UploadMeta, part: PartRow) -> None:
        async with self._db() as db:
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
        async with self._db() as db:
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

    # -- completion --

    async def claim_completion(self, meta: UploadMeta, lease_seconds: float) -> UploadRow | None:
        """Claim the completion when every chunk is stored and nobody (alive) completes it."""
        now = time.time()
        async with self._db() as db:
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
        return None if r is None else _upload_row(r)

    async def renew_claim(self, meta: UploadMeta) -> None:
        async with self._db() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET claimed_at = $3
                   WHERE file_id = $1 AND token = $2 AND status = 'completing'""",
                meta.file_id,
                meta.token,
                time.time(),
            )

    async def release_claim(self, meta: UploadMeta) -> None:
        """A completion failed: let the next chunk or sweep try again at once."""
        async with self._db() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET status = 'uploading', claimed_at = NULL
                   WHERE file_id = $1 AND token = $2 AND status = 'completing'""",
                meta.file_id,
                meta.token,
            )

    # -- tus uploads --

    async def claim_writer(
        self, meta: UploadMeta, writer: str, lease_seconds: float
    ) -> UploadRow | None:
        """Become the upload's one writer, unless a live one is; the upload as it is then."""
        now = time.time()
        async with self._db() as db:
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
        return None if r is None else _upload_row(r)

    async def renew_writer(self, meta: UploadMeta, writer: str, lease_seconds: float) -> None:
        async with self._db() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET stream_writer_until = $4
                   WHERE file_id = $1 AND token = $2 AND stream_writer = $3""",
                meta.file_id,
                meta.token,
                writer,
                time.time() + lease_seconds,
            )

    async def release_writer(self, meta: UploadMeta, writer: str) -> None:
        async with self._db() as db:
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
        async with self._db() as db, db.transaction():
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
                _to_signed(after.crc),
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
                    (meta.file_id, meta.token, p.index, p.length, _to_signed(p.crc), p.etag)
                    for p in parts
                ],
            )
        return _upload_row(r)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadRow | None:
        async with self._db() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET total_size = $3
                   WHERE file_id = $1 AND token = $2 AND total_size IS NULL""",
                meta.file_id,
                meta.token,
                length,
            )
        return await self.get(meta.file_id)

    async def forget_chunk(self, meta: UploadMeta, index: int, unless_etag: str) -> None:
        """A part was overwritten by bytes that were then refused: its chunk is missing."""
        async with self._db() as db:
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
        async with self._db() as db, db.transaction():
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
