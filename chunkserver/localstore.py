"""The local-disk backend: the only code that builds paths, and the truth about every upload.

Layout under the data folder:

    chunks/<file_id>/.meta.json         filename, total_chunks, total_size, chunk_size, token
    chunks/<file_id>/.data              the upload's one data file: chunk N at N x chunk_size
    chunks/<file_id>/.records           the record log: an entry per stored chunk (length, CRC,
                                        place) and per tus PATCH (offset, CRC); recordlog.py
    chunks/<file_id>/.lock              the cross-process lock (flock) of the upload's state
    chunks/<file_id>/.chunk_000003.<pid>.<rand>.part   a chunk kept aside, being received
    chunks/<file_id>/.chunk_000003.<rand>.aside        a chunk kept aside, stored
    chunks/<file_id>/.merge.<pid>.<rand>.merging       uneven chunks being joined (rare)
    chunks/.incoming/<pid>.<rand>.part  a chunk received before its form fields
    chunks/.trash/...                   finished or removed upload folders, being unlinked
    uploads/<file_id>/<filename>        the completed file: the data file, renamed
    uploads/<file_id>.json              the completion record: size, crc64nvme, sha256

Invariants:
- A chunk's bytes are written once. They stream from the socket to offset N x chunk_size of
  the data file, under a byte-range lock on that region (`locks.lock_range`), so two requests
  writing the same chunk never mix their bytes, in one process or several. A chunk whose
  place is not known yet (chunk_size not fixed), whose region is busy, or that was stored
  before (a resend) is kept aside in a file of its own and copied into place at completion;
  its writer holds a shared lock on the data file's GUARD_OFFSET byte meanwhile.
- Every chunk in flight thus holds a lock on the data file, so completing, abandoning,
  expiring or deleting an upload, which lock the whole file, never happens under a chunk
  still being received.
- A chunk counts exactly when its entry is in the upload's record log (the last entry of an
  index wins). The entry is appended after its bytes are written; a chunk cut off at any
  instant has no entry and is simply sent again. A region that an entry points to is never
  written again. A chunk written in place whose region is known appends its entry with no
  other lock than its region's: nothing can end the upload under it. The others (the chunk
  that fixes chunk_size, chunks kept aside) commit under the upload's flock. No file is
  created on the path of a chunk written in place.
- An upload is completed exactly when its completion record exists. Completion joins nothing
  in the common case: it reads the log once, copies the chunks kept aside into place,
  truncates, renames the data file into `uploads/`, then writes the record. A crash between
  the rename and the record is finished by the next sweep from the renamed file.
- `meta.json` exists only once the data file does, and meta's chunk_size, once set, never
  changes.
- A tus upload is one chunk written at offsets: each PATCH streams at the recorded offset
  under an exclusive lock on the data file's WRITER_OFFSET byte (one writer across
  processes), then an entry with the new offset is appended to the log. When the offset
  reaches the length, chunk 0's entry goes with it and the completion is a seed upload's.

The hot path (receive, commit) runs on the event loop: writes to the page cache and a few
small syscalls cost less than handing each chunk to a thread (bench/README.md). Everything
that may wait (the flock held by another process, fsync, completion, sweep) runs in the
store's own threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from . import checksums, recordlog
from .errors import (
    DiskFull,
    OffsetMismatch,
    StorageFailure,
    UploadConflict,
    UploadGone,
    UploadLocked,
)
from .fileio import copy_range, fsync_dir, hash_file, pwritev_all
from .locks import FileLock, FolderGone, lock_range, pid_alive, unlock_range
from .meter import count_piece
from .model import (
    ChunkRecord,
    Committed,
    CompletedUpload,
    StreamProgress,
    SweepReport,
    UploadMeta,
    UploadProgress,
)
from .openuploads import OpenUpload, OpenUploads
from .outbox import FolderOutbox
from .recordlog import LOG_NAME

T = TypeVar("T")

RECORD_PREFIX = "chunk_"
DATA_NAME = ".data"
META_NAME = ".meta.json"
LOCK_NAME = ".lock"
ASIDE_SUFFIX = ".aside"
INCOMING = ".incoming"
TRASH = ".trash"
TEMP_SUFFIXES = (".part", ".merging", ".tmp")
# Bytes gathered from the socket's buffers before one pwritev: fewer syscalls, and at most
# this much held per request whatever the chunk size.
WRITE_BATCH_BYTES = 1024 * 1024
# Stay well below IOV_MAX (1024) however small the pieces a slow client sends.
MAX_BATCH_PIECES = 256
# A byte far past any data: chunks kept aside hold a shared lock on it while they are received.
GUARD_OFFSET = 1 << 62
# The byte a tus upload's writer locks (exclusive): one PATCH at a time, in any process.
WRITER_OFFSET = GUARD_OFFSET - 1
WRITER_KEY = -1  # the tus writer in OpenUpload.writing (chunk indexes are 0 or more)
FREE_BYTES_MAX_AGE = 0.05  # seconds
FREE_BYTES_CACHED_ABOVE = 4 * 1024**3
# A folder with no metadata and no live temporary file is a leftover after this long.
ORPHAN_GRACE_SECONDS = 60.0
OPEN_FLAGS = os.O_CLOEXEC


@dataclass(slots=True)
class LocalPendingChunk:
    """A chunk's bytes on disk, not yet committed; holds its fd (and region lock) till then."""

    fd: int
    base: int  # where the chunk starts in the file behind `fd`
    guard_fd: int  # the data file, locked (see GUARD_OFFSET), when the bytes are aside; or -1
    limit: int | None  # bytes the chunk may take at this place; None: no bound
    aside_path: Path | None  # None: in place in the upload's data file
    # (dev, inode) of the data file that holds the bytes; None when they are kept aside, in a
    # file of the upload's folder that leaves with the folder if the upload is removed.
    data_identity: tuple[int, int] | None
    declared_size: bool  # a chunk longer than `limit` is refused, not put aside
    folder: Path | None
    index: int | None
    # The upload's folder, opened before its data file: the in-place commit writes
    # the record through it, so the record lands in the folder that holds these bytes even if
    # that folder has been removed (and its file_id begun again) meanwhile. Or -1.
    folder_fd: int = -1
    log_fd: int = -1  # the record log, open for the in-place commit; or -1
    # Written in place: the upload's shared open files (whose descriptors above are not this
    # chunk's to close), and the region locked on its data file.
    upload: OpenUpload | None = None
    region: tuple[int, int] = (0, 0)
    writing_key: int = 0  # in upload.writing: the chunk's index, or WRITER_KEY (tus)
    length: int = 0
    written: int = 0
    crc: int = 0
    digest: Any = None  # hashlib sha256 when asked for

    def sha256_hex(self) -> str | None:
        return self.digest.hexdigest() if self.digest is not None else None

    @property
    def in_place(self) -> bool:
        return self.aside_path is None


