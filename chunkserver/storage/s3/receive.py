"""A chunk received on S3: straight into its part, or staged, and committed in PostgreSQL."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator

from ...errors import (
    BadRequest,
    CompletionPending,
    UploadConflict,
    UploadGone,
)
from ...model import (
    Committed,
    CompletedUpload,
    UploadMeta,
)
from ..meter import ByteLimit, count_piece
from .assembly import S3Assembler
from .layout import S3Layout
from .objects import NoSuchUpload
from .pieces import (
    MIN_PART_BYTES,
    S3PendingChunk,
    Spool,
    gone_midway,
    length_mismatch,
    part_sources,
    run_of,
)
from .state import ChunkRow, PartRow, UploadRow


class S3ChunkWriter:
    """The seed protocol's chunks: each a part of the multipart upload, or staged until its
    part can be built."""

    def __init__(self, layout: S3Layout, assembler: S3Assembler) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects
        self.assembler = assembler

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: ByteLimit,
        want_sha256: bool,
        length_hint: int | None = None,
    ) -> S3PendingChunk:
        row = await self.state.uploads.join(meta.file_id)
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
        spool = Spool(self.layout.scratch)
        try:
            await self._fill(received, spool, body, max_bytes, limit)
            await self._place(received, spool, row, index, direct)
        finally:
            spool.close()
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: ByteLimit, want_sha256: bool
    ) -> S3PendingChunk:
        received = S3PendingChunk(digest=hashlib.sha256() if want_sha256 else None)
        received.spool = Spool(self.layout.scratch)
        try:
            await self._fill(received, received.spool, body, max_bytes, None)
        except BaseException:
            received.spool.close()
            raise
        return received

    def _count(
        self, received: S3PendingChunk, piece: memoryview, max_bytes: ByteLimit, limit: int | None
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
        max_bytes: ByteLimit,
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
        max_bytes: ByteLimit,
        limit: int | None,
    ) -> None:
        assert received.row is not None and received.index is not None
        row, index = received.row, received.index

        async def counted() -> AsyncIterator[memoryview]:
            try:
                async for piece in body:
                    self._count(received, piece, max_bytes, limit)
                    if received.length > expected:
                        raise length_mismatch()
                    yield piece
                if received.length != expected:
                    raise length_mismatch()
            except BaseException as e:
                received.failure = e  # the HTTP client may wrap it: kept to raise as is
                raise

        try:
            received.etag = await self.objects.put_part(
                row.object_key, row.upload_id, index + 1, counted(), expected
            )
        except NoSuchUpload:
            raise gone_midway() from None
        except BaseException:
            if received.failure is not None:
                raise received.failure from None
            raise

    async def _fix_layout(self, meta: UploadMeta, chunk_length: int) -> bool:
        """Decide from a chunk other than the last whether chunks are parts (once)."""
        self.layout.check_fits(meta.total_chunks, chunk_length)
        direct = await self.state.uploads.fix_layout(meta, chunk_length >= MIN_PART_BYTES)
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
            raise gone_midway() from None

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
            await self._stage(received, spool, meta, index)

    async def _stage(
        self, received: S3PendingChunk, spool: Spool, meta: UploadMeta, index: int
    ) -> None:
        """Keep a chunk smaller than a part until its run is gathered: a row of the database
        (one statement; the object store's PUT and DELETE of an object of its own cost six
        times its CPU), or an object when it is as large as a part."""
        data = spool.in_memory()
        in_database = received.length < MIN_PART_BYTES
        key = self.layout.staging_key(meta, index, in_database=in_database)
        if in_database:
            if data is None:
                data = bytearray()
                async for piece in spool.payload():
                    data += piece
            await self.state.staged.put(key, meta, data)
        else:
            await self.objects.put_object(key, spool.payload(), received.length)
        received.staging_key = key
        if data is not None:
            self.layout.copies.keep(key, data)

    async def sha256_of(self, received: S3PendingChunk) -> str:
        digest = hashlib.sha256()
        if received.staging_key is not None:
            async for piece in self.layout.read_staged(received.staging_key):
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
                row = await self.state.uploads.get(meta.file_id)
                if row is None or row.meta.token != meta.token or row.status != "uploading":
                    raise UploadGone()
                received.meta, received.index, received.row = row.meta, index, row
                await self._place(received, spool, row, index, row.direct)
            finally:
                spool.close()
        chunk = ChunkRow(index, received.length, received.crc, received.etag, received.staging_key)
        run = run_of(meta, index) if received.staging_key is not None else None
        row, count, replaced, run_stored = await self.state.chunks.record_chunk(
            meta, chunk, is_last=meta.is_last(index), run=run or (-1, -1)
        )
        if row is None:
            await self.discard(received)
            if received.etag is not None and received.row is not None:
                # A part may land after its upload was aborted (S3 says so; Swift does):
                # abort again, which frees it.
                stale = received.row
                self.layout.later(self.objects.abort(stale.object_key, stale.upload_id))
            raise UploadGone()
        if row.status != "uploading":
            await self.discard(received)
            completed = await self.assembler.completed_elsewhere(row.meta)
            if completed is None:  # the chunk was not stored: the client sends it again
                raise CompletionPending("The upload's completion failed; send this chunk again")
            return completed
        if replaced is not None:
            self.layout.later(self.layout.delete_staged([replaced]))
        if run is not None and run_stored == run[1] - run[0] + 1:
            self.layout.later(self._gather_ahead(row, run))
        return Committed(row.meta, count, count == row.meta.total_chunks)

    async def _gather_ahead(self, row: UploadRow, run: tuple[int, int]) -> None:
        """Build the part of a run of staged chunks as soon as the run is stored, while the
        upload goes on, so that the completion only has the last run left to gather."""
        meta = row.meta
        first, last = run
        number = first // (last - first + 1) + 1
        group = await self.state.chunks.claim_group(meta, number, first, last)
        if group is None or any(c.length != meta.chunk_size for c in group):
            return
        etag = await self.assembler.build_part(row, number, group)
        await self.state.chunks.record_part(
            meta, PartRow(number, first, last, part_sources(group), etag)
        )

    async def discard(self, received: S3PendingChunk) -> None:
        if received.spool is not None:
            received.spool.close()
        if received.staging_key is not None:
            self.layout.later(self.layout.delete_staged([received.staging_key]))
        elif received.etag is not None and received.meta is not None:
            # The part now holds these refused bytes: an earlier copy of the chunk no longer
            # counts, unless it was the same bytes.
            assert received.index is not None
            await self.state.claims.forget_chunk(received.meta, received.index, received.etag)
