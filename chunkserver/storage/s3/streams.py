"""tus uploads on S3: PATCHes as parts and a staged tail, a writer's lease, concatenation
by part copy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import secrets
from collections.abc import AsyncIterator, Callable

from ... import checksums
from ...errors import (
    OffsetMismatch,
    StoreUnavailable,
    UploadGone,
    UploadLocked,
)
from ...model import (
    CompletedUpload,
    StreamProgress,
    UploadMeta,
)
from ..meter import ByteLimit
from .layout import S3Layout
from .objects import NoSuchUpload
from .pieces import (
    MIN_PART_BYTES,
    WRITER_LEASE_SECONDS,
    WRITER_RENEW_SECONDS,
    BodySlices,
    MiB,
    S3PendingBytes,
    Spool,
    copy_groups,
    gone_midway,
)
from .state import ChunkRow, Stream, UploadRow


class S3StreamWriter:
    """tus uploads: parts of `_stream_part_bytes` put as the PATCHes pass, the tail staged;
    one writer at a time (a lease in PostgreSQL); concatenation by part copies."""

    def __init__(self, layout: S3Layout) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects

    def _stream_part_bytes(self, meta: UploadMeta) -> int:
        """5 MiB, or the size that keeps the upload within `max_parts` parts."""
        length = meta.total_size if meta.total_size is not None else self.layout.max_file_bytes
        return max(MIN_PART_BYTES, math.ceil(length / self.layout.max_parts / MiB) * MiB)

    async def stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        row = await self.state.uploads.get(meta.file_id)
        if row is None:
            return None
        if row.completed is not None:
            return row.completed
        if row.stream is None:
            return None
        return StreamProgress(row.meta, row.stream.offset, row.stream.crc, row.last_activity)

    async def _claim_writer(self, meta: UploadMeta) -> tuple[str, UploadRow]:
        writer = secrets.token_hex(8)
        claimed = await self.state.claims.claim_writer(meta, writer, WRITER_LEASE_SECONDS)
        if claimed is not None and claimed.stream is not None:
            return writer, claimed
        row = await self.state.uploads.get(meta.file_id)  # why not: ended, or another writer
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
        max_bytes: ByteLimit,
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

    async def _spool_body(self, body: AsyncIterator[memoryview], max_bytes: ByteLimit) -> Spool:
        spool = Spool(self.layout.scratch)
        try:
            async for piece in body:
                if spool.length + len(piece) > max_bytes.bytes:
                    raise max_bytes.exceeded()
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
                await self.state.claims.renew_writer(meta, writer, WRITER_LEASE_SECONDS)

    async def _stream_at(self, received: S3PendingBytes, body: BodySlices, length: int) -> None:
        """Parts while there are enough bytes for one, the last taking the rest; a staged
        tail piece when the tail and this body are too little for a part."""
        row, before = received.row, received.before
        meta = row.meta
        part_bytes = self._stream_part_bytes(meta)
        available = before.tail_bytes + length
        if not available and meta.total_chunks:
            return  # nothing to put after the parts there are (an empty upload puts one)
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
                raise gone_midway() from None
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
        key = f"{self.layout.staging_prefix(meta)}tail.{offset:015d}.{secrets.token_hex(6)}"
        try:
            await self.objects.put_object(key, body.take(size), size)
        except Exception:
            if body.short:
                self.layout.later(self.objects.delete([key]))
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
        row = await self.state.claims.commit_stream(
            received.row.meta, received.writer, before, after, received.parts
        )
        if row is None:
            await self.discard_at(received)
            raise UploadGone()
        if received.took_tail and before.tail:
            self.layout.later(self.objects.delete([key for key, _, _ in before.tail]))
        return StreamProgress(row.meta, after.offset, after.crc, row.last_activity)

    async def discard_at(self, received: S3PendingBytes) -> None:
        """Staged pieces are deleted; parts put stay unlisted in the multipart upload, to be
        put again by the next PATCH (same numbers) or left out of the completion."""
        if received.tail:
            self.layout.later(self.objects.delete([key for key, _, _ in received.tail]))
            received.tail = []
        with contextlib.suppress(StoreUnavailable):
            await self.state.claims.release_writer(received.row.meta, received.writer)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        row = await self.state.claims.declare_length(meta, length)
        if row is None or row.meta.token != meta.token:
            raise UploadGone()
        return row.meta

    async def declare_digest(self, meta: UploadMeta, sha256: str) -> UploadMeta:
        row = await self.state.claims.declare_digest(meta, sha256)
        if row is None or row.meta.token != meta.token:
            raise UploadGone()
        return row.meta

    async def concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        writer, row = await self._claim_writer(meta)
        assert row.stream is not None
        received = S3PendingBytes(row, writer, row.stream)
        renewal = asyncio.get_running_loop().create_task(self._keep_writer(row.meta, writer))
        try:
            for number, group in enumerate(copy_groups(sources), start=1):
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
                self.layout.object_key(source.file_id, source.filename),
                None if whole or end == start else (start, end - 1),
            )

        async def joined() -> AsyncIterator[bytes]:
            for source, _, _ in group:
                async for piece in self.objects.read_pieces(
                    self.layout.object_key(source.file_id, source.filename)
                ):
                    yield piece

        size = sum(end - start for _, start, end in group)
        return await self.objects.put_part(row.object_key, row.upload_id, number, joined(), size)
