"""Completion on the local disk: exactly once across processes, a rename in the
common case."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from ... import checksums
from ...errors import (
    StorageFailure,
    UploadConflict,
)
from ...model import (
    ChunkRecord,
    CompletedUpload,
    UploadMeta,
)
from ..faults import fault_point
from .disk import DATA_NAME, GUARD_OFFSET, OPEN_FLAGS, storage_error
from .fileio import copy_range, fsync_dir, hash_file
from .layout import LocalLayout
from .locks import FolderGone, lock_range
from .recordlog import LOG_NAME


class LocalAssembler:
    """Completion: the chunks kept aside copied into place, the data file renamed, the
    record written, exactly once across processes."""

    def __init__(self, layout: LocalLayout) -> None:
        self.layout = layout

    async def complete(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        try:
            return await self.layout.run(self._complete_locked, meta)
        except OSError as e:
            raise storage_error(e) from e

    def _complete_locked(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        try:
            with (
                self.whole_data_file(meta.file_id, wait=True) as data_fd,
                self.layout.lock(meta.file_id),
            ):
                completed = self.layout.read_completion(meta.file_id)
                if completed is not None:
                    return completed, False
                on_disk = self.layout.read_meta(meta.file_id)
                if on_disk is None:
                    return None
                record = self.complete_held(on_disk, data_fd)
                return (record, True) if record is not None else None
        except FolderGone:  # another request completed it (or it was removed) first
            completed = self.layout.read_completion(meta.file_id)
            return (completed, False) if completed is not None else None

    @contextlib.contextmanager
    def settled(self, file_id: str) -> Iterator[None]:
        """Wait until no completion, abandon, expiry or delete of the upload is under way, and
        keep them from starting (a shared lock on the data file's GUARD_OFFSET byte, as a
        chunk kept aside holds). A chunk that found its upload ending asks again through
        `begin`, which then sees the upload before or after, never while it ends."""
        try:
            fd = os.open(self.layout.folder(file_id) / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            yield
            return
        try:
            lock_range(fd, GUARD_OFFSET, 1, wait=True, shared=True)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def whole_data_file(self, file_id: str, *, wait: bool) -> Iterator[int | None]:
        """The data file, locked whole once no chunk is being received into the upload.

        Yields None when there is no data file, or it is busy and `wait` is False. Waiting,
        take it before the upload's flock, in the same order as a chunk's writer (its range
        lock, then the flock to commit), so the two never wait for each other.
        """
        try:
            fd = os.open(self.layout.folder(file_id) / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            yield None
            return
        try:
            yield fd if lock_range(fd, 0, 0, wait=wait) else None
        finally:
            os.close(fd)

    def _folded(self, meta: UploadMeta) -> tuple[int, int, list[ChunkRecord]] | None:
        """What this process folded of the log, brought up to date: see KnownLog.whole."""
        known = self.layout.known_of(meta)
        fd = os.open(self.layout.folder(meta.file_id) / LOG_NAME, os.O_RDONLY | OPEN_FLAGS)
        try:
            known.catch_up(fd)
        finally:
            os.close(fd)
        return known.whole(meta)

    def _load_records(self, meta: UploadMeta) -> list[ChunkRecord] | None:
        """Every chunk's record in order, or None while one is missing."""
        records = self.layout.records(meta.file_id)
        if any(index not in records for index in range(meta.total_chunks)):
            return None
        return [records[index] for index in range(meta.total_chunks)]

    def complete_held(self, meta: UploadMeta, data_fd: int | None) -> CompletedUpload | None:
        """Complete an upload whose chunks are all recorded; under its flock, with its data
        file (when it is still there) locked whole."""
        folded = self._folded(meta)
        records: list[ChunkRecord] | None
        if folded is not None:
            size, crc, records = folded  # every chunk even; the records are those kept aside
        else:
            records = self._load_records(meta)
            if records is None:
                return None
            size = sum(r.length for r in records)
            crc = checksums.combine((r.crc64nvme, r.length) for r in records)
        if meta.total_size is not None and size != meta.total_size:
            raise UploadConflict(
                f"The merged size {size} does not match total_size {meta.total_size}"
            )
        folder = self.layout.folder(meta.file_id)
        final = self.layout.final_path(meta)
        data_path = folder / DATA_NAME
        if data_fd is not None and data_path.exists():
            placed = self._place_chunks(meta, records, size, data_fd)
            final.parent.mkdir(exist_ok=True)
            fault_point("local-before-rename")
            os.rename(placed, final)
            fault_point("local-after-rename")
            if self.layout.fsync:
                fsync_dir(final.parent)
                fsync_dir(self.layout.uploads_dir)
        elif not (final.is_file() and final.stat().st_size == size):
            # Not renamed by a completion a crash cut short either: the bytes are lost.
            raise StorageFailure(f"the data file of {meta.file_id} is missing")
        sha256 = None
        if self.layout.sha256:
            digest = hashlib.sha256()
            with open(final, "rb") as f:
                hash_file(f.fileno(), size, digest)
            sha256 = digest.hexdigest()
        completed = CompletedUpload.of(
            meta, size=size, crc64nvme=checksums.to_s3(crc), sha256=sha256
        )
        self.layout.write_json(self.layout.completion_path(meta.file_id), completed.stored())
        self.layout.remove_folder(meta.file_id)
        self.layout.known_logs.pop(meta.file_id, None)
        self.layout.run_later(self.layout.empty_trash)
        return completed

    def _place_chunks(
        self, meta: UploadMeta, records: list[ChunkRecord], size: int, fd: int
    ) -> Path:
        """Make a file holding the chunks in order, exactly `size` bytes; return its path.

        The common case is the data file itself: the chunks kept aside are copied into
        their regions, the rest is cut off. Uneven chunks are joined into a new file.
        """
        folder = self.layout.folder(meta.file_id)
        cs = meta.chunk_size or 0
        if all(r.length == cs for r in records[:-1]):
            for record in records:
                if record.aside is not None:
                    self._copy_aside(folder / record.aside, record, fd, record.index * cs)
            os.ftruncate(fd, size)
            if self.layout.fsync:
                os.fsync(fd)
            return folder / DATA_NAME
        joined = folder / self.layout.temp_name(".merge", ".merging")
        out = os.open(joined, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o644)
        try:
            position = 0
            for record in records:
                if record.aside is not None:
                    self._copy_aside(folder / record.aside, record, out, position)
                else:
                    copy_range(fd, record.index * cs, out, position, record.length)
                position += record.length
            if self.layout.fsync:
                os.fsync(out)
        finally:
            os.close(out)
        return joined

    @staticmethod
    def _copy_aside(path: Path, record: ChunkRecord, out: int, position: int) -> None:
        src = os.open(path, os.O_RDONLY | OPEN_FLAGS)
        try:
            copy_range(src, 0, out, position, record.length)
        finally:
            os.close(src)
