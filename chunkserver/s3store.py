"""The S3 backend: the bytes in an S3-compatible object store, the state in PostgreSQL.

An upload is one S3 multipart upload of its final object, `<prefix>uploads/<id>/<filename>`.
How its chunks become parts is decided once, by the first chunk other than the last that
arrives (or by a declared `chunk_size`), and kept in the upload's row:

- direct, when chunks are of 5 MiB or more (S3's smallest part but the last): chunk N is
  part N + 1, its bytes streamed from the client's socket into the part as they arrive.
  Resending a chunk replaces its part, so retries are idempotent.
- gathered, when chunks are smaller (the seed client's 1 MiB): each chunk is stored as a
  staging object, `<prefix>staging/<id>/<token>/<index>.<random>`, and the completion
  streams runs of consecutive chunks of at least 5 MiB into one part each, a few at once,
  through a bounded buffer: a host's memory does not grow with the file.

The completion is claimed once in PostgreSQL, then CompleteMultipartUpload; the file's
CRC-64/NVME is combined from the chunks' CRCs. Nothing on the local disk outlives a request.

A tus upload is a stream: a PATCH's bytes go into parts of `_stream_part_bytes` (5 MiB, or
more when the part limit needs it), streamed from the socket with their length known from
Content-Length; what is too little for a part (a small PATCH) is staged as a tail piece that
the next part starts with. Concatenation joins completed uploads with UploadPartCopy: the
store copies, no byte passes through this host (small sources are streamed into one part).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import secrets
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from . import checksums
from .errors import (
    BadRequest,
    CompletionPending,
    OffsetMismatch,
    PayloadTooLarge,
    StorageFailure,
    StoreUnavailable,
    UploadConflict,
    UploadGone,
    UploadLocked,
)
from .meter import count_piece
from .model import (
    Committed,
    CompletedUpload,
    StoredObject,
    StreamProgress,
    SweepReport,
    UploadMeta,
    UploadProgress,
)
from .outbox import PostgresOutbox
from .s3objects import NoSuchUpload, ObjectStore, Settings
from .s3state import ChunkRow, PartRow, Stream, UploadRow, UploadState

log = logging.getLogger("chunkserver")

MiB = 1024 * 1024
MIN_PART_BYTES = 5 * MiB  # S3 refuses a smaller part other than the last (EntityTooSmall)
SPOOL_MEMORY_BYTES = 8 * MiB  # a spooled chunk past this goes to a scratch file
# A claimed completion is renewed every COMPLETION_RENEW_SECONDS while it runs; one not renewed
# for COMPLETION_LEASE_SECONDS (its host died) is taken over by the next chunk, status request
# or sweep that finds it: within 30 s of the death (PROTOCOL.md, Guarantees 3).
COMPLETION_LEASE_SECONDS = 20.0
COMPLETION_RENEW_SECONDS = 5.0
# How long a chunk waits for a completion that a live host is running before it answers 503.
COMPLETION_WAIT_SECONDS = 5.0
GATHER_CONCURRENCY = 4
STAGED_COPIES_BYTES = 64 * MiB  # local copies of staged chunks, for gathering
STAGED_COPIES_FILES = 64  # and at most this many of them: each holds a descriptor open
ORPHAN_GRACE_SECONDS = 3600.0
WAIT_STEP_SECONDS = 0.05
# A tus writer's lease, renewed while its PATCH streams: a host that dies mid-PATCH holds
# the upload for at most this long (the next PATCH gets 423, which tus clients retry).
WRITER_LEASE_SECONDS = 20.0
WRITER_RENEW_SECONDS = 5.0
MAX_COPY_PART_BYTES = 5 * 1024 * MiB  # UploadPartCopy's largest part


class Spool:
    """A chunk's bytes held until their upload's layout is known: in memory up to
    SPOOL_MEMORY_BYTES, past that in an unlinked scratch file (nothing outlives it)."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = scratch
        self._memory = bytearray()
        self._file: IO[bytes] | None = None
        self.length = 0

    def write(self, piece: memoryview) -> None:
        if self._file is None and len(self._memory) + len(piece) <= SPOOL_MEMORY_BYTES:
            self._memory += piece
        else:
            if self._file is None:
                self._file = tempfile.TemporaryFile(dir=self._scratch)  # noqa: SIM115
                self._file.write(self._memory)
                self._memory = bytearray()
            self._file.write(piece)
        self.length += len(piece)

    def payload(self) -> AsyncIterator[bytes | memoryview]:
        """The bytes, to send with their length: a view of the memory (no copy), or the
        scratch file read back piece by piece."""
        if self._file is None:
            return self._view()
        return self._read_file()

    async def _view(self) -> AsyncIterator[memoryview]:
        yield memoryview(self._memory)

    async def views(self) -> AsyncIterator[memoryview]:
        """The bytes as memoryviews, as a request body gives them."""
        async for piece in self.payload():
            yield piece if isinstance(piece, memoryview) else memoryview(piece)

    def in_memory(self) -> bytearray | None:
        return None if self._file is not None else self._memory

    async def _read_file(self) -> AsyncIterator[bytes]:
        assert self._file is not None
        self._file.seek(0)
        while piece := await asyncio.to_thread(self._file.read, MiB):
            yield piece

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._memory = bytearray()


