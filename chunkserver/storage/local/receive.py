"""The hot path: a chunk's bytes streamed into place, or aside, with their tally."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ...errors import (
    UploadConflict,
    UploadGone,
)
from ...model import (
    UploadMeta,
)
from ..meter import ByteLimit, count_piece
from .disk import (
    DATA_NAME,
    GUARD_OFFSET,
    MAX_BATCH_PIECES,
    OPEN_FLAGS,
    WRITE_BATCH_BYTES,
    LocalPendingChunk,
    storage_error,
)
from .fileio import copy_range, hash_file, pwritev_all
from .layout import LocalLayout
from .locks import lock_range, unlock_range
from .openuploads import OpenUpload

# A pending chunk's descriptors: its own, or the upload's open ones it borrows.
PENDING_FDS = ("fd", "guard_fd", "folder_fd", "log_fd")


class LocalChunkReceiver:
    """The hot path: a chunk's bytes streamed into place (or aside), with its tally."""

    def __init__(self, layout: LocalLayout) -> None:
        self.layout = layout

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: ByteLimit,
        want_sha256: bool,
    ) -> LocalPendingChunk:
        received = self._open_for_chunk(meta, index, max_bytes)
        await self.stream(received, body, max_bytes, want_sha256)
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: ByteLimit, want_sha256: bool
    ) -> LocalPendingChunk:
        path = self.layout.incoming_dir / self.layout.temp_name("chunk", ".part")
        received = self._open_aside(path, None, None)
        await self.stream(received, body, max_bytes, want_sha256)
        return received

    def _open_for_chunk(
        self, meta: UploadMeta, index: int, max_bytes: ByteLimit
    ) -> LocalPendingChunk:
        """The chunk's region in the data file, locked; or a file aside when it cannot be
        written in place. Raises UploadGone when the data file is not there."""
        offset = meta.offset_of(index)
        if offset is not None:
            received = self._open_in_place(meta, index, offset, max_bytes)
            if received is not None:
                return received
        return self._open_kept_aside(meta, index)

    def _open_in_place(
        self, meta: UploadMeta, index: int, offset: int, max_bytes: ByteLimit
    ) -> LocalPendingChunk | None:
        """The chunk's region, locked, in the upload's data file held open across its chunks;
        None when the region is busy or the chunk was stored before (a resend)."""
        limit = None if meta.is_last(index) or meta.chunk_size is None else meta.chunk_size
        region = (offset, limit or max_bytes.bytes)
        known = self.layout.known_of(meta)

        def not_stored(upload: OpenUpload) -> bool:
            known.catch_up(upload.log_fd)
            return not known.is_stored(index)

        upload = self.hold_region(meta, index, region, not_stored)
        if upload is None:
            return None
        return self.written_through(
            upload, meta, offset, region, index, limit=limit, declared_size=meta.chunk_size_declared
        )

    def written_through(
        self,
        upload: OpenUpload,
        meta: UploadMeta,
        base: int,
        region: tuple[int, int],
        key: int,
        *,
        limit: int | None,
        declared_size: bool,
    ) -> LocalPendingChunk:
        """Bytes written at `base` of the upload's data file held open, whose `region` this
        process holds (see _hold_region) under `key`."""
        return LocalPendingChunk(
            fd=upload.data_fd,
            base=base,
            guard_fd=-1,
            limit=limit,
            aside_path=None,
            data_identity=upload.identity,
            declared_size=declared_size,
            folder=self.layout.folder(meta.file_id),
            index=max(key, 0),  # a tus upload (WRITER_KEY) is chunk 0
            folder_fd=upload.folder_fd,
            log_fd=upload.log_fd,
            upload=upload,
            region=region,
            writing_key=key,
        )

    def hold_region(
        self,
        meta: UploadMeta,
        key: int,
        region: tuple[int, int],
        ready: Callable[[OpenUpload], bool],
    ) -> OpenUpload | None:
        """The upload's open files, with `region` of its data file locked and `key` marked
        as being written by this process, once `ready` says so under the lock; None when
        the region is busy (here or in another process) or `ready` says no."""
        folder = self.layout.folder(meta.file_id)
        try:
            upload = self.layout.open_uploads.acquire(folder, meta.file_id, meta.token)
        except FileNotFoundError:
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e
        locked = held = False
        try:
            if key in upload.writing or not lock_range(upload.data_fd, *region, wait=False):
                return None
            locked = True
            # By its path from the data folder: the upload may have been completed or removed
            # (by any process) since these files were opened; the region lock keeps it so now.
            on_disk = os.stat(f"{folder}/{DATA_NAME}")
            if (on_disk.st_dev, on_disk.st_ino) != upload.identity:
                self.layout.open_uploads.forget(meta.file_id)
                raise UploadGone()
            if not ready(upload):
                return None
            upload.writing.add(key)
            held = True
        except FileNotFoundError:
            self.layout.open_uploads.forget(meta.file_id)
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e
        finally:
            if not held:
                if locked:
                    unlock_range(upload.data_fd, *region)
                self.layout.open_uploads.release(upload)
        return upload

    def _open_kept_aside(self, meta: UploadMeta, index: int) -> LocalPendingChunk:
        """A file of its own for a chunk whose place is unknown or busy, or that was stored
        before (whose bytes must not touch its region); the data file stays open beside it
        with a shared lock on its GUARD_OFFSET byte, until the commit."""
        folder = self.layout.folder(meta.file_id)
        data_path = f"{folder}/{DATA_NAME}"
        try:
            fd = os.open(data_path, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e
        try:
            if not lock_range(fd, GUARD_OFFSET, 1, wait=False, shared=True):
                raise UploadGone()  # the whole file is locked: being completed or abandoned
            held, on_disk = os.fstat(fd), os.stat(data_path)
            if (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
                raise UploadGone()  # completed or removed since we opened it
            received = self._open_aside(self.layout.aside_path(folder, index), folder, index)
        except FileNotFoundError:
            os.close(fd)
            raise UploadGone() from None
        except OSError as e:
            os.close(fd)
            raise storage_error(e) from e
        except BaseException:
            os.close(fd)
            raise
        received.guard_fd = fd
        last = meta.is_last(index)
        received.limit = None if last or not meta.chunk_size_declared else meta.chunk_size
        return received

    def _open_aside(self, path: Path, folder: Path | None, index: int | None) -> LocalPendingChunk:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o644)
        except FileNotFoundError:
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e
        return LocalPendingChunk(
            fd=fd,
            base=0,
            guard_fd=-1,
            limit=None,
            aside_path=path,
            data_identity=None,
            declared_size=True,
            folder=folder,
            index=index,
        )

    async def stream(
        self,
        received: LocalPendingChunk,
        body: AsyncIterator[memoryview],
        max_bytes: ByteLimit,
        want_sha256: bool,
        on_piece: Callable[[memoryview], None] | None = None,
    ) -> None:
        """Write the body's pieces at the chunk's place as they come, with the CRC on the way
        (and the SHA-256, or what `on_piece` computes).

        Pieces are views of the socket's buffers (multipart.py): gathered, never joined, into
        batches of about WRITE_BATCH_BYTES, one pwritev each, on the event loop.
        """
        if want_sha256:
            received.digest = hashlib.sha256()
        batch: list[memoryview] = []
        batch_bytes = 0
        try:
            async for piece in body:
                count_piece(received, piece, max_bytes)
                if on_piece is not None:
                    on_piece(piece)
                if received.limit is not None and received.length > received.limit:
                    self.overflow(received)
                batch.append(piece)
                batch_bytes += len(piece)
                # A bytearray's view is of a buffer reused after the next piece
                # (bodyreader.py), and as large as a batch already: written now.
                if (
                    batch_bytes >= WRITE_BATCH_BYTES
                    or len(batch) >= MAX_BATCH_PIECES
                    or type(piece.obj) is bytearray
                ):
                    self._write(received, batch, batch_bytes)
                    batch, batch_bytes = [], 0
            if batch:
                self._write(received, batch, batch_bytes)
        except BaseException:
            self.discard_now(received)
            raise

    def _write(self, received: LocalPendingChunk, batch: list[memoryview], size: int) -> None:
        try:
            pwritev_all(received.fd, batch, received.base + received.written)
        except OSError as e:
            raise storage_error(e) from e
        received.written += size

    def overflow(self, received: LocalPendingChunk) -> None:
        """The chunk outgrows its region: refuse it, or move what is written aside."""
        if received.declared_size or received.folder is None or received.index is None:
            raise UploadConflict(
                f"Chunk {received.index} is larger than the chunk_size "
                f"({received.limit} bytes) of this upload"
            )
        path = self.layout.aside_path(received.folder, received.index)
        aside = self._open_aside(path, received.folder, received.index)
        try:
            copy_range(received.fd, received.base, aside.fd, 0, received.written)
        except OSError as e:
            self.discard_now(aside)
            raise storage_error(e) from e
        # The data file stays open, its region locked, as the guard until the commit.
        received.guard_fd, received.fd, received.base, received.limit = (
            received.fd,
            aside.fd,
            0,
            None,
        )
        received.aside_path, received.data_identity = aside.aside_path, None

    async def sha256_of(self, received: LocalPendingChunk) -> str:
        digest = hashlib.sha256()
        await self.layout.run(hash_file, received.fd, received.length, digest, received.base)
        return digest.hexdigest()

    def discard_now(self, received: LocalPendingChunk) -> None:
        upload = received.upload
        if upload is not None:  # its descriptors are the upload's, shared: not closed here
            for name in PENDING_FDS:
                if getattr(received, name) in (upload.data_fd, upload.folder_fd, upload.log_fd):
                    setattr(received, name, -1)
            unlock_range(upload.data_fd, *received.region)
            upload.writing.discard(received.writing_key)
            received.upload = None
            self.layout.open_uploads.release(upload)
        for name in PENDING_FDS:
            fd = getattr(received, name)
            if fd >= 0:
                os.close(fd)
                setattr(received, name, -1)
        if received.aside_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(received.aside_path)
