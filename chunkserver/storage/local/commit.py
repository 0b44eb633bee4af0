"""Making a received chunk count: its entry in the upload's record log."""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import asdict, replace

from ...errors import (
    UploadGone,
)
from ...model import (
    Committed,
    CompletedUpload,
    UploadMeta,
)
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
from .locks import FolderGone
from .receive import LocalChunkReceiver
from .recordlog import LOG_NAME


class LocalChunkCommitter(LocalChunkReceiver, LocalAssembler):
    """Making a received chunk count: its entry in the upload's record log."""

    async def commit(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        try:
            if self.fsync:
                await self._run(os.fdatasync, received.fd)
            if received.in_place and (meta.chunk_size is not None or meta.is_last(index)):
                committed = self._commit_in_place(received, meta, index)
                if self.fsync:
                    await self._run(os.fdatasync, received.log_fd)
                return committed
            lock = self._lock(meta.file_id, blocking=False)
            if lock.acquire():  # the common case: nobody else is changing this upload
                try:
                    return self._commit(received, meta, index)
                finally:
                    lock.release()
            return await self._run(self._commit_waiting, received, meta, index)
        except FolderGone:
            return self._ended(meta.file_id)
        except OSError as e:
            raise storage_error(e) from e
        finally:
            self._discard(received)  # after the commit, so the region lock held till here

    def _ended(self, file_id: str) -> CompletedUpload:
        """An upload whose folder is gone: its completion record, or UploadGone."""
        completed = self._read_completion(file_id)
        if completed is None:
            raise UploadGone()
        return completed

    def _commit_waiting(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        with self._lock(meta.file_id):
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
        return self._progress(meta, index, received.log_fd)

    def _commit(
        self, received: LocalPendingChunk, meta: UploadMeta, index: int
    ) -> Committed | CompletedUpload:
        """Write chunk `index`'s record; under the upload's flock."""
        file_id = meta.file_id
        folder = self._folder(file_id)
        completed = self._read_completion(file_id)
        if completed is not None:  # a retry after completion changes nothing
            return completed
        try:
            data = os.stat(folder / DATA_NAME)
        except FileNotFoundError:
            on_disk = self._read_meta(file_id)
            finished = self._complete(on_disk, None) if on_disk is not None else None
            if finished is not None:  # a completion cut short after its rename
                return finished
            raise UploadGone() from None
        if received.data_identity not in (None, (data.st_dev, data.st_ino)):
            raise UploadGone()  # removed and begun again meanwhile: not the same upload
        current = meta
        if meta.chunk_size is None and not meta.is_last(index):
            current = self._read_meta(file_id) or meta
            if current.chunk_size is None:  # learned from the first chunk other than the last
                current = replace(current, chunk_size=received.length)
                self._write_json(folder / META_NAME, asdict(current))
        if (
            received.in_place
            and current.chunk_size is not None
            and not current.is_last(index)
            and received.length > current.chunk_size
        ):
            self._overflow(received)  # its tail crosses into the next chunk's region
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
        folder = self._folder(meta.file_id)
        previous = self._records(meta.file_id).get(index)
        token = ""
        if received.aside_path is not None:
            if previous is not None and (previous.length, previous.crc64nvme) == (
                received.length,
                received.crc,
            ):
                return self._progress(meta, index, log_fd)  # the same bytes again
            token = secrets.token_hex(6)
            try:
                os.rename(received.aside_path, folder / aside_file(index, token))
            except FileNotFoundError:  # the folder it was received in was removed meanwhile
                raise UploadGone() from None
            received.aside_path = None
        entry = recordlog.Entry(recordlog.CHUNK, index, received.length, received.crc, token)
        recordlog.append(log_fd, entry)
        if self.fsync:
            os.fdatasync(log_fd)
        if previous is not None and previous.aside not in (None, aside_name(index, token)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / previous.aside)
        return self._progress(meta, index, log_fd)
