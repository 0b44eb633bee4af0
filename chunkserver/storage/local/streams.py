"""tus uploads on the local disk: one chunk written at offsets, one writer at a time."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

from ... import checksums
from ...errors import (
    OffsetMismatch,
    UploadGone,
    UploadLocked,
)
from ...model import (
    CompletedUpload,
    StreamProgress,
    UploadMeta,
)
from ..meter import ByteLimit
from . import recordlog
from .disk import (
    META_NAME,
    OPEN_FLAGS,
    WRITER_KEY,
    WRITER_OFFSET,
    LocalPendingBytes,
    progress_in,
    storage_error,
)
from .fileio import copy_range
from .layout import LocalLayout
from .locks import FolderGone
from .openuploads import OpenUpload
from .receive import LocalChunkReceiver
from .recordlog import LOG_NAME


class LocalStreamWriter:
    """tus uploads: one chunk written at offsets, one writer at a time; concatenation."""

    def __init__(self, layout: LocalLayout, receiver: LocalChunkReceiver) -> None:
        self.layout = layout
        self.receiver = receiver

    def _read_progress_at(self, folder_fd: int) -> tuple[int, int]:
        """(offset, crc) of a tus upload; (0, 0) before its first bytes."""
        try:
            fd = os.open(LOG_NAME, os.O_RDONLY | OPEN_FLAGS, dir_fd=folder_fd)
        except FileNotFoundError:
            return 0, 0
        try:
            return progress_in(fd)
        finally:
            os.close(fd)

    def _stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        completed = self.layout.read_completion(meta.file_id)
        if completed is not None:
            return completed
        folder = self.layout.folder(meta.file_id)
        try:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        except FileNotFoundError:
            return self.layout.read_completion(meta.file_id)
        try:
            on_disk = self.layout.read_meta(meta.file_id)
            if on_disk is None:
                return self.layout.read_completion(meta.file_id)
            offset, crc = self._read_progress_at(folder_fd)
            _, last = self.layout.stored_indexes(meta.file_id, on_disk.total_chunks)
        except FileNotFoundError:  # completed or removed while we looked
            return self.layout.read_completion(meta.file_id)
        finally:
            os.close(folder_fd)
        return StreamProgress(on_disk, offset, crc, last)

    async def stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        return await self.layout.run(self._stream_progress, meta)

    async def receive_at(
        self,
        meta: UploadMeta,
        offset: int,
        body: AsyncIterator[memoryview],
        *,
        length: int | None,
        max_bytes: ByteLimit,
        on_piece: Callable[[memoryview], None] | None,
    ) -> LocalPendingBytes:
        received = self._open_at(meta, offset)
        # The same hot path as a chunk's, at the upload's offset (the HTTP layer holds the
        # body to its Content-Length, `length`, which the service has checked against
        # `max_bytes`).
        try:
            await self.receiver.stream(received.chunk, body, max_bytes, False, on_piece)
        except BaseException:
            self.receiver.discard_now(received.chunk)
            raise
        return received

    def _open_at(self, meta: UploadMeta, offset: int) -> LocalPendingBytes:
        """The data file at the upload's offset, with its writer byte locked."""
        crc_before = 0

        def at_offset(upload: OpenUpload) -> bool:
            nonlocal crc_before
            stored, crc_before = progress_in(upload.log_fd)
            if stored != offset:
                raise OffsetMismatch(offset, stored)
            return True

        writer = (WRITER_OFFSET, 1)
        upload = self.receiver.hold_region(meta, WRITER_KEY, writer, at_offset)
        if upload is None:
            raise UploadLocked()  # another PATCH, or a completion or removal
        chunk = self.receiver.written_through(
            upload, meta, offset, writer, WRITER_KEY, limit=None, declared_size=True
        )
        return LocalPendingBytes(chunk, meta, crc_before)

    async def commit_at(self, received: LocalPendingBytes) -> StreamProgress:
        chunk = received.chunk
        try:
            if self.layout.fsync:
                await self.layout.run(os.fdatasync, chunk.fd)
            return self._commit_at(received)
        except OSError as e:
            raise storage_error(e) from e
        finally:
            self.receiver.discard_now(chunk)  # the writer lock, held till here

    def _commit_at(self, received: LocalPendingBytes) -> StreamProgress:
        """Append the new offset to the log; with chunk 0's entry once the length is reached.

        The writer lock keeps every other PATCH, completion and removal of this data file
        waiting, and the log is the one opened beside the data file, so the entry lands in
        this upload's folder whatever happened to its path."""
        chunk = received.chunk
        offset = chunk.base + chunk.written
        crc = checksums.combine_two(received.crc_before, chunk.crc, chunk.written)
        entries = []
        if chunk.written:
            entries.append(recordlog.Entry(recordlog.OFFSET, 0, offset, crc))
        meta = received.meta
        if meta.total_size is None:  # declared since by another request, perhaps
            meta = self.layout.read_meta(meta.file_id) or meta
        if meta.total_size is not None and offset == meta.total_size:
            entries.append(recordlog.Entry(recordlog.CHUNK, 0, offset, crc))  # chunk 0 stored
        if entries:
            recordlog.append(chunk.log_fd, *entries)
            if self.layout.fsync:
                os.fdatasync(chunk.log_fd)
        return StreamProgress(meta, offset, crc, time.time())

    async def discard_at(self, received: LocalPendingBytes) -> None:
        self.receiver.discard_now(received.chunk)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        return await self._adopt_in_thread(meta, _unless_set("total_size", length))

    async def declare_digest(self, meta: UploadMeta, sha256: str) -> UploadMeta:
        return await self._adopt_in_thread(meta, _unless_set("repr_sha256", sha256))

    async def _adopt_in_thread(
        self, meta: UploadMeta, change: Callable[[UploadMeta], UploadMeta]
    ) -> UploadMeta:
        try:
            return await self.layout.run(self._adopt, meta, change)
        except FolderGone:
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e

    def _adopt(self, meta: UploadMeta, change: Callable[[UploadMeta], UploadMeta]) -> UploadMeta:
        """The upload's record on disk, changed under its lock (written when it changed)."""
        with self.layout.lock(meta.file_id):
            on_disk = self.layout.read_meta(meta.file_id)
            if on_disk is None or on_disk.token != meta.token:
                raise UploadGone()
            changed = change(on_disk)
            if changed != on_disk:
                self.layout.write_json(
                    self.layout.folder(meta.file_id) / META_NAME, changed.stored()
                )
            return changed

    async def concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        try:
            return await self.layout.run(self._concatenate, meta, sources)
        except OSError as e:
            raise storage_error(e) from e

    def _concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        """Copy the sources into the data file with copy_file_range: a reflink, no copy, on
        filesystems that share blocks (XFS, Btrfs); an in-kernel copy elsewhere."""
        received = self._open_at(meta, 0)
        chunk = received.chunk
        try:
            for source in sources:
                src = os.open(
                    self.layout.uploads_dir / source.file_id / source.filename, os.O_RDONLY
                )
                try:
                    copy_range(src, 0, chunk.fd, chunk.written, source.size)
                finally:
                    os.close(src)
                chunk.crc = checksums.combine_two(
                    chunk.crc, checksums.from_s3(source.crc64nvme), source.size
                )
                chunk.written += source.size
            if self.layout.fsync:
                os.fdatasync(chunk.fd)
            return self._commit_at(received)
        finally:
            self.receiver.discard_now(chunk)


def _unless_set(name: str, value: int | str) -> Callable[[UploadMeta], UploadMeta]:
    """A change of an upload's record that sets `name` when it is not set yet."""

    def change(on_disk: UploadMeta) -> UploadMeta:
        if getattr(on_disk, name) is not None:
            return on_disk
        return replace(on_disk, **{name: value})  # type: ignore[arg-type]

    return change