class StagedCopies:
    """Copies of the chunks this process staged lately, in unlinked scratch files (the page
    cache), so that gathering a run into a part reads them here instead of from the store:
    one pass over the bytes through the store less. Only a cache: a copy may be missing
    (another host staged the chunk, or it was evicted, or the process restarted), and the
    store is read then. Nothing of it outlives the process, and the copies of an upload that
    ended are dropped with it."""

    def __init__(self, scratch: Path, capacity_bytes: int, capacity_files: int) -> None:
        self._scratch = scratch
        self._capacity = capacity_bytes
        self._capacity_files = capacity_files
        self._copies: OrderedDict[str, tuple[IO[bytes], int]] = OrderedDict()
        self._bytes = 0

    def keep(self, key: str, data: bytearray) -> None:
        if len(data) > self._capacity // 4:
            return
        copy = tempfile.TemporaryFile(dir=self._scratch)  # noqa: SIM115 - kept open
        copy.write(data)
        self._copies[key] = (copy, len(data))
        self._bytes += len(data)
        while self._bytes > self._capacity or len(self._copies) > self._capacity_files:
            _, (oldest, length) = self._copies.popitem(last=False)
            oldest.close()
            self._bytes -= length

    def forget(self, prefix: str) -> None:
        """Drop the copies of the keys under `prefix` (an upload's staging folder)."""
        for key in [k for k in self._copies if k.startswith(prefix)]:
            copy, length = self._copies.pop(key)
            copy.close()
            self._bytes -= length

    def take(self, key: str) -> IO[bytes] | None:
        """The copy of `key`, no longer kept (the caller closes it), or None."""
        found = self._copies.pop(key, None)
        if found is None:
            return None
        self._bytes -= found[1]
        return found[0]

    def clear(self) -> None:
        for copy, _ in self._copies.values():
            copy.close()
        self._copies.clear()
        self._bytes = 0


@dataclass(eq=False)
class S3PendingChunk:
    """A chunk received: its bytes in a part, a staging object, or still in the spool."""

    length: int = 0
    crc: int = 0
    digest: hashlib._Hash | None = None
    meta: UploadMeta | None = None
    index: int | None = None
    etag: str | None = None
    staging_key: str | None = None
    spool: Spool | None = None
    row: UploadRow | None = None  # the upload's row when the bytes were placed
    failure: BaseException | None = field(default=None, repr=False)

    def sha256_hex(self) -> str | None:
        return None if self.digest is None else self.digest.hexdigest()


class ShortBody(Exception):
    """The PATCH body ended before its Content-Length: the client went away."""


class BodySlices:
    """A PATCH body cut into slices of known lengths, with the CRC of each slice."""

    def __init__(
        self, body: AsyncIterator[memoryview], on_piece: Callable[[memoryview], None] | None
    ) -> None:
        self.body = body
        self.on_piece = on_piece
        self.pending: memoryview | None = None  # the rest of a piece cut by a slice's end
        self.crc = 0  # of the last slice
        self.short = False

    async def take(self, size: int) -> AsyncIterator[memoryview]:
        """The next `size` bytes; raises ShortBody when the body ends before."""
        self.crc = 0
        left = size
        while left > 0:
            piece = self.pending
            self.pending = None
            if piece is None:
                try:
                    piece = await anext(self.body)
                except StopAsyncIteration:
                    self.short = True
                    raise ShortBody() from None
                if self.on_piece is not None:
                    self.on_piece(piece)
            if len(piece) > left:
                piece, self.pending = piece[:left], piece[left:]
            self.crc = checksums.crc64nvme(piece, self.crc)
            left -= len(piece)
            yield piece


@dataclass(eq=False)
class S3PendingBytes:
    """A PATCH's bytes in parts and staged tail pieces, not yet recorded."""

    row: UploadRow
    writer: str  # the writer's lease in the upload's row
    before: Stream
    parts: list[ChunkRow] = field(default_factory=list)
    tail: list[tuple[str, int, int]] = field(default_factory=list)  # new staged pieces
    took_tail: bool = False  # the first part holds the earlier tail pieces
    length: int = 0  # the body's bytes in parts and tail pieces
    crc: int = 0  # theirs

    def keep(self, size: int, crc: int) -> None:
        self.crc = checksums.combine_two(self.crc, crc, size)
        self.length += size