@dataclass(slots=True)
class LocalPendingBytes:
    """A tus PATCH's bytes in the data file at the upload's offset, not yet counted."""

    chunk: LocalPendingChunk  # the data file (its writer byte locked) and the folder, open
    meta: UploadMeta
    crc_before: int  # the CRC of the upload's bytes before `chunk.base`

    @property
    def length(self) -> int:
        return self.chunk.written


@dataclass(slots=True)
class _Known:
    """What this process has read of one upload's record log, folded as it is read: a cache
    of the log, which stays the truth.

    Chunks 0..folded-1 are stored and their sizes and CRCs combined, so a completion needs no
    second pass over the log (65,536 entries for 1 GiB in 16 KiB chunks). An entry that
    replaces a folded chunk (a resend of other bytes) makes the fold inexact; a completion
    then reads the whole log.
    """

    token: str
    position: int = 0  # how far the log has been read
    folded: int = 0
    size: int = 0
    crc: int = 0
    aside: list[ChunkRecord] = field(default_factory=list)  # folded chunks kept aside
    body_lengths: set[int] = field(default_factory=set)  # of folded chunks but the latest
    latest_length: int = 0
    exact: bool = True
    pending: dict[int, recordlog.Entry] = field(default_factory=dict)  # stored past `folded`
    # The loop and the store's threads both read the log into this.
    mutex: threading.Lock = field(default_factory=threading.Lock)

    @property
    def stored_count(self) -> int:
        return self.folded + len(self.pending)

    def is_stored(self, index: int) -> bool:
        return index < self.folded or index in self.pending

    def catch_up(self, log_fd: int) -> None:
        """Read what was appended to the log since the last time, by any process."""
        with self.mutex:
            entries, self.position = recordlog.read_from(log_fd, self.position)
            for entry in entries:
                if entry.kind != recordlog.CHUNK:
                    continue
                if entry.chunk_index < self.folded:
                    self.exact = False
                else:
                    self.pending[entry.chunk_index] = entry
            while self.folded in self.pending:
                self._fold(self.pending.pop(self.folded))

    def _fold(self, entry: recordlog.Entry) -> None:
        if self.folded:
            self.body_lengths.add(self.latest_length)
        self.latest_length = entry.length
        self.size += entry.length
        self.crc = checksums.combine_two(self.crc, entry.crc, entry.length)
        if entry.aside:
            record = ChunkRecord(
                entry.chunk_index,
                entry.length,
                entry.crc,
                _aside_file(entry.chunk_index, entry.aside),
            )
            self.aside.append(record)
        self.folded += 1

    def whole(self, meta: UploadMeta) -> tuple[int, int, list[ChunkRecord]] | None:
        """(size, crc, chunks kept aside) when every chunk is folded, exactly, and all but
        the last are chunk_size long; None otherwise (read the log then)."""
        if not self.exact or self.folded != meta.total_chunks:
            return None
        if not self.body_lengths <= {meta.chunk_size}:
            return None
        return self.size, self.crc, self.aside


