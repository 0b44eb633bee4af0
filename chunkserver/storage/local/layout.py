"""The shared state of the local disk's roles: paths, the state read from the data
folder, JSON records, the store's threads, and removal through the trash."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ...model import (
    ChunkRecord,
    Committed,
    CompletedUpload,
    UploadMeta,
    UploadProgress,
)
from . import recordlog
from .disk import (
    DATA_NAME,
    FREE_BYTES_CACHED_ABOVE,
    FREE_BYTES_MAX_AGE,
    INCOMING,
    LOCK_NAME,
    META_NAME,
    OPEN_FLAGS,
    RECORD_PREFIX,
    TRASH,
    KnownLog,
    T,
    aside_name,
    progress_in,
    writer_alive,
    writer_pid,
)
from .locks import FileLock
from .openuploads import OpenUploads
from .recordlog import LOG_NAME


class LocalLayout:
    """The shared state of the local disk's roles: the data folder's layout and paths, the
    state read from it (meta, completion record, the record log's fold), the store's threads,
    and the removal of folders through the trash."""

    def __init__(
        self, root: Path, *, fsync: bool = False, sha256: bool = False, threads: int = 8
    ) -> None:
        self.root = root
        self.fsync = fsync
        self.sha256 = sha256
        self.chunks_dir = root / "chunks"
        self.uploads_dir = root / "uploads"
        self.incoming_dir = self.chunks_dir / INCOMING
        self.trash_dir = self.chunks_dir / TRASH
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="chunkserver-store")
        self.known_logs: dict[str, KnownLog] = {}
        self.open_uploads = OpenUploads(DATA_NAME)
        self._free_bytes = 0
        self._free_bytes_at = -FREE_BYTES_MAX_AGE
        self._emptying_trash = threading.Lock()
        for folder in (self.chunks_dir, self.uploads_dir, self.incoming_dir, self.trash_dir):
            folder.mkdir(parents=True, exist_ok=True)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the store's threads."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    def folder(self, file_id: str) -> Path:
        """The folder of an upload in progress."""
        return self.chunks_dir / file_id

    def completion_path(self, file_id: str) -> Path:
        return self.uploads_dir / f"{file_id}.json"

    def final_path(self, meta: UploadMeta) -> Path:
        return self.uploads_dir / meta.file_id / meta.filename

    def lock(self, file_id: str, *, blocking: bool = True, create: bool = False) -> FileLock:
        """The upload's flock. Only `begin` creates the folder; for the others, FolderGone
        says the upload ended (completed, removed or expired) or never began."""
        return FileLock(self.folder(file_id) / LOCK_NAME, blocking=blocking, create=create)

    @staticmethod
    def temp_name(stem: str, suffix: str) -> str:
        return f"{stem}.{os.getpid()}.{secrets.token_hex(6)}{suffix}"

    def read_meta(self, file_id: str) -> UploadMeta | None:
        """The metadata of an upload in progress; None when there is none."""
        try:
            data = json.loads((self.folder(file_id) / META_NAME).read_bytes())
        except FileNotFoundError:
            return None
        return UploadMeta(**data)

    def read_completion(self, file_id: str) -> CompletedUpload | None:
        try:
            data = json.loads(self.completion_path(file_id).read_bytes())
        except FileNotFoundError:
            return None
        return CompletedUpload(**data)

    def records(self, file_id: str) -> dict[int, ChunkRecord]:
        """Every chunk's record in the upload's log, the last of each index."""
        fd = os.open(self.folder(file_id) / LOG_NAME, os.O_RDONLY | OPEN_FLAGS)
        try:
            entries, _ = recordlog.read_from(fd, 0)
        finally:
            os.close(fd)
        return {
            e.chunk_index: ChunkRecord(
                e.chunk_index, e.length, e.crc, aside_name(e.chunk_index, e.aside)
            )
            for e in entries
            if e.kind == recordlog.CHUNK
        }

    def bytes_in_progress(self, file_id: str) -> int | None:
        """What an upload in progress counts for in its identity's bytes quota (quotas.py):
        its declared length, else the bytes stored so far; None when it is not in progress."""
        meta = self.read_meta(file_id)
        if meta is None:
            return None
        if meta.total_size is not None:
            return meta.total_size
        try:
            if meta.is_stream:
                fd = os.open(self.folder(file_id) / LOG_NAME, os.O_RDONLY | OPEN_FLAGS)
                try:
                    return progress_in(fd)[0]
                finally:
                    os.close(fd)
            return sum(record.length for record in self.records(file_id).values())
        except FileNotFoundError:  # ended while we looked
            return None

    def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        # A completion writes its record before it removes the meta: when the meta is gone
        # too, the record is read again, or an upload completing meanwhile reads as none.
        return (
            self.read_completion(file_id)
            or self.read_meta(file_id)
            or self.read_completion(file_id)
        )

    def stored_indexes(self, file_id: str, total_chunks: int) -> tuple[frozenset[int], float]:
        """The chunk indexes recorded on disk and the time of the last write in the folder."""
        folder = self.folder(file_id)
        last = os.stat(folder).st_mtime
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name in (DATA_NAME, LOG_NAME) or name.endswith(".part"):
                    with contextlib.suppress(FileNotFoundError):
                        last = max(last, entry.stat().st_mtime)
        stored = frozenset(i for i in self.records(file_id) if i < total_chunks)
        return stored, last

    def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        completed = self.read_completion(file_id)
        if completed is not None:
            return completed
        meta = self.read_meta(file_id)
        if meta is None:  # none, or completed since the record was read (see _lookup)
            return self.read_completion(file_id)
        try:
            stored, last = self.stored_indexes(file_id, meta.total_chunks)
        except FileNotFoundError:  # completed, aborted or expired while we looked
            return self.read_completion(file_id)
        return UploadProgress(meta=meta, stored=stored, last_activity=last)

    def aside_path(self, folder: Path, index: int) -> Path:
        """A new file beside the data file for chunk `index`, kept aside while received."""
        return folder / self.temp_name(f".{RECORD_PREFIX}{index:06d}", ".part")

    def known_of(self, meta: UploadMeta) -> KnownLog:
        known = self.known_logs.get(meta.file_id)
        if known is None or known.token != meta.token:
            known = self.known_logs[meta.file_id] = KnownLog(meta.token)
        return known

    def progress(self, meta: UploadMeta, index: int, log_fd: int) -> Committed:
        known = self.known_of(meta)
        known.catch_up(log_fd)  # this chunk's entry, and what other processes stored: one read
        all_stored = known.folded >= meta.total_chunks
        return Committed(meta=meta, uploaded_chunks=known.stored_count, all_stored=all_stored)

    def discard_folder(self, file_id: str) -> None:
        """Remove the upload's folder now, not later through the trash (it holds no data)."""
        removed = self.remove_folder(file_id)
        if removed is not None:
            shutil.rmtree(removed, ignore_errors=True)

    def remove_folder(self, file_id: str) -> Path | None:
        """Take the upload's folder out of the tree at once; `empty_trash` unlinks it later.
        Returns where it went (None when it was not there).

        Unlinking a gigabyte takes 0.1 s, and seconds while the kernel writes it back, so a
        rename keeps that off the answer.
        """
        self.open_uploads.forget(file_id)
        trash = self.trash_dir / self.temp_name(file_id, ".removing")
        try:
            os.rename(self.folder(file_id), trash)
        except FileNotFoundError:
            return None
        return trash

    def run_later(self, fn: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # stopping: the next start's sweep does it
            self.executor.submit(fn)

    def empty_trash(self) -> None:
        """Remove the folders this process put in the trash, and those of dead processes."""
        with self._emptying_trash:
            try:
                with os.scandir(self.trash_dir) as entries:
                    names = [entry.name for entry in entries]
            except FileNotFoundError:
                return
            for name in names:
                if writer_pid(name) == os.getpid() or not writer_alive(name):
                    shutil.rmtree(self.trash_dir / name, ignore_errors=True)

    def free_bytes(self) -> int:
        """Free bytes on the data folder's filesystem.

        statvfs costs tens of microseconds on a busy ext4 and is asked on every chunk, so a
        figure up to FREE_BYTES_MAX_AGE old is reused while the disk has plenty of room; near
        full, every call asks the kernel, so that space freed or taken is seen at once.
        """
        now = time.monotonic()
        fresh_enough = now - self._free_bytes_at <= FREE_BYTES_MAX_AGE
        if not (fresh_enough and self._free_bytes >= FREE_BYTES_CACHED_ABOVE):
            stats = os.statvfs(self.root)
            self._free_bytes = stats.f_bavail * stats.f_frsize
            self._free_bytes_at = now
        return self._free_bytes

    def write_json_at(self, folder_fd: int, name: str, data: object) -> None:
        """Write `data` to `name` in the folder `folder_fd` atomically: a temp file, a rename."""
        temp = self.temp_name(f".{name}", ".tmp")
        fd = os.open(
            temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o644, dir_fd=folder_fd
        )
        try:
            os.write(fd, json.dumps(data).encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=folder_fd, dst_dir_fd=folder_fd)
        if self.fsync:
            os.fsync(folder_fd)

    def write_json(self, path: Path, data: object) -> None:
        """Write `data` to `path` atomically: a temp file beside it, then a rename."""
        folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        try:
            self.write_json_at(folder_fd, path.name, data)
        finally:
            os.close(folder_fd)

    def uploads_in_progress(self) -> list[str]:
        with os.scandir(self.chunks_dir) as entries:
            # file ids never start with a dot: those are .incoming and .trash
            return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