class S3Store:
    keeps_bytes_locally = False

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        *,
        prefix: str = "",
        scratch: Path,
        sha256: bool = False,
        max_parts: int = 10_000,
        max_file_bytes: int = 100 * 1024 * MiB,
    ) -> None:
        self.objects = ObjectStore(settings)
        self.state = UploadState(database_url)
        self.prefix = prefix
        self.scratch = scratch
        self.sha256 = sha256
        self.max_parts = max_parts
        self.max_file_bytes = max_file_bytes
        self.lease_seconds = COMPLETION_LEASE_SECONDS
        self._background: set[asyncio.Task[None]] = set()
        self._gathering = asyncio.Semaphore(GATHER_CONCURRENCY)  # parts built at once
        self.copies = StagedCopies(scratch, STAGED_COPIES_BYTES, STAGED_COPIES_FILES)

    async def open(self) -> None:
        self.scratch.mkdir(parents=True, exist_ok=True)
        try:
            await self.objects.open()
            if not await self.objects.bucket_is_reachable():
                raise StoreUnavailable(
                    f"the bucket {self.objects.bucket!r} cannot be reached at "
                    f"{self.objects.settings.endpoint_url or 'AWS S3'}"
                )
            await self.state.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task
        self.copies.clear()
        await self.state.close()
        await self.objects.close()

    # -- names --

    def outbox(self) -> PostgresOutbox:
        return PostgresOutbox(self.state)

    def location_of(self, file_id: str, filename: str) -> str:
        return self.object_key(file_id, filename)

    def object_key(self, file_id: str, filename: str) -> str:
        return f"{self.prefix}uploads/{file_id}/{filename}"

    def _staging_prefix(self, meta: UploadMeta) -> str:
        return f"{self.prefix}staging/{meta.file_id}/{meta.token}/"

    def _staging_key(self, meta: UploadMeta, index: int) -> str:
        return f"{self._staging_prefix(meta)}{index:06d}.{secrets.token_hex(6)}"

    # -- looking up --

    async def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        row = await self.state.get(file_id)
        if row is None:
            return None
        return row.completed or row.meta

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        row = await self.state.get(file_id)
        if row is None:
            return None
        if row.completed is not None:
            return row.completed
        if row.status == "completing":
            taken = await self._take_over(row.meta)
            if taken is not None:
                return taken
        stored = await self.state.stored_indexes(row.meta)
        return UploadProgress(row.meta, frozenset(stored), row.last_activity)

    async def download(self, file_id: str) -> tuple[StoredObject, CompletedUpload] | None:
        row = await self.state.get(file_id)
        if row is None or row.completed is None:
            return None
        key = row.object_key
        opener = functools.partial(self.objects.get, key)
        return StoredObject(key, row.completed.size, opener), row.completed

    async def uploads_in_progress(self) -> list[str]:
        return await self.state.in_progress()

    # -- beginning and abandoning --

    def _check_fits(self, total_chunks: int, chunk_size: int) -> None:
        """Refuse (413) an upload whose parts would exceed the store's part limit."""
        if chunk_size >= MIN_PART_BYTES:
            parts = total_chunks
        else:
            parts = math.ceil(total_chunks / math.ceil(MIN_PART_BYTES / max(chunk_size, 1)))
        if parts > self.max_parts:
            raise PayloadTooLarge(
                f"Upload needs {parts} parts of the object store, more than its limit of "
                f"{self.max_parts} (s3_max_parts): use larger chunks"
            )

    async def begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        while True:
            row = await self.state.get(proposed.file_id)
            if row is not None:
                if row.completed is not None:
                    return row.completed, False
                if row.status == "completing":
                    try:
                        completed = await self._completed_elsewhere(row.meta)
                    except UploadGone:
                        continue  # removed meanwhile: begin it again
                    if completed is None:
                        continue  # that completion failed: the upload takes chunks again
                    return completed, False
                cs = proposed.chunk_size
                if row.meta.chunk_size is None and cs is not None:
                    self._check_fits(row.meta.total_chunks, cs)
                    declared = await self.state.declare_chunk_size(
                        row.meta, cs, cs >= MIN_PART_BYTES
                    )
                    if declared is not None:
                        row = declared
                if row.meta.metadata is None and proposed.metadata is not None:
                    adopted = await self.state.adopt_metadata(row.meta, proposed.metadata)
                    if adopted is not None:
                        row = adopted
                return row.meta, False
            direct: bool | None = None
            if proposed.total_chunks == 1:
                direct = True  # the only chunk is the last part, whatever its size
            elif proposed.chunk_size is not None:
                self._check_fits(proposed.total_chunks, proposed.chunk_size)
                direct = proposed.chunk_size >= MIN_PART_BYTES
            key = self.object_key(proposed.file_id, proposed.filename)
            upload_id = await self.objects.create_multipart(key)
            if await self.state.insert(proposed, key, upload_id, direct):
                return proposed, True
            await self.objects.abort(key, upload_id)  # another request created it first

    async def abandon(self, meta: UploadMeta) -> None:
        row = await self.state.remove_if_empty(meta)
        if row is not None:
            await self._clean(row)

    # -- receiving a chunk --

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: int,
        want_sha256: bool,
        length_hint: int | None = None,
    ) -> S3PendingChunk:
        row = await self.state.join(meta.file_id)
        if row is None or row.meta.token != meta.token or row.status != "uploading":
            raise UploadGone()
        meta = row.meta
        received = S3PendingChunk(meta=meta, index=index, row=row)
        if want_sha256:
            received.digest = hashlib.sha256()
        last = meta.is_last(index)
        limit = meta.chunk_size if meta.chunk_size_declared and not last else None
        direct = row.direct
        if direct is None and not last and length_hint is not None:
            direct = await self._fix_layout(meta, length_hint)
        if direct and length_hint is not None and (last or length_hint >= MIN_PART_BYTES):
            # The common large-chunk case: straight from the socket into the part.
            await self._stream_part(received, body, length_hint, max_bytes, limit)
            return received
        spool = Spool(self.scratch)
        try:
            await self._fill(received, spool, body, max_bytes, limit)
            await self._place(received, spool, row, index, direct)
        finally:
            spool.close()
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: int, want_sha256: bool
    ) -> S3PendingChunk:
        received = S3PendingChunk(digest=hashlib.sha256() if want_sha256 else None)
        received.spool = Spool(self.scratch)
        try:
            await self._fill(received, received.spool, body, max_bytes, None)
        except BaseException:
            received.spool.close()
            raise
        return received

    def _count(
        self, received: S3PendingChunk, piece: memoryview, max_bytes: int, limit: int | None
    ) -> None:
        count_piece(received, piece, max_bytes)
        if limit is not None and received.length > limit:
            raise UploadConflict(
                f"Chunk {received.index} is larger than the chunk_size ({limit} bytes) of "
                "this upload"
            )

    async def _fill(
        self,
        received: S3PendingChunk,
        spool: Spool,
        body: AsyncIterator[memoryview],
        max_bytes: int,
        limit: int | None,
    ) -> None:
        async for piece in body:
            self._count(received, piece, max_bytes, limit)
            spool.write(piece)

    async def _stream_part(
        self,
        received: S3PendingChunk,
        body: AsyncIterator[memoryview],
        expected: int,
        max_bytes: int,
        limit: int | None,
    ) -> None:
        assert received.row is not None and received.index is not None
        row, index = received.row, received.index

        async def counted() -> AsyncIterator[memoryview]:
            try:
                async for piece in body:
                    self._count(received, piece, max_bytes, limit)
                    if received.length > expected:
                        raise _length_mismatch()
                    yield piece
                if received.length != expected:
                    raise _length_mismatch()
            except BaseException as e:
                received.failure = e  # the HTTP client may wrap it: kept to raise as is
                raise

        try:
            received.etag = await self.objects.put_part(
                row.object_key, row.upload_id, index + 1, counted(), expected
            )
        except NoSuchUpload:
            raise _gone_midway() from None
        except BaseException:
            if received.failure is not None:
                raise received.failure from None
            raise

    async def _fix_layout(self, meta: UploadMeta, chunk_length: int) -> bool:
        """Decide from a chunk other than the last whether chunks are parts (once)."""
        self._check_fits(meta.total_chunks, chunk_length)
        direct = await self.state.fix_layout(meta, chunk_length >= MIN_PART_BYTES)
        if direct is None:
            raise UploadGone()
        return direct

    async def _place(
        self,
        received: S3PendingChunk,
        spool: Spool,
        row: UploadRow,
        index: int,
        direct: bool | None,
    ) -> None:
        """Send spooled bytes to their place: the chunk's part, or a staging object.

        The body is read by now: an upload that ended meanwhile is a conflict, not
        UploadGone (which would have the service read the body again)."""
        try:
            await self._place_spooled(received, spool, row, index, direct)
        except (UploadGone, NoSuchUpload):
            raise _gone_midway() from None

    async def _place_spooled(
        self,
        received: S3PendingChunk,
        spool: Spool,
        row: UploadRow,
        index: int,
        direct: bool | None,
    ) -> None:
        meta = row.meta
        last = meta.is_last(index)
        if direct is None and not last:
            direct = await self._fix_layout(meta, received.length)
        if direct and not last and received.length < MIN_PART_BYTES:
            raise UploadConflict(
                f"Chunk {index} has {received.length} bytes: with the s3 storage, every chunk "
                f"but the last of an upload of chunks of 5 MiB or more must have 5 MiB or more"
            )
        if direct:
            received.etag = await self.objects.put_part(
                row.object_key, row.upload_id, index + 1, spool.payload(), received.length
            )
        else:
            key = self._staging_key(meta, index)
            await self.objects.put_object(key, spool.payload(), received.length)
            received.staging_key = key
            data = spool.in_memory()
            if data is not None:
                self.copies.keep(key, data)

    async def sha256_of(self, received: S3PendingChunk) -> str:
        digest = hashlib.sha256()
        if received.staging_key is not None:
            async for piece in self.objects.read_pieces(received.staging_key):
                digest.update(piece)
            return digest.hexdigest()
        if received.spool is not None:
            async for spooled in received.spool.payload():
                digest.update(spooled)
            return digest.hexdigest()
        raise BadRequest(
            "With the s3 storage, chunk_sha256 must come before a chunk of 5 MiB or more"
        )

    async def commit(
        self, received: S3PendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        if received.spool is not None:  # came before its fields: placed now
            spool, received.spool = received.spool, None
            try:
                row = await self.state.get(meta.file_id)
                if row is None or row.meta.token != meta.token or row.status != "uploading":
                    raise UploadGone()
                received.meta, received.index, received.row = row.meta, index, row
                await self._place(received, spool, row, index, row.direct)
            finally:
                spool.close()
        chunk = ChunkRow(index, received.length, received.crc, received.etag, received.staging_key)
        run = _run_of(meta, index) if received.staging_key is not None else None
        row, count, replaced, run_stored = await self.state.record_chunk(
            meta, chunk, is_last=meta.is_last(index), run=run or (-1, -1)
        )
        if row is None:
            await self.discard(received)
            if received.etag is not None and received.row is not None:
                # A part may land after its upload was aborted (S3 says so; Swift does):
                # abort again, which frees it.
                stale = received.row
                self._later(self.objects.abort(stale.object_key, stale.upload_id))
            raise UploadGone()
        if row.status != "uploading":
            await self.discard(received)
            completed = await self._completed_elsewhere(row.meta)
            if completed is None:  # the chunk was not stored: the client sends it again
                raise CompletionPending("The upload's completion failed; send this chunk again")
            return completed
        if replaced is not None:
            self._later(self.objects.delete([replaced]))
        if run is not None and run_stored == run[1] - run[0] + 1:
            self._later(self._gather_ahead(row, run))
        return Committed(row.meta, count, count == row.meta.total_chunks)

    async def _gather_ahead(self, row: UploadRow, run: tuple[int, int]) -> None:
        """Build the part of a run of staged chunks as soon as the run is stored, while the
        upload goes on, so that the completion only has the last run left to gather."""
        meta = row.meta
        first, last = run
        number = first // (last - first + 1) + 1
        group = await self.state.claim_group(meta, number, first, last)
        if group is None or any(c.length != meta.chunk_size for c in group):
            return
        etag = await self._build_part(row, number, group)
        await self.state.record_part(meta, PartRow(number, first, last, _sources(group), etag))

    async def discard(self, received: S3PendingChunk) -> None:
        if received.spool is not None:
            received.spool.close()
        if received.staging_key is not None:
            copy = self.copies.take(received.staging_key)
            if copy is not None:
                copy.close()
            self._later(self.objects.delete([received.staging_key]))
        elif received.etag is not None and received.meta is not None:
            # The part now holds these refused bytes: an earlier copy of the chunk no longer
            # counts, unless it was the same bytes.
            assert received.index is not None
            await self.state.forget_chunk(received.meta, received.index, received.etag)

    # -- completing --

    async def complete(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        claimed = await self.state.claim_completion(meta, self.lease_seconds)
        if claimed is None:
            row = await self.state.get(meta.file_id)
            if row is None or row.meta.token != meta.token:
                return None
            if row.completed is not None:
                return row.completed, False
            if row.status == "completing":
                completed = await self._completed_elsewhere(row.meta)
                return None if completed is None else (completed, False)
            return None  # chunks still missing
        return await self._complete_claimed(claimed), True

    async def _complete_claimed(self, claimed: UploadRow) -> CompletedUpload:
        renewal = asyncio.get_running_loop().create_task(self._keep_claim(claimed.meta))
        try:
            return await self._complete(claimed)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.state.release_claim(claimed.meta)
            raise
        finally:
            renewal.cancel()

    async def _keep_claim(self, meta: UploadMeta) -> None:
        """Renew the completion's lease until cancelled (the completion has ended)."""
        while True:
            await asyncio.sleep(min(COMPLETION_RENEW_SECONDS, self.lease_seconds / 4))
            with contextlib.suppress(StoreUnavailable):
                await self.state.renew_claim(meta)

    async def _take_over(self, meta: UploadMeta) -> CompletedUpload | None:
        """Complete the upload when its completion's host died (its lease ran out); None
        while a live host completes it, or when the completion cannot be done now."""
        claimed = await self.state.claim_completion(meta, self.lease_seconds)
        if claimed is None:
            return None
        try:
            return await self._complete_claimed(claimed)
        except (UploadConflict, StorageFailure) as e:
            log.warning("Could not take over the completion of %s: %s", meta.file_id, e.detail)
            return None

    async def _completed_elsewhere(self, meta: UploadMeta) -> CompletedUpload | None:
        """Wait a little for a completion another request (or host) is running; take it over
        when its lease runs out (that host died). None when that completion failed (the
        upload takes chunks again); UploadGone when the upload was removed; CompletionPending
        (503) when it takes longer: the client asks again later."""
        deadline = time.monotonic() + COMPLETION_WAIT_SECONDS
        while True:
            row = await self.state.get(meta.file_id)
            if row is None or row.meta.token != meta.token:
                raise UploadGone()
            if row.completed is not None:
                return row.completed
            if row.status == "uploading":  # that completion failed
                return None
            claimed = await self.state.claim_completion(row.meta, self.lease_seconds)
            if claimed is not None:
                return await self._complete_claimed(claimed)
            if time.monotonic() > deadline:
                raise CompletionPending()
            await asyncio.sleep(WAIT_STEP_SECONDS)

    async def _complete(self, row: UploadRow) -> CompletedUpload:
        meta = row.meta
        chunks = await self.state.chunks(meta)
        if [c.index for c in chunks] != list(range(meta.total_chunks)):
            raise StorageFailure(f"the chunk records of {meta.file_id} are incomplete")
        size = sum(c.length for c in chunks)
        if meta.total_size is not None and size != meta.total_size:
            raise UploadConflict(
                f"The merged file has {size} bytes, not the total_size {meta.total_size} "
                "given by the client"
            )
        parts = await self._build_parts(row, chunks)
        try:
            await self.objects.complete(row.object_key, row.upload_id, parts)
        except NoSuchUpload:
            pass  # completed by a host that died before recording it: checked below
        stored = await self.objects.size_of(row.object_key)
        if stored != size:
            raise StorageFailure(
                f"the object {row.object_key} has {stored} bytes after completion, not {size}"
            )
        if row.stream is not None:  # a tus upload keeps its whole CRC as it goes
            crc = row.stream.crc
        else:
            crc = checksums.combine((c.crc, c.length) for c in chunks)
        record = CompletedUpload.of(
            meta,
            size=size,
            crc64nvme=checksums.to_s3(crc),
            sha256=await self._sha256_of_object(row.object_key) if self.sha256 else None,
        )
        if not await self.state.mark_completed(meta, record):
            await self.objects.delete([row.object_key])  # removed while completing
            raise UploadGone()
        self._later(self._remove_staging(meta))
        return record

    async def _sha256_of_object(self, key: str) -> str:
        digest = hashlib.sha256()
        async for piece in self.objects.read_pieces(key):
            await asyncio.to_thread(digest.update, piece)
        return digest.hexdigest()

    async def _build_parts(self, row: UploadRow, chunks: list[ChunkRow]) -> list[tuple[int, str]]:
        """Every part of the object, in order: chunks that are parts, and gathered runs."""
        if row.direct:
            groups = [(c.index + 1, [c]) for c in chunks]
        else:
            groups = list(enumerate(_gather_runs(chunks), start=1))
        if len(groups) > self.max_parts:
            raise StorageFailure(f"{len(groups)} parts exceed the store's limit")
        built = {} if row.direct else await self.state.parts(row.meta)

        async def build(number: int, group: list[ChunkRow]) -> tuple[int, str]:
            ahead = built.get(number)
            if (
                ahead is not None
                and ahead.etag is not None
                and (ahead.first, ahead.last) == (group[0].index, group[-1].index)
                and ahead.sources == _sources(group)
            ):
                return number, ahead.etag  # gathered while the upload went on
            return number, await self._build_part(row, number, group)

        return list(await asyncio.gather(*(build(n, g) for n, g in groups)))

    async def _build_part(self, row: UploadRow, number: int, group: list[ChunkRow]) -> str:
        if len(group) == 1 and group[0].etag is not None:
            return group[0].etag
        async with self._gathering:
            return await self._gather(row, number, group)

    async def _gather(self, row: UploadRow, number: int, group: list[ChunkRow]) -> str:
        if len(group) == 1 and group[0].staging_key is not None:
            return await self.objects.copy_part(
                row.object_key, row.upload_id, number, group[0].staging_key
            )

        async def gathered() -> AsyncIterator[bytes]:
            for chunk in group:
                assert chunk.staging_key is not None
                copy = self.copies.take(chunk.staging_key)
                if copy is None:
                    async for piece in self.objects.read_pieces(chunk.staging_key):
                        yield piece
                    continue
                with copy:
                    copy.seek(0)
                    yield copy.read()  # one chunk of less than 5 MiB, from the page cache

        length = sum(c.length for c in group)
        return await self.objects.put_part(
            row.object_key, row.upload_id, number, gathered(), length
        )

    # -- tus uploads: a stream of parts --

    def _stream_part_bytes(self, meta: UploadMeta) -> int:
        """5 MiB, or the size that keeps the upload within `max_parts` parts."""
        length = meta.total_size if meta.total_size is not None else self.max_file_bytes
        return max(MIN_PART_BYTES, math.ceil(length / self.max_parts / MiB) * MiB)

    async def stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        row = await self.state.get(meta.file_id)
        if row is None:
            return None
        if row.completed is not None:
            return row.completed
        if row.stream is None:
            return None
        return StreamProgress(row.meta, row.stream.offset, row.stream.crc, row.last_activity)

    async def _claim_writer(self, meta: UploadMeta) -> tuple[str, UploadRow]:
        writer = secrets.token_hex(8)
        claimed = await self.state.claim_writer(meta, writer, WRITER_LEASE_SECONDS)
        if claimed is not None and claimed.stream is not None:
            return writer, claimed
        row = await self.state.get(meta.file_id)  # why not: ended, or another writer
        if (
            row is None
            or row.meta.token != meta.token
            or row.stream is None
            or row.status != "uploading"
        ):
            raise UploadGone()
        raise UploadLocked()

    async def receive_at(
        self,
        meta: UploadMeta,
        offset: int,
        body: AsyncIterator[memoryview],
        *,
        length: int | None,
        max_bytes: int,
        on_piece: Callable[[memoryview], None] | None,
    ) -> S3PendingBytes:
        writer, row = await self._claim_writer(meta)
        stream = row.stream
        assert stream is not None
        if row.meta.total_size is None and meta.total_size is not None:
            row = dataclasses.replace(row, meta=meta)  # a length this PATCH declares
        received = S3PendingBytes(row, writer, stream)
        renewal = asyncio.get_running_loop().create_task(self._keep_writer(row.meta, writer))
        spool = None
        try:
            if stream.offset != offset:
                raise OffsetMismatch(offset, stream.offset)
            if length is None:
                # No Content-Length (chunked): a part's size must be known before it is
                # sent, so the body is spooled first (memory, then a scratch file).
                spool = await self._spool_body(body, max_bytes)
                body, length = spool.views(), spool.length
            await self._stream_at(received, BodySlices(body, on_piece), length)
        except BaseException:
            await self.discard_at(received)
            raise
        finally:
            renewal.cancel()
            if spool is not None:
                spool.close()
        return received

    async def _spool_body(self, body: AsyncIterator[memoryview], max_bytes: int) -> Spool:
        spool = Spool(self.scratch)
        try:
            async for piece in body:
                if spool.length + len(piece) > max_bytes:
                    raise PayloadTooLarge(f"The body is larger than the {max_bytes} bytes left")
                spool.write(piece)
        except BaseException:
            spool.close()
            raise
        return spool

    async def _keep_writer(self, meta: UploadMeta, writer: str) -> None:
        """Renew the writer's lease until cancelled (the PATCH's bytes are all sent)."""
        while True:
            await asyncio.sleep(WRITER_RENEW_SECONDS)
            with contextlib.suppress(StoreUnavailable):
                await self.state.renew_writer(meta, writer, WRITER_LEASE_SECONDS)

    async def _stream_at(self, received: S3PendingBytes, body: BodySlices, length: int) -> None:
        """Parts while there are enough bytes for one, the last taking the rest; a staged
        tail piece when the tail and this body are too little for a part."""
        row, before = received.row, received.before
        meta = row.meta
        part_bytes = self._stream_part_bytes(meta)
        available = before.tail_bytes + length
        ends = meta.total_size is not None and before.offset + length == meta.total_size
        if available < part_bytes and not ends:
            if length:
                await self._stage_tail_piece(received, body, length)
            return
        count = max(1, available // part_bytes)
        sizes = [part_bytes] * (count - 1) + [available - part_bytes * (count - 1)]
        for i, size in enumerate(sizes):
            number = meta.total_chunks + len(received.parts) + 1
            tail = before.tail if i == 0 else ()
            from_body = size - sum(piece_length for _, piece_length, _ in tail)
            try:
                etag = await self.objects.put_part(
                    row.object_key,
                    row.upload_id,
                    number,
                    self._tail_then(tail, body.take(from_body)),
                    size,
                )
            except NoSuchUpload:
                raise _gone_midway() from None
            except Exception:
                if body.short:
                    return  # the client went away: the parts before this one count
                raise
            received.parts.append(ChunkRow(number - 1, size, 0, etag, None))
            received.took_tail = received.took_tail or bool(tail)
            received.keep(from_body, body.crc)

    async def _tail_then(
        self, tail: tuple[tuple[str, int, int], ...], rest: AsyncIterator[memoryview]
    ) -> AsyncIterator[bytes | memoryview]:
        for key, _, _ in tail:
            async for piece in self.objects.read_pieces(key):
                yield piece
        async for view in rest:
            yield view

    async def _stage_tail_piece(
        self, received: S3PendingBytes, body: BodySlices, size: int
    ) -> None:
        meta, offset = received.row.meta, received.before.offset
        key = f"{self._staging_prefix(meta)}tail.{offset:015d}.{secrets.token_hex(6)}"
        try:
            await self.objects.put_object(key, body.take(size), size)
        except Exception:
            if body.short:
                self._later(self.objects.delete([key]))
                return
            raise
        received.tail.append((key, size, body.crc))
        received.keep(size, body.crc)

    async def commit_at(self, received: S3PendingBytes) -> StreamProgress:
        before = received.before
        kept = () if received.took_tail else before.tail
        after = Stream(
            before.offset + received.length,
            checksums.combine_two(before.crc, received.crc, received.length),
            kept + tuple(received.tail),
        )
        row = await self.state.commit_stream(
            received.row.meta, received.writer, before, after, received.parts
        )
        if row is None:
            await self.discard_at(received)
            raise UploadGone()
        if received.took_tail and before.tail:
            self._later(self.objects.delete([key for key, _, _ in before.tail]))
        return StreamProgress(row.meta, after.offset, after.crc, row.last_activity)

    async def discard_at(self, received: S3PendingBytes) -> None:
        """Staged pieces are deleted; parts put stay unlisted in the multipart upload, to be
        put again by the next PATCH (same numbers) or left out of the completion."""
        if received.tail:
            self._later(self.objects.delete([key for key, _, _ in received.tail]))
            received.tail = []
        with contextlib.suppress(StoreUnavailable):
            await self.state.release_writer(received.row.meta, received.writer)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        row = await self.state.declare_length(meta, length)
        if row is None or row.meta.token != meta.token:
            raise UploadGone()
        return row.meta

    async def concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        writer, row = await self._claim_writer(meta)
        assert row.stream is not None
        received = S3PendingBytes(row, writer, row.stream)
        renewal = asyncio.get_running_loop().create_task(self._keep_writer(row.meta, writer))
        try:
            for number, group in enumerate(_copy_groups(sources), start=1):
                etag = await self._join_part(row, number, group)
                size = sum(end - start for _, start, end in group)
                received.parts.append(ChunkRow(number - 1, size, 0, etag, None))
            received.length = sum(source.size for source in sources)
            received.crc = checksums.combine(
                (checksums.from_s3(source.crc64nvme), source.size) for source in sources
            )
        except BaseException:
            await self.discard_at(received)
            raise
        finally:
            renewal.cancel()
        return await self.commit_at(received)

    async def _join_part(
        self, row: UploadRow, number: int, group: list[tuple[CompletedUpload, int, int]]
    ) -> str:
        """One part from whole sources or a range of one: copied by the store when it is one
        source's bytes, streamed through when several small sources make it up."""
        if len(group) == 1:
            source, start, end = group[0]
            whole = (start, end) == (0, source.size)
            return await self.objects.copy_part(
                row.object_key,
                row.upload_id,
                number,
                self.object_key(source.file_id, source.filename),
                None if whole or end == start else (start, end - 1),
            )

        async def joined() -> AsyncIterator[bytes]:
            for source, _, _ in group:
                async for piece in self.objects.read_pieces(
                    self.object_key(source.file_id, source.filename)
                ):
                    yield piece

        size = sum(end - start for _, start, end in group)
        return await self.objects.put_part(row.object_key, row.upload_id, number, joined(), size)

    # -- removing --

    async def delete(self, file_id: str) -> bool:
        row = await self.state.remove(file_id)
        if row is None:
            return False
        await self._clean(row)
        return True

    async def _clean(self, row: UploadRow) -> None:
        """Remove what the object store holds of a removed upload."""
        if row.status == "completed":
            await self.objects.delete([row.object_key])
            return
        await self.objects.abort(row.object_key, row.upload_id)
        await self._remove_staging(row.meta)

    async def _remove_staging(self, meta: UploadMeta) -> None:
        self.copies.forget(self._staging_prefix(meta))
        listed = await self.objects.list_objects(self._staging_prefix(meta))
        await self.objects.delete([o.key for o in listed])

    async def sweep(self, *, ttl_seconds: float) -> SweepReport:
        report = SweepReport()
        now = time.time()
        for row in await self.state.remove_expired(now - ttl_seconds):
            await self._clean(row)
            report.expired.append(row.meta.file_id)
            report.expired_uploads.append(row.meta)
        for row in await self.state.ready_to_finish(now - self.lease_seconds):
            try:
                finished = await self.complete(row.meta)
            except (UploadGone, StorageFailure) as e:
                log.warning("Sweep could not complete %s: %s", row.meta.file_id, e)
                continue
            if finished is not None and finished[1]:
                report.completed.append(finished[0])
        report.removed_temp_files = await self._remove_orphans(
            min(ttl_seconds, ORPHAN_GRACE_SECONDS)
        )
        return report

    async def _remove_orphans(self, grace_seconds: float) -> int:
        """Abort multipart uploads and delete staging objects that no upload owns: left by a
        host killed between creating them and recording them, or while cleaning up."""
        upload_ids, live = await self.state.live_uploads()
        cutoff = datetime.now(UTC).timestamp() - grace_seconds
        removed = 0
        for upload in await self.objects.list_multipart_uploads(f"{self.prefix}uploads/"):
            if upload.upload_id not in upload_ids and upload.initiated.timestamp() < cutoff:
                await self.objects.abort(upload.key, upload.upload_id)
                removed += 1
        staging = f"{self.prefix}staging/"
        stale = []
        for listed in await self.objects.list_objects(staging):
            file_id, _, rest = listed.key[len(staging) :].partition("/")
            token = rest.partition("/")[0]
            if (file_id, token) not in live and listed.last_modified.timestamp() < cutoff:
                stale.append(listed.key)
        await self.objects.delete(stale)
        return removed + len(stale)

    # -- the rest --

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.scratch).free

    async def health(self) -> dict[str, bool]:
        bucket, database = await asyncio.gather(
            self.objects.bucket_is_reachable(), self.state.is_reachable()
        )
        return {"object_store": bucket, "database": database}

    def _later(self, work: object) -> None:
        """Clean-up that the answer need not wait for; failures only logged (the sweep
        removes what is left)."""

        async def run() -> None:
            try:
                await work  # type: ignore[misc]
            except Exception as e:
                log.warning("Background clean-up failed: %s", e)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _gone_midway() -> UploadConflict:
    return UploadConflict(
        "The upload was completed or removed while this chunk was being received: "
        "ask /upload-status for its state"
    )


def _length_mismatch() -> BadRequest:
    return BadRequest(
        "With the s3 storage, a chunk of 5 MiB or more must be the last part of the form"
    )


def _run_of(meta: UploadMeta, index: int) -> tuple[int, int] | None:
    """The run of chunks gathered ahead into one part with chunk `index`: ceil(5 MiB /
    chunk_size) chunks each, which is the completion's plan when chunks are even (checked
    there). None for the run holding the last chunk (gathered at the completion) or while
    the chunk size is unknown."""
    if not meta.chunk_size:
        return None
    per_part = math.ceil(MIN_PART_BYTES / meta.chunk_size)
    first = index - index % per_part
    last = first + per_part - 1
    return None if last >= meta.total_chunks - 1 else (first, last)


def _copy_groups(
    sources: list[CompletedUpload],
) -> list[list[tuple[CompletedUpload, int, int]]]:
    """The parts of a concatenation, as (source, start, end) pieces: a source of 5 MiB or
    more is a part of its own (in ranges of at most 5 GiB, UploadPartCopy's limit);
    consecutive smaller ones join until they make 5 MiB. Only the last part may be less."""
    groups: list[list[tuple[CompletedUpload, int, int]]] = []
    pending: list[tuple[CompletedUpload, int, int]] = []
    pending_bytes = 0
    for source in sources:
        if source.size >= MIN_PART_BYTES and not pending:
            count = math.ceil(source.size / MAX_COPY_PART_BYTES)
            step = math.ceil(source.size / count)
            groups += [
                [(source, start, min(start + step, source.size))]
                for start in range(0, source.size, step)
            ]
            continue
        pending.append((source, 0, source.size))
        pending_bytes += source.size
        if pending_bytes >= MIN_PART_BYTES:
            groups.append(pending)
            pending, pending_bytes = [], 0
    if pending or not groups:
        groups.append(pending)
    return groups


def _sources(group: list[ChunkRow]) -> str:
    return " ".join(c.staging_key or "" for c in group)


def _gather_runs(chunks: list[ChunkRow]) -> list[list[ChunkRow]]:
    """Consecutive chunks in groups of at least MIN_PART_BYTES; the last group may be less."""
    groups: list[list[ChunkRow]] = [[]]
    size = 0
    for chunk in chunks:
        if size >= MIN_PART_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(chunk)
        size += chunk.length
    return groups
