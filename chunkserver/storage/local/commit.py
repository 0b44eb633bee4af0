"""Making a received chunk count: its entry in the upload's record log."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

from ...errors import (
    UploadGone,
)
from ...model import (
    Committed,
    CompletedUpload,
    UploadMeta,
)
from ..meter import ByteLimit
from . import recordlog
from .assembly import LocalAssembler
from .disk import (
    DATA_NAME,
    META_NAME,
    OPEN_FLAGS,
    LocalPendingChunk,
    aside_file,
    aside_name,
    storage_error,
)
from .layout import LocalLayout
from .locks import FolderGone
from .receive import LocalChunkReceiver
from .recordlog import LOG_NAME


class LocalChunkWriter:
    """The seed protocol's chunks: received by the receiver (the hot path), made to count
    here, by their entry in the upload's record log."""

    def __init__(
        self, layout: LocalLayout, receiver: LocalChunkReceiver, assembler: LocalAssembler
    ) -> None:
        self.layout = layout
        self.receiver = receiver
        self.assembler = assembler

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: ByteLimit,
        want_sha256: bool,
        length_hint: int | None = None,  # a file needs none: its offset is enough
    ) -> LocalPendingChunk:
        return await self.receiver.receive(
            meta, index, body, max_bytes=max_bytes, want_sha256=want_sha256
        )

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: ByteLimit, want_sha256: bool
    ) -> LocalPendingChunk:
        return await self.receiver.receive_unplaced(
            body, max_bytes=max_bytes, want_sha256=want_sha256
        )

    async def sha256_of(self, received: LocalPendingChunk) -> str:
        return await self.receiver.sha256_of(received)

    async def discard(self, received: LocalPendingChunk) -> None:
        self.receiver.discard_now(received)

    async def commit(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        try:
            if self.layout.fsync:
                await self.layout.run(os.fdatasync, received.fd)
            if received.in_place and (meta.chunk_size is not None or meta.is_last(index)):
                committed = self._commit_in_place(received, meta, index)
                if self.layout.fsync:
                    await self.layout.run(os.fdatasync, received.log_fd)
                return committed
            lock = self.layout.lock(meta.file_id, blocking=False)
            if lock.acquire():  # the common case: nobody else is changing this upload
                try:
                    return self._commit(received, meta, index)
                finally:
                    lock.release()
            return await self.layout.run(self._commit_waiting, received, meta, index)
        except FolderGone:
            return self._ended(meta.file_id)
        except OSError as e:
            raise storage_error(e) from e
        finally:
            self.receiver.discard_now(
                received
            )  # after the commit, so the region lock held till here

    def _ended(self, file_id: str) -> CompletedUpload:
        """An upload whose folder is gone: its completion record, or UploadGone."""
        completed = self.layout.read_completion(file_id)
        if completed is None:
            raise UploadGone()
        return completed

    def _commit_waiting(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        with self.layout.lock(meta.file_id):
            return self._commit(received, meta, index)

    def _commit_in_place(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed:
        """Append the entry of a chunk written in place, whose region is known: no flock.

        Its region lock, held since before the data file's identity was checked, keeps every
        completion, abandon and expiry of this data file waiting, and the log was opened
        through the folder's descriptor, so the entry cannot land in another upload's log. A
        resend kept aside at the same time may append its own; either is a whole copy.
        """
        entry = recordlog.Entry(recordlog.CHUNK, index, received.length, received.crc)
        recordlog.append(received.log_fd, entry)
        return self.layout.progress(meta, index, received.log_fd)

    def _commit(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        """Write chunk `index`'s record; under the upload's flock."""
        file_id = meta.file_id
        folder = self.layout.folder(file_id)
        completed = self.layout.read_completion(file_id)
        if completed is not None:  # a retry after completion changes nothing
            return completed
        try:
            data = os.stat(folder / DATA_NAME)
        except FileNotFoundError:
            on_disk = self.layout.read_meta(file_id)
            finished = self.assembler.complete_held(on_disk, None) if on_disk is not None else None
            if finished is not None:  # a completion cut short after its rename
                return finished
            raise UploadGone() from None
        if received.data_identity not in (None, (data.st_dev, data.st_ino)):
            raise UploadGone()  # removed and begun again meanwhile: not the same upload
        current = meta
        if meta.chunk_size is None and not meta.is_last(index):
            current = self.layout.read_meta(file_id) or meta
            if current.chunk_size is None:  # learned from the first chunk other than the last
                current = replace(current, chunk_size=received.length)
                self.layout.write_json(folder / META_NAME, current.stored())
        if (
            received.in_place
            and current.chunk_size is not None
            and not current.is_last(index)
            and received.length > current.chunk_size
        ):
            self.receiver.overflow(received)  # its tail crosses into the next chunk's region
        try:
            log_fd = os.open(folder / LOG_NAME, os.O_RDWR | os.O_APPEND | OPEN_FLAGS)
        except FileNotFoundError:
            raise UploadGone() from None
        try:
            return self._commit_logged(received, current, index, log_fd)
        finally:
            os.close(log_fd)

    def _commit_logged(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int, log_fd: int
    ) -> Committed:
        folder = self.layout.folder(meta.file_id)
        previous = self.layout.records(meta.file_id).get(index)
        token = ""
        if received.aside_path is not None:
            if previous is not None and (previous.length, previous.crc64nvme) == (
                received.length,
                received.crc,
            ):
                return self.layout.progress(meta, index, log_fd)  # the same bytes again
            token = secrets.token_hex(6)
            try:
                os.rename(received.aside_path, folder / aside_file(index, token))
            except FileNotFoundError:  # the folder it was received in was removed meanwhile
                raise UploadGone() from None
            received.aside_path = None
        entry = recordlog.Entry(recordlog.CHUNK, index, received.length, received.crc, token)
        recordlog.append(log_fd, entry)
        if self.layout.fsync:
            os.fdatasync(log_fd)
        if previous is not None and previous.aside not in (None, aside_name(index, token)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / previous.aside)
        return self.layout.progress(meta, index, log_fd)