class LocalStore:
    """Uploads on a local filesystem; safe for several processes sharing `root`."""

    keeps_bytes_locally = True

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
        self._known: dict[str, _Known] = {}
        self._open_uploads = OpenUploads(DATA_NAME)
        self._free_bytes = 0
        self._free_bytes_at = -FREE_BYTES_MAX_AGE
        self._emptying_trash = threading.Lock()
        for folder in (self.chunks_dir, self.uploads_dir, self.incoming_dir, self.trash_dir):
            folder.mkdir(parents=True, exist_ok=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args))

    async def open(self) -> None:
        """Nothing to connect to: the folders are made in the constructor."""

    def outbox(self) -> FolderOutbox:
        return FolderOutbox(self.root / "outbox", fsync=self.fsync)

    def location_of(self, file_id: str, filename: str) -> str:
        return f"uploads/{file_id}/{filename}"

    async def close(self) -> None:
        self.executor.shutdown(wait=True)
        self._open_uploads.close_all()

    # -- paths (file_id and filename are validated by the handlers before they get here) --

    def _folder(self, file_id: str) -> Path:
        return self.chunks_dir / file_id

    def _completion_path(self, file_id: str) -> Path:
        return self.uploads_dir / f"{file_id}.json"

    def _final_path(self, meta: UploadMeta) -> Path:
        return self.uploads_dir / meta.file_id / meta.filename

    def _lock(self, file_id: str, *, blocking: bool = True, create: bool = False) -> FileLock:
        """The upload's flock. Only `begin` creates the folder; for the others, FolderGone
        says the upload ended (completed, removed or expired) or never began."""
        return FileLock(self._folder(file_id) / LOCK_NAME, blocking=blocking, create=create)

    @staticmethod
    def _temp_name(stem: str, suffix: str) -> str:
        return f"{stem}.{os.getpid()}.{secrets.token_hex(6)}{suffix}"

    # -- reading state --

    def _read_meta(self, file_id: str) -> UploadMeta | None:
        try:
            data = json.loads((self._folder(file_id) / META_NAME).read_bytes())
        except FileNotFoundError:
            return None
        return UploadMeta(**data)

    def _read_completion(self, file_id: str) -> CompletedUpload | None:
        try:
            data = json.loads(self._completion_path(file_id).read_bytes())
        except FileNotFoundError:
            return None
        return CompletedUpload(**data)

    def _records(self, file_id: str) -> dict[int, ChunkRecord]:
        """Every chunk's record in the upload's log, the last of each index."""
        fd = os.open(self._folder(file_id) / LOG_NAME, os.O_RDONLY | OPEN_FLAGS)
        try:
            entries, _ = recordlog.read_from(fd, 0)
        finally:
            os.close(fd)
        return {
            e.chunk_index: ChunkRecord(
                e.chunk_index, e.length, e.crc, _aside_name(e.chunk_index, e.aside)
            )
            for e in entries
            if e.kind == recordlog.CHUNK
        }

    def _lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        # A completion writes its record before it removes the meta: when the meta is gone
        # too, the record is read again, or an upload completing meanwhile reads as none.
        return (
            self._read_completion(file_id)
            or self._read_meta(file_id)
            or self._read_completion(file_id)
        )

    async def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        return self._lookup(file_id)  # two small reads: cheaper than a thread hop

    def _stored_indexes(self, file_id: str, total_chunks: int) -> tuple[frozenset[int], float]:
        """The chunk indexes recorded on disk and the time of the last write in the folder."""
        folder = self._folder(file_id)
        last = os.stat(folder).st_mtime
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name in (DATA_NAME, LOG_NAME) or name.endswith(".part"):
                    with contextlib.suppress(FileNotFoundError):
                        last = max(last, entry.stat().st_mtime)
        stored = frozenset(i for i in self._records(file_id) if i < total_chunks)
        return stored, last

    def _status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        completed = self._read_completion(file_id)
        if completed is not None:
            return completed
        meta = self._read_meta(file_id)
        if meta is None:  # none, or completed since the record was read (see _lookup)
            return self._read_completion(file_id)
        try:
            stored, last = self._stored_indexes(file_id, meta.total_chunks)
        except FileNotFoundError:  # completed, aborted or expired while we looked
            return self._read_completion(file_id)
        return UploadProgress(meta=meta, stored=stored, last_activity=last)

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        return await self._run(self._status, file_id)

    # -- beginning --

    async def begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        try:
            return await self._run(self._begin, proposed)
        except OSError as e:
            raise storage_error(e) from e

    def _begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        file_id = proposed.file_id
        with self._settled(file_id):
            completed = self._read_completion(file_id)
            if completed is not None:  # before the lock, which would make the folder again
                return completed, False
            with self._lock(file_id, create=True):
                return self._begin_locked(proposed)

    def _begin_locked(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        file_id = proposed.file_id
        completed = self._read_completion(file_id)
        if completed is not None:
            if self._read_meta(file_id) is None:  # completed since we looked: the lock
                self._discard_folder(file_id)  # made the folder again, take it away
            return completed, False
        meta = self._read_meta(file_id)
        if meta is not None and not (self._folder(file_id) / DATA_NAME).exists():
            # A completion cut short after its rename: finish it now.
            completed = self._complete(meta, None)
            if completed is not None:
                return completed, False
        if meta is not None:
            adopted = meta
            if meta.chunk_size is None and proposed.chunk_size_declared:
                adopted = replace(adopted, chunk_size=proposed.chunk_size, chunk_size_declared=True)
            if meta.metadata is None and proposed.metadata is not None:
                adopted = replace(adopted, metadata=proposed.metadata)
            if adopted != meta:
                meta = adopted
                self._write_json(self._folder(file_id) / META_NAME, asdict(meta))
            _touch(self._folder(file_id) / LOG_NAME)  # begun by a version without the log
            return meta, False
        self._create_data_file(proposed)
        _touch(self._folder(file_id) / LOG_NAME)
        self._write_json(self._folder(file_id) / META_NAME, asdict(proposed))
        if self.fsync:
            fsync_dir(self.chunks_dir)
        return proposed, True

    def _create_data_file(self, meta: UploadMeta) -> None:
        """The data file, with the whole upload's room reserved when its size is known."""
        path = self._folder(meta.file_id) / DATA_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | OPEN_FLAGS, 0o644)
        try:
            if meta.total_size:
                # A full disk answers 507 now, before the client sends a byte of the file.
                os.posix_fallocate(fd, 0, meta.total_size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    async def abandon(self, meta: UploadMeta) -> None:
        await self._run(self._abandon, meta)

    def _abandon(self, meta: UploadMeta) -> None:
        """Remove the upload if it holds no record, no chunk kept aside and no writer; at once,
        trash included, since the refused request that began it is answered after this."""
        with contextlib.suppress(FolderGone), self._lock(meta.file_id):
            self._abandon_locked(meta)

    def _abandon_locked(self, meta: UploadMeta) -> None:
        folder = self._folder(meta.file_id)
        on_disk = self._read_meta(meta.file_id)
        if on_disk is None or on_disk.token != meta.token:
            return
        try:
            fd = os.open(folder / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            return
        try:
            if not lock_range(fd, 0, 0, wait=False):
                return  # a chunk is being written in place
            if any(n.endswith(".part") for n in os.listdir(folder)):
                return  # a chunk is being received aside
            with contextlib.suppress(FileNotFoundError):
                if os.stat(folder / LOG_NAME).st_size:
                    return  # a chunk is stored
            self._discard_folder(meta.file_id)  # unlinked, not left in the trash
        finally:
            os.close(fd)

    # -- receiving: the hot path --

    async def receive(
        self,
        meta: UploadMeta,
        index: int,
        body: AsyncIterator[memoryview],
        *,
        max_bytes: int,
        want_sha256: bool,
        length_hint: int | None = None,  # a file needs none: its offset is enough
    ) -> LocalPendingChunk:
        received = self._open_for_chunk(meta, index, max_bytes)
        await self._stream(received, body, max_bytes, want_sha256)
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, max_bytes: int, want_sha256: bool
    ) -> LocalPendingChunk:
        path = self.incoming_dir / self._temp_name("chunk", ".part")
        received = self._open_aside(path, None, None)
        await self._stream(received, body, max_bytes, want_sha256)
        return received

    def _aside_path(self, folder: Path, index: int) -> Path:
        """A new file beside the data file for chunk `index`, kept aside while received."""
        return folder / self._temp_name(f".{RECORD_PREFIX}{index:06d}", ".part")

    def _open_for_chunk(self, meta: UploadMeta, index: int, max_bytes: int) -> LocalPendingChunk:
        """The chunk's region in the data file, locked; or a file aside when it cannot be
        written in place. Raises UploadGone when the data file is not there."""
        offset = meta.offset_of(index)
        if offset is not None:
            received = self._open_in_place(meta, index, offset, max_bytes)
            if received is not None:
                return received
        return self._open_kept_aside(meta, index)

    def _open_in_place(
        self, meta: UploadMeta, index: int, offset: int, max_bytes: int
    ) -> LocalPendingChunk | None:
        """The chunk's region, locked, in the upload's data file held open across its chunks;
        None when the region is busy or the chunk was stored before (a resend)."""
        limit = None if meta.is_last(index) or meta.chunk_size is None else meta.chunk_size
        region = (offset, limit or max_bytes)
        known = self._known_of(meta)

        def not_stored(upload: OpenUpload) -> bool:
            known.catch_up(upload.log_fd)
            return not known.is_stored(index)

        upload = self._hold_region(meta, index, region, not_stored)
        if upload is None:
            return None
        return self._written_through(
            upload, meta, offset, region, index, limit=limit, declared_size=meta.chunk_size_declared
        )

    def _written_through(
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
            folder=self._folder(meta.file_id),
            index=max(key, 0),  # a tus upload (WRITER_KEY) is chunk 0
            folder_fd=upload.folder_fd,
            log_fd=upload.log_fd,
            upload=upload,
            region=region,
            writing_key=key,
        )

    def _hold_region(
        self,
        meta: UploadMeta,
        key: int,
        region: tuple[int, int],
        ready: Callable[[OpenUpload], bool],
    ) -> OpenUpload | None:
        """The upload's open files, with `region` of its data file locked and `key` marked
        as being written by this process, once `ready` says so under the lock; None when
        the region is busy (here or in another process) or `ready` says no."""
        folder = self._folder(meta.file_id)
        try:
            upload = self._open_uploads.acquire(folder, meta.file_id, meta.token)
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
                self._open_uploads.forget(meta.file_id)
                raise UploadGone()
            if not ready(upload):
                return None
            upload.writing.add(key)
            held = True
        except FileNotFoundError:
            self._open_uploads.forget(meta.file_id)
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e
        finally:
            if not held:
                if locked:
                    unlock_range(upload.data_fd, *region)
                self._open_uploads.release(upload)
        return upload

    def _open_kept_aside(self, meta: UploadMeta, index: int) -> LocalPendingChunk:
        """A file of its own for a chunk whose place is unknown or busy, or that was stored
        before (whose bytes must not touch its region); the data file stays open beside it
        with a shared lock on its GUARD_OFFSET byte, until the commit."""
        folder = self._folder(meta.file_id)
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
            received = self._open_aside(self._aside_path(folder, index), folder, index)
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

    async def _stream(
        self,
        received: LocalPendingChunk,
        body: AsyncIterator[memoryview],
        max_bytes: int,
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
                    self._overflow(received)
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
            self._discard(received)
            raise

    def _write(self, received: LocalPendingChunk, batch: list[memoryview], size: int) -> None:
        try:
            pwritev_all(received.fd, batch, received.base + received.written)
        except OSError as e:
            raise storage_error(e) from e
        received.written += size

    def _overflow(self, received: LocalPendingChunk) -> None:
        """The chunk outgrows its region: refuse it, or move what is written aside."""
        if received.declared_size or received.folder is None or received.index is None:
            raise UploadConflict(
                f"Chunk {received.index} is larger than the chunk_size "
                f"({received.limit} bytes) of this upload"
            )
        path = self._aside_path(received.folder, received.index)
        aside = self._open_aside(path, received.folder, received.index)
        try:
            copy_range(received.fd, received.base, aside.fd, 0, received.written)
        except OSError as e:
            self._discard(aside)
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
        await self._run(hash_file, received.fd, received.length, digest, received.base)
        return digest.hexdigest()

    async def discard(self, received: LocalPendingChunk) -> None:
        self._discard(received)

    def _discard(self, received: LocalPendingChunk) -> None:
        upload = received.upload
        if upload is not None:  # its descriptors are the upload's, shared: not closed here
            for name in ("fd", "guard_fd", "folder_fd", "log_fd"):
                if getattr(received, name) in (upload.data_fd, upload.folder_fd, upload.log_fd):
                    setattr(received, name, -1)
            unlock_range(upload.data_fd, *received.region)
            upload.writing.discard(received.writing_key)
            received.upload = None
            self._open_uploads.release(upload)
        if received.fd >= 0:
            os.close(received.fd)
            received.fd = -1
        if received.guard_fd >= 0:
            os.close(received.guard_fd)
            received.guard_fd = -1
        if received.folder_fd >= 0:
            os.close(received.folder_fd)
            received.folder_fd = -1
        if received.log_fd >= 0:
            os.close(received.log_fd)
            received.log_fd = -1
        if received.aside_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(received.aside_path)

    # -- committing --

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
                os.rename(received.aside_path, folder / _aside_file(index, token))
            except FileNotFoundError:  # the folder it was received in was removed meanwhile
                raise UploadGone() from None
            received.aside_path = None
        entry = recordlog.Entry(recordlog.CHUNK, index, received.length, received.crc, token)
        recordlog.append(log_fd, entry)
        if self.fsync:
            os.fdatasync(log_fd)
        if previous is not None and previous.aside not in (None, _aside_name(index, token)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / previous.aside)
        return self._progress(meta, index, log_fd)

    def _known_of(self, meta: UploadMeta) -> _Known:
        known = self._known.get(meta.file_id)
        if known is None or known.token != meta.token:
            known = self._known[meta.file_id] = _Known(meta.token)
        return known

    def _progress(self, meta: UploadMeta, index: int, log_fd: int) -> Committed:
        known = self._known_of(meta)
        known.catch_up(log_fd)  # this chunk's entry, and what other processes stored: one read
        all_stored = known.folded >= meta.total_chunks
        return Committed(meta=meta, uploaded_chunks=known.stored_count, all_stored=all_stored)

    # -- completing --

    async def complete(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        try:
            return await self._run(self._complete_locked, meta)
        except OSError as e:
            raise storage_error(e) from e

    def _complete_locked(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        try:
            with (
                self._whole_data_file(meta.file_id, wait=True) as data_fd,
                self._lock(meta.file_id),
            ):
                completed = self._read_completion(meta.file_id)
                if completed is not None:
                    return completed, False
                on_disk = self._read_meta(meta.file_id)
                if on_disk is None:
                    return None
                record = self._complete(on_disk, data_fd)
                return (record, True) if record is not None else None
        except FolderGone:  # another request completed it (or it was removed) first
            completed = self._read_completion(meta.file_id)
            return (completed, False) if completed is not None else None

    @contextlib.contextmanager
    def _settled(self, file_id: str) -> Iterator[None]:
        """Wait until no completion, abandon, expiry or delete of the upload is under way, and
        keep them from starting (a shared lock on the data file's GUARD_OFFSET byte, as a
        chunk kept aside holds). A chunk that found its upload ending asks again through
        `begin`, which then sees the upload before or after, never while it ends."""
        try:
            fd = os.open(self._folder(file_id) / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            yield
            return
        try:
            lock_range(fd, GUARD_OFFSET, 1, wait=True, shared=True)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _whole_data_file(self, file_id: str, *, wait: bool) -> Iterator[int | None]:
        """The data file, locked whole once no chunk is being received into the upload.

        Yields None when there is no data file, or it is busy and `wait` is False. Waiting,
        take it before the upload's flock, in the same order as a chunk's writer (its range
        lock, then the flock to commit), so the two never wait for each other.
        """
        try:
            fd = os.open(self._folder(file_id) / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            yield None
            return
        try:
            yield fd if lock_range(fd, 0, 0, wait=wait) else None
        finally:
            os.close(fd)

    def _folded(self, meta: UploadMeta) -> tuple[int, int, list[ChunkRecord]] | None:
        """What this process folded of the log, brought up to date: see _Known.whole."""
        known = self._known_of(meta)
        fd = os.open(self._folder(meta.file_id) / LOG_NAME, os.O_RDONLY | OPEN_FLAGS)
        try:
            known.catch_up(fd)
        finally:
            os.close(fd)
        return known.whole(meta)

    def _load_records(self, meta: UploadMeta) -> list[ChunkRecord] | None:
        """Every chunk's record in order, or None while one is missing."""
        records = self._records(meta.file_id)
        if any(index not in records for index in range(meta.total_chunks)):
            return None
        return [records[index] for index in range(meta.total_chunks)]

    def _complete(self, meta: UploadMeta, data_fd: int | None) -> CompletedUpload | None:
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
        folder = self._folder(meta.file_id)
        final = self._final_path(meta)
        data_path = folder / DATA_NAME
        if data_fd is not None and data_path.exists():
            placed = self._place_chunks(meta, records, size, data_fd)
            final.parent.mkdir(exist_ok=True)
            os.rename(placed, final)
            if self.fsync:
                fsync_dir(final.parent)
                fsync_dir(self.uploads_dir)
        elif not (final.is_file() and final.stat().st_size == size):
            # Not renamed by a completion a crash cut short either: the bytes are lost.
            raise StorageFailure(f"the data file of {meta.file_id} is missing")
        sha256 = None
        if self.sha256:
            digest = hashlib.sha256()
            with open(final, "rb") as f:
                hash_file(f.fileno(), size, digest)
            sha256 = digest.hexdigest()
        completed = CompletedUpload.of(
            meta, size=size, crc64nvme=checksums.to_s3(crc), sha256=sha256
        )
        self._write_json(self._completion_path(meta.file_id), asdict(completed))
        self._remove_folder(meta.file_id)
        self._known.pop(meta.file_id, None)
        self._run_later(self.empty_trash)
        return completed

    def _place_chunks(
        self, meta: UploadMeta, records: list[ChunkRecord], size: int, fd: int
    ) -> Path:
        """Make a file holding the chunks in order, exactly `size` bytes; return its path.

        The common case is the data file itself: the chunks kept aside are copied into
        their regions, the rest is cut off. Uneven chunks are joined into a new file.
        """
        folder = self._folder(meta.file_id)
        cs = meta.chunk_size or 0
        if all(r.length == cs for r in records[:-1]):
            for record in records:
                if record.aside is not None:
                    self._copy_aside(folder / record.aside, record, fd, record.index * cs)
            os.ftruncate(fd, size)
            if self.fsync:
                os.fsync(fd)
            return folder / DATA_NAME
        joined = folder / self._temp_name(".merge", ".merging")
        out = os.open(joined, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_FLAGS, 0o644)
        try:
            position = 0
            for record in records:
                if record.aside is not None:
                    self._copy_aside(folder / record.aside, record, out, position)
                else:
                    copy_range(fd, record.index * cs, out, position, record.length)
                position += record.length
            if self.fsync:
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

    # -- tus uploads: one chunk written at offsets --

    def _read_progress_at(self, folder_fd: int) -> tuple[int, int]:
        """(offset, crc) of a tus upload; (0, 0) before its first bytes."""
        try:
            fd = os.open(LOG_NAME, os.O_RDONLY | OPEN_FLAGS, dir_fd=folder_fd)
        except FileNotFoundError:
            return 0, 0
        try:
            return _progress_in(fd)
        finally:
            os.close(fd)

    def _stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        completed = self._read_completion(meta.file_id)
        if completed is not None:
            return completed
        folder = self._folder(meta.file_id)
        try:
            folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        except FileNotFoundError:
            return self._read_completion(meta.file_id)
        try:
            on_disk = self._read_meta(meta.file_id)
            if on_disk is None:
                return self._read_completion(meta.file_id)
            offset, crc = self._read_progress_at(folder_fd)
            _, last = self._stored_indexes(meta.file_id, on_disk.total_chunks)
        except FileNotFoundError:  # completed or removed while we looked
            return self._read_completion(meta.file_id)
        finally:
            os.close(folder_fd)
        return StreamProgress(on_disk, offset, crc, last)

    async def stream_progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        return await self._run(self._stream_progress, meta)

    async def receive_at(
        self,
        meta: UploadMeta,
        offset: int,
        body: AsyncIterator[memoryview],
        *,
        length: int | None,
        max_bytes: int,
        on_piece: Callable[[memoryview], None] | None,
    ) -> LocalPendingBytes:
        received = self._open_at(meta, offset)
        # The same hot path as a chunk's, at the upload's offset (the HTTP layer holds the
        # body to its Content-Length, `length`, when it has one).
        limit = max_bytes if length is None else min(length, max_bytes)
        try:
            await self._stream(received.chunk, body, limit, False, on_piece)
        except BaseException:
            self._discard(received.chunk)
            raise
        return received

    def _open_at(self, meta: UploadMeta, offset: int) -> LocalPendingBytes:
        """The data file at the upload's offset, with its writer byte locked."""
        crc_before = 0

        def at_offset(upload: OpenUpload) -> bool:
            nonlocal crc_before
            stored, crc_before = _progress_in(upload.log_fd)
            if stored != offset:
                raise OffsetMismatch(offset, stored)
            return True

        writer = (WRITER_OFFSET, 1)
        upload = self._hold_region(meta, WRITER_KEY, writer, at_offset)
        if upload is None:
            raise UploadLocked()  # another PATCH, or a completion or removal
        chunk = self._written_through(
            upload, meta, offset, writer, WRITER_KEY, limit=None, declared_size=True
        )
        return LocalPendingBytes(chunk, meta, crc_before)

    async def commit_at(self, received: LocalPendingBytes) -> StreamProgress:
        chunk = received.chunk
        try:
            if self.fsync:
                await self._run(os.fdatasync, chunk.fd)
            return self._commit_at(received)
        except OSError as e:
            raise storage_error(e) from e
        finally:
            self._discard(chunk)  # the writer lock, held till here

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
            meta = self._read_meta(meta.file_id) or meta
        if meta.total_size is not None and offset == meta.total_size:
            entries.append(recordlog.Entry(recordlog.CHUNK, 0, offset, crc))  # chunk 0 stored
        if entries:
            recordlog.append(chunk.log_fd, *entries)
            if self.fsync:
                os.fdatasync(chunk.log_fd)
        return StreamProgress(meta, offset, crc, time.time())

    async def discard_at(self, received: LocalPendingBytes) -> None:
        self._discard(received.chunk)

    async def declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        try:
            return await self._run(self._declare_length, meta, length)
        except FolderGone:
            raise UploadGone() from None
        except OSError as e:
            raise storage_error(e) from e

    def _declare_length(self, meta: UploadMeta, length: int) -> UploadMeta:
        with self._lock(meta.file_id):
            on_disk = self._read_meta(meta.file_id)
            if on_disk is None or on_disk.token != meta.token:
                raise UploadGone()
            if on_disk.total_size is None:
                on_disk = replace(on_disk, total_size=length)
                self._write_json(self._folder(meta.file_id) / META_NAME, asdict(on_disk))
            return on_disk

    async def concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        try:
            return await self._run(self._concatenate, meta, sources)
        except OSError as e:
            raise storage_error(e) from e

    def _concatenate(self, meta: UploadMeta, sources: list[CompletedUpload]) -> StreamProgress:
        """Copy the sources into the data file with copy_file_range: a reflink, no copy, on
        filesystems that share blocks (XFS, Btrfs); an in-kernel copy elsewhere."""
        received = self._open_at(meta, 0)
        chunk = received.chunk
        try:
            for source in sources:
                src = os.open(self.uploads_dir / source.file_id / source.filename, os.O_RDONLY)
                try:
                    copy_range(src, 0, chunk.fd, chunk.written, source.size)
                finally:
                    os.close(src)
                chunk.crc = checksums.combine_two(
                    chunk.crc, checksums.from_s3(source.crc64nvme), source.size
                )
                chunk.written += source.size
            if self.fsync:
                os.fdatasync(chunk.fd)
            return self._commit_at(received)
        finally:
            self._discard(chunk)

    # -- completed files --

    async def download(self, file_id: str) -> tuple[Path, CompletedUpload] | None:
        completed = self._read_completion(file_id)
        if completed is None:
            return None
        path = self.uploads_dir / file_id / completed.filename
        return (path, completed) if path.is_file() else None

    # -- removing --

    async def delete(self, file_id: str) -> bool:
        return await self._run(self._delete, file_id)

    def _delete(self, file_id: str) -> bool:
        # Like a completion, it waits for the chunks being received to be committed.
        with self._whole_data_file(file_id, wait=True):
            try:
                with self._lock(file_id):
                    existed = self._delete_locked(file_id)
            except FolderGone:  # no upload in progress: a completed file, or nothing
                existed = self._delete_locked(file_id)
        self._known.pop(file_id, None)
        self._run_later(self.empty_trash)
        return existed

    def _delete_locked(self, file_id: str) -> bool:
        completion = self._completion_path(file_id)
        existed = completion.exists() or (self._folder(file_id) / META_NAME).exists()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(completion)
        shutil.rmtree(self.uploads_dir / file_id, ignore_errors=True)
        self._remove_folder(file_id)
        return existed

    def _discard_folder(self, file_id: str) -> None:
        """Remove the upload's folder now, not later through the trash (it holds no data)."""
        removed = self._remove_folder(file_id)
        if removed is not None:
            shutil.rmtree(removed, ignore_errors=True)

    def _remove_folder(self, file_id: str) -> Path | None:
        """Take the upload's folder out of the tree at once; `empty_trash` unlinks it later.
        Returns where it went (None when it was not there).

        Unlinking a gigabyte takes 0.1 s, and seconds while the kernel writes it back, so a
        rename keeps that off the answer.
        """
        self._open_uploads.forget(file_id)
        trash = self.trash_dir / self._temp_name(file_id, ".removing")
        try:
            os.rename(self._folder(file_id), trash)
        except FileNotFoundError:
            return None
        return trash

    def _run_later(self, fn: Callable[[], None]) -> None:
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
                if _writer_pid(name) == os.getpid() or not _writer_alive(name):
                    shutil.rmtree(self.trash_dir / name, ignore_errors=True)

    # -- housekeeping --

    def _uploads_in_progress(self) -> list[str]:
        with os.scandir(self.chunks_dir) as entries:
            # file ids never start with a dot: those are .incoming and .trash
            return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]

    async def uploads_in_progress(self) -> list[str]:
        return await self._run(self._uploads_in_progress)

    async def sweep(self, *, ttl_seconds: float) -> SweepReport:
        return await self._run(self._sweep, ttl_seconds)

    def _sweep(self, ttl_seconds: float) -> SweepReport:
        """Expire idle uploads, finish completions a crash cut short, remove stray files."""
        now = time.time()
        report = SweepReport()
        report.removed_temp_files += self._remove_stray_temps(self.incoming_dir, now, ttl_seconds)
        report.removed_temp_files += self._remove_stray_temps(self.uploads_dir, now, ttl_seconds)
        for file_id in self._uploads_in_progress():
            # Expiry first: removing a stray file touches the folder, which would count as
            # activity and put the expiry off by a whole TTL.
            with contextlib.suppress(FileNotFoundError):
                self._sweep_upload(file_id, now, ttl_seconds, report)
            report.removed_temp_files += self._remove_stray_temps(
                self._folder(file_id), now, ttl_seconds
            )
        self.empty_trash()
        self._open_uploads.close_idle()
        live = set(self._uploads_in_progress())
        for file_id in [f for f in self._known if f not in live]:
            self._known.pop(file_id, None)
        return report

    def _sweep_upload(
        self, file_id: str, now: float, ttl_seconds: float, report: SweepReport
    ) -> None:
        lock = self._lock(file_id, blocking=False)
        try:
            if not lock.acquire():
                return  # busy: a commit or a completion is running
        except FolderGone:
            return  # ended since it was listed
        try:
            status = self._status(file_id)
            if isinstance(status, CompletedUpload):
                self._remove_folder(file_id)  # left over after its completion
            elif status is None:
                folder = self._folder(file_id)
                has_temps = any(n.endswith(".part") for n in os.listdir(folder))
                if not has_temps and now - os.stat(folder).st_mtime > ORPHAN_GRACE_SECONDS:
                    self._remove_folder(file_id)
            else:
                expired = now - status.last_activity > ttl_seconds
                if expired or len(status.stored) == status.meta.total_chunks:
                    self._expire_or_finish(status.meta, expired, report)
        finally:
            lock.release()

    def _expire_or_finish(self, meta: UploadMeta, expired: bool, report: SweepReport) -> None:
        """Expire an idle upload, or complete one a crash cut short (every chunk recorded, no
        completion record); only while no chunk is being received into it. Without waiting:
        the upload's flock is held, and writers take their range lock before it."""
        with self._whole_data_file(meta.file_id, wait=False) as data_fd:
            if data_fd is None and (self._folder(meta.file_id) / DATA_NAME).exists():
                return  # a chunk is in flight: neither idle nor ready
            if expired:
                self._remove_folder(meta.file_id)
                self._known.pop(meta.file_id, None)
                report.expired.append(meta.file_id)
                report.expired_uploads.append(meta)
                return
            with contextlib.suppress(UploadConflict, StorageFailure):
                completed = self._complete(meta, data_fd)
                if completed is not None:
                    report.completed.append(completed)

    def _remove_stray_temps(self, folder: Path, now: float, ttl_seconds: float) -> int:
        """Remove temp files whose writer died, or that nobody touched for the TTL."""
        removed = 0
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(TEMP_SUFFIXES) or not entry.is_file():
                continue
            try:
                idle = now - entry.stat().st_mtime
                if not _writer_alive(entry.name) or idle > ttl_seconds:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

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

    async def health(self) -> dict[str, bool]:
        return {"data_folder": await self._run(self._is_writable)}

    def _is_writable(self) -> bool:
        try:
            probe = self.incoming_dir / self._temp_name("healthz", ".tmp")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True

    def _write_json_at(self, folder_fd: int, name: str, data: object) -> None:
        """Write `data` to `name` in the folder `folder_fd` atomically: a temp file, a rename."""
        temp = self._temp_name(f".{name}", ".tmp")
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

    def _write_json(self, path: Path, data: object) -> None:
        """Write `data` to `path` atomically: a temp file beside it, then a rename."""
        folder_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
        try:
            self._write_json_at(folder_fd, path.name, data)
        finally:
            os.close(folder_fd)


def _aside_file(index: int, token: str) -> str:
    """The file of chunk `index` kept aside, by the token in its log entry."""
    return f".{RECORD_PREFIX}{index:06d}.{token}{ASIDE_SUFFIX}"


def _aside_name(index: int, token: str) -> str | None:
    return _aside_file(index, token) if token else None


def _progress_in(log_fd: int) -> tuple[int, int]:
    """(offset, crc) of a tus upload from its log; (0, 0) before its first bytes."""
    entry = recordlog.last_of_kind(log_fd, recordlog.OFFSET)
    return (entry.length, entry.crc) if entry is not None else (0, 0)


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | OPEN_FLAGS, 0o644))


def _writer_pid(temp_name: str) -> int | None:
    """The pid in a temporary name (`stem.<pid>.<rand>.suffix`)."""
    parts = temp_name.split(".")
    try:
        return int(parts[-3])
    except (IndexError, ValueError):
        return None


def _writer_alive(temp_name: str) -> bool:
    """True when the process named in a temporary name runs."""
    pid = _writer_pid(temp_name)
    return pid is not None and pid_alive(pid)


def storage_error(error: OSError) -> DiskFull | StorageFailure:
    """The HTTP error for an OSError met while storing."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull()
    return StorageFailure(error.strerror or str(error))
