"""The disk: the only code that builds paths, and the source of truth for every upload.

Layout under the data folder (see the README):

    chunks/<file_id>/chunk_000000          a stored chunk (the seed's layout)
    chunks/<file_id>/.meta.json            filename, total_chunks, total_size, identity
    chunks/<file_id>/.lock                 the cross-process lock (flock)
    chunks/<file_id>/.chunk_000003.<pid>.<rand>.part    a chunk being received
    chunks/<file_id>/.assembly.<pid>.<rand>.assembling  the merged file built ahead (assembly.py)
    chunks/.incoming/<pid>.<rand>.part     a chunk received before its form fields
    chunks/.trash/<file_id>.<pid>.<rand>.removing/  a finished upload's chunks, being removed
    uploads/<file_id>/<filename>           the merged file
    uploads/<file_id>.json                 the completion record: size and sha256
    uploads/<file_id>.<pid>.<rand>.merging a merge in progress

An upload is completed exactly when its record exists: the record is written after the merged
file is in place, so a partial merged file is never reported. Every method here blocks; the
service in `uploads.py` runs them in an executor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .assembly import Assembly
from .errors import (
    DiskFull,
    PayloadTooLarge,
    StorageFailure,
    UploadConflict,
)
from .fileio import fsync_dir
from .locks import FileLock, pid_alive
from .manifest import ChunkSet

CHUNK_PREFIX = "chunk_"
META_NAME = ".meta.json"
LOCK_NAME = ".lock"
INCOMING = ".incoming"
TRASH = ".trash"
TEMP_SUFFIXES = (".part", ".merging", ".tmp", ".assembling")
FREE_BYTES_MAX_AGE = 0.05  # seconds
FREE_BYTES_CACHED_ABOVE = 4 * 1024**3
# A folder with no metadata and no live temporary file is a leftover after this long.
ORPHAN_GRACE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class UploadMeta:
    """What the first chunk of an upload fixes for all the others."""

    file_id: str
    filename: str
    total_chunks: int
    total_size: int | None
    created_at: float
    token: str  # tells a re-created upload of the same id from the one a cache knew

    @classmethod
    def new(
        cls, file_id: str, filename: str, total_chunks: int, total_size: int | None
    ) -> UploadMeta:
        return cls(file_id, filename, total_chunks, total_size, time.time(), secrets.token_hex(8))

    def conflict_with(self, filename: str, total_chunks: int, total_size: int | None) -> str | None:
        """Say which field differs from this upload's, or None when they agree."""
        if total_chunks != self.total_chunks:
            return (
                f"total_chunks {total_chunks} differs from {self.total_chunks} "
                "given by earlier chunks of this file_id"
            )
        if filename != self.filename:
            return f"filename {filename!r} differs from {self.filename!r} given by earlier chunks"
        if None not in (total_size, self.total_size) and total_size != self.total_size:
            return f"total_size {total_size} differs from {self.total_size} given by earlier chunks"
        return None


@dataclass(frozen=True, slots=True)
class CompletedUpload:
    file_id: str
    filename: str
    size: int
    sha256: str
    total_chunks: int
    completed_at: float


@dataclass(frozen=True, slots=True)
class UploadProgress:
    meta: UploadMeta
    stored: frozenset[int]
    last_activity: float

    @property
    def missing(self) -> list[int]:
        return [i for i in range(self.meta.total_chunks) if i not in self.stored]


@dataclass(slots=True)
class TempChunk:
    """A chunk being received: a file under a hidden name, created by `create`.

    The receiving code creates it in the thread that writes its first bytes, which spares
    each chunk a round trip to a thread (two context switches) just to open a file.
    """

    path: Path
    fd: int = -1
    size: int = 0

    def create(self) -> None:
        """Create the file, and its folder if it is missing; blocks."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags, 0o644)
        except FileNotFoundError:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, flags, 0o644)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


@dataclass(frozen=True, slots=True)
class Committed:
    """The outcome of a commit: the upload's state, its record once it is complete."""

    meta: UploadMeta | None
    chunks: ChunkSet
    record: CompletedUpload | None = None
    merged_here: bool = False  # this commit completed the upload


@dataclass(slots=True)
class SweepReport:
    expired: list[str]
    merged: list[CompletedUpload]
    removed_temp_files: int = 0


class Store(Protocol):
    """The verbs the upload service needs from storage."""

    def temp_chunk(self, file_id: str | None, index: int | None) -> TempChunk: ...
    def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None: ...
    def status(self, file_id: str) -> CompletedUpload | UploadProgress | None: ...
    def commit_chunk(
        self,
        temp: TempChunk,
        proposed: UploadMeta,
        index: int,
        chunks: ChunkSet,
        *,
        max_file_bytes: int,
        assembly: Assembly | None = None,
    ) -> Committed: ...
    def start_assembly(self, meta: UploadMeta) -> Assembly | None: ...
    def advance_assembly(
        self, assembly: Assembly, meta: UploadMeta, budget: int, *, keep_free: int
    ) -> bool: ...
    def completed_file(self, file_id: str) -> tuple[Path, CompletedUpload] | None: ...
    def delete(self, file_id: str) -> bool: ...
    def sweep(self, *, ttl_seconds: float, max_file_bytes: int) -> SweepReport: ...
    def empty_trash(self) -> None: ...
    def uploads_in_progress(self) -> list[str]: ...
    def free_bytes(self) -> int: ...
    def is_writable(self) -> bool: ...


class FileStore:
    """Uploads on a local filesystem; safe for several processes sharing `root`."""

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = root
        self.fsync = fsync
        self.chunks_dir = root / "chunks"
        self.uploads_dir = root / "uploads"
        self.incoming_dir = self.chunks_dir / INCOMING
        self.trash_dir = self.chunks_dir / TRASH
        self._free_bytes = 0
        self._free_bytes_at = -FREE_BYTES_MAX_AGE
        self._emptying_trash = threading.Lock()
        for folder in (self.chunks_dir, self.uploads_dir, self.incoming_dir, self.trash_dir):
            folder.mkdir(parents=True, exist_ok=True)

    # -- paths (file_id and filename are validated by the handlers before they get here) --

    def _chunk_dir(self, file_id: str) -> Path:
        return self.chunks_dir / file_id

    def _chunk_path(self, file_id: str, index: int) -> Path:
        return self.chunks_dir / file_id / f"{CHUNK_PREFIX}{index:06d}"

    def _record_path(self, file_id: str) -> Path:
        return self.uploads_dir / f"{file_id}.json"

    def _lock(self, file_id: str, *, blocking: bool = True) -> FileLock:
        return FileLock(self._chunk_dir(file_id) / LOCK_NAME, blocking=blocking)

    @staticmethod
    def _temp_name(stem: str, suffix: str) -> str:
        return f"{stem}.{os.getpid()}.{secrets.token_hex(6)}{suffix}"

    # -- receiving --

    def temp_chunk(self, file_id: str | None, index: int | None) -> TempChunk:
        """Name a new hidden file beside the chunk's final place (or in .incoming); no I/O."""
        if file_id is None or index is None:
            folder, stem = self.incoming_dir, "chunk"
        else:
            folder, stem = self._chunk_dir(file_id), f".{CHUNK_PREFIX}{index:06d}"
        return TempChunk(path=folder / self._temp_name(stem, ".part"))

    # -- reading state --

    def _read_meta(self, file_id: str) -> UploadMeta | None:
        try:
            data = json.loads((self._chunk_dir(file_id) / META_NAME).read_bytes())
        except FileNotFoundError:
            return None
        return UploadMeta(**data)

    def _read_record(self, file_id: str) -> CompletedUpload | None:
        try:
            data = json.loads(self._record_path(file_id).read_bytes())
        except FileNotFoundError:
            return None
        return CompletedUpload(**data)

    def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        return self._read_record(file_id) or self._read_meta(file_id)

    def _stored_indexes(self, file_id: str, total_chunks: int) -> tuple[frozenset[int], float]:
        """The chunk indexes on disk and the time of the last activity in the folder."""
        folder = self._chunk_dir(file_id)
        stored: set[int] = set()
        last = os.stat(folder).st_mtime
        with os.scandir(folder) as entries:
            for entry in entries:
                name = entry.name
                if name.startswith(CHUNK_PREFIX) and name[len(CHUNK_PREFIX) :].isdigit():
                    index = int(name[len(CHUNK_PREFIX) :])
                    if index < total_chunks:
                        stored.add(index)
                elif name.endswith(".part"):
                    with contextlib.suppress(FileNotFoundError):
                        last = max(last, entry.stat().st_mtime)
        return frozenset(stored), last

    def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        record = self._read_record(file_id)
        if record is not None:
            return record
        meta = self._read_meta(file_id)
        if meta is None:
            return None
        try:
            stored, last = self._stored_indexes(file_id, meta.total_chunks)
        except FileNotFoundError:  # merged, aborted or expired while we looked
            return self._read_record(file_id)
        return UploadProgress(meta=meta, stored=stored, last_activity=last)

    # -- committing --

    def commit_chunk(
        self,
        temp: TempChunk,
        proposed: UploadMeta,
        index: int,
        chunks: ChunkSet,
        *,
        max_file_bytes: int,
        assembly: Assembly | None = None,
    ) -> Committed:
        """Move a received chunk into place; merge when it was the last one missing.

        `chunks` is the caller's cache of this upload's stored chunks; it is brought up to
        date here, under the cross-process lock, and may be reset if the upload on disk is
        not the one it describes. The merge continues `assembly` when it is still good.
        Consumes `temp` whatever happens.
        """
        file_id = proposed.file_id
        try:
            if self.fsync:
                os.fsync(temp.fd)
            temp.close()
            with self._lock(file_id):
                record = self._read_record(file_id)
                if record is not None:  # a retry after completion changes nothing
                    temp.discard()
                    self._remove_chunk_dir(file_id)
                    return Committed(meta=None, chunks=chunks, record=record)
                if not temp.path.exists():  # removed under the lock by a delete or expiry
                    raise UploadConflict(
                        "The upload was removed while this chunk was being received"
                    )
                meta = self._adopt_meta(proposed, chunks)
                previous = chunks.size_of(index)
                if chunks.total_bytes - previous + temp.size > max_file_bytes:
                    raise PayloadTooLarge(
                        f"Upload would exceed max_file_bytes ({max_file_bytes} bytes)"
                    )
                os.rename(temp.path, self._chunk_path(file_id, index))
                if self.fsync:
                    fsync_dir(self._chunk_dir(file_id))
                chunks.add(index, temp.size)
                if self._all_chunks_stored(meta, chunks):
                    record = self._merge(meta, max_file_bytes=max_file_bytes, assembly=assembly)
                    return Committed(meta=meta, chunks=chunks, record=record, merged_here=True)
                return Committed(meta=meta, chunks=chunks)
        except OSError as e:
            raise storage_error(e) from e
        finally:
            temp.discard()

    def _adopt_meta(self, proposed: UploadMeta, chunks: ChunkSet) -> UploadMeta:
        """Return the upload's metadata on disk, writing `proposed` if there is none yet."""
        on_disk = self._read_meta(proposed.file_id)
        if on_disk is None:
            self._write_json(self._chunk_dir(proposed.file_id) / META_NAME, asdict(proposed))
            on_disk = proposed
        else:
            conflict = on_disk.conflict_with(
                proposed.filename, proposed.total_chunks, proposed.total_size
            )
            if conflict is not None:
                raise UploadConflict(conflict)
        if chunks.token != on_disk.token:
            chunks.reset(on_disk.token)
        return on_disk

    def _all_chunks_stored(self, meta: UploadMeta, chunks: ChunkSet) -> bool:
        """Look on disk for the chunks the cache does not know yet, lowest index first.

        Stops at the first one missing, so in one process this costs one stat per commit;
        chunks committed by other processes are found and remembered as it goes.
        """
        index = chunks.first_missing()
        while index < meta.total_chunks:
            try:
                size = os.stat(self._chunk_path(meta.file_id, index)).st_size
            except FileNotFoundError:
                return False
            chunks.add(index, size)
            index = chunks.first_missing()
        return True

    # -- merging --

    def start_assembly(self, meta: UploadMeta) -> Assembly | None:
        """Create an empty assembly for `meta`'s upload; None when its folder is gone."""
        path = self._chunk_dir(meta.file_id) / self._temp_name(".assembly", ".assembling")
        try:
            assembly = Assembly.create(meta.token, path)
            assembly.close_file()
            return assembly
        except FileNotFoundError:
            return None
        except OSError as e:
            raise storage_error(e) from e

    def advance_assembly(
        self, assembly: Assembly, meta: UploadMeta, budget: int, *, keep_free: int
    ) -> bool:
        """Copy and hash the next stored chunks into `assembly`, about `budget` bytes.

        Stops before a copy that would leave less than `keep_free` bytes free on the disk.

        Returns True when there may be more to do at once. On a storage error the assembly
        is discarded (the merge will read the chunks itself) and the error is not raised:
        no request is waiting for this work.
        """
        with assembly.mutex:
            if assembly.finished:
                return False
            try:
                if not assembly.open():  # removed or changed under us: of no use now
                    assembly.close()
                    return False
                return assembly.append_available(
                    lambda index: self._chunk_path(meta.file_id, index),
                    meta.total_chunks,
                    budget,
                    lambda size: self.free_bytes() - size >= keep_free,
                )
            except OSError:
                assembly.remove()
                return False
            finally:
                assembly.close_file()

    def _merge(
        self, meta: UploadMeta, *, max_file_bytes: int, assembly: Assembly | None = None
    ) -> CompletedUpload:
        """Join the chunks in index order, record size and sha256, remove the chunks.

        Continues `assembly` (the prefix already copied and hashed) when it belongs to this
        upload and is intact; otherwise starts from the first chunk.
        """
        file_id = meta.file_id

        def chunk_path(index: int) -> Path:
            return self._chunk_path(file_id, index)

        merging = self._assembly_for_merge(meta, assembly, chunk_path)
        try:
            self._finish_merge(merging, meta, max_file_bytes, chunk_path)
        finally:
            merging.mutex.release()
        record = CompletedUpload(
            file_id=file_id,
            filename=meta.filename,
            size=merging.size,
            sha256=merging.digest.hexdigest(),
            total_chunks=meta.total_chunks,
            completed_at=time.time(),
        )
        self._write_json(self._record_path(file_id), asdict(record))
        self._remove_chunk_dir(file_id)
        return record

    def _assembly_for_merge(
        self, meta: UploadMeta, assembly: Assembly | None, chunk_path: Callable[[int], Path]
    ) -> Assembly:
        """`assembly` when it can be continued, else a new one; returned with its mutex held."""
        if assembly is not None:
            assembly.mutex.acquire()  # waits for a background step in progress
            try:
                reusable = assembly.token == meta.token and not assembly.finished
                if reusable and assembly.open():
                    if not assembly.chunks_unchanged(chunk_path):
                        assembly.restart()
                    return assembly
            except BaseException:
                assembly.mutex.release()
                raise
            assembly.mutex.release()
        fresh = Assembly.create(
            meta.token, self.uploads_dir / self._temp_name(meta.file_id, ".merging")
        )
        fresh.mutex.acquire()
        return fresh

    def _finish_merge(
        self,
        assembly: Assembly,
        meta: UploadMeta,
        max_file_bytes: int,
        chunk_path: Callable[[int], Path],
    ) -> None:
        """Append the chunks `assembly` lacks, check the size, move it into place."""
        try:
            while assembly.next_index < meta.total_chunks:
                if not assembly.append_chunk(chunk_path(assembly.next_index)):
                    raise StorageFailure(f"chunk {assembly.next_index} vanished during the merge")
            if assembly.size > max_file_bytes:
                raise PayloadTooLarge(f"Upload exceeds max_file_bytes ({max_file_bytes} bytes)")
            if meta.total_size is not None and assembly.size != meta.total_size:
                raise UploadConflict(
                    f"The merged size {assembly.size} does not match total_size {meta.total_size}"
                )
            if self.fsync:
                os.fsync(assembly.fd)
        except BaseException:
            assembly.remove()
            raise
        assembly.close()
        final_dir = self.uploads_dir / meta.file_id
        if final_dir.exists():
            shutil.rmtree(final_dir)  # a leftover from a merge cut short before its record
        final_dir.mkdir()
        os.rename(assembly.path, final_dir / meta.filename)
        if self.fsync:
            fsync_dir(final_dir)
            fsync_dir(self.uploads_dir)

    # -- completed files --

    def completed_file(self, file_id: str) -> tuple[Path, CompletedUpload] | None:
        record = self._read_record(file_id)
        if record is None:
            return None
        path = self.uploads_dir / file_id / record.filename
        return (path, record) if path.is_file() else None

    # -- removing --

    def delete(self, file_id: str) -> bool:
        """Abort an upload in progress or delete a completed one; False when unknown."""
        with self._lock(file_id):
            record_path = self._record_path(file_id)
            existed = record_path.exists() or (self._chunk_dir(file_id) / META_NAME).exists()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(record_path)
            shutil.rmtree(self.uploads_dir / file_id, ignore_errors=True)
            self._remove_chunk_dir(file_id)
        return existed

    def _remove_chunk_dir(self, file_id: str) -> None:
        """Take the upload's chunk folder out of the tree at once; `empty_trash` removes it.

        Unlinking a gigabyte of chunks takes 0.1 s, and seconds while the kernel is writing
        them back, so a rename keeps that off the answer; the caller empties the trash later.
        """
        trash = self.trash_dir / self._temp_name(file_id, ".removing")
        with contextlib.suppress(FileNotFoundError):
            os.rename(self._chunk_dir(file_id), trash)

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

    def uploads_in_progress(self) -> list[str]:
        with os.scandir(self.chunks_dir) as entries:
            # file ids never start with a dot: those are .incoming and .trash
            return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]

    def sweep(self, *, ttl_seconds: float, max_file_bytes: int) -> SweepReport:
        """Expire idle uploads, finish merges a crash cut short, remove stray temp files."""
        now = time.time()
        report = SweepReport(expired=[], merged=[])
        report.removed_temp_files += self._remove_stray_temps(self.incoming_dir, now, ttl_seconds)
        report.removed_temp_files += self._remove_stray_temps(self.uploads_dir, now, ttl_seconds)
        for file_id in self.uploads_in_progress():
            # Expiry first: removing a stray file touches the folder, which would count as
            # activity and put the expiry off by a whole TTL.
            with contextlib.suppress(FileNotFoundError):
                self._sweep_upload(file_id, now, ttl_seconds, max_file_bytes, report)
            report.removed_temp_files += self._remove_stray_temps(
                self._chunk_dir(file_id), now, ttl_seconds
            )
        self.empty_trash()
        return report

    def _sweep_upload(
        self,
        file_id: str,
        now: float,
        ttl_seconds: float,
        max_file_bytes: int,
        report: SweepReport,
    ) -> None:
        lock = self._lock(file_id, blocking=False)
        if not lock.acquire():
            return  # busy: a commit or a merge is running
        try:
            status = self.status(file_id)
            if isinstance(status, CompletedUpload):
                self._remove_chunk_dir(file_id)  # left over after its merge
            elif status is None:
                folder = self._chunk_dir(file_id)
                has_temps = any(n.endswith(".part") for n in os.listdir(folder))
                if not has_temps and now - os.stat(folder).st_mtime > ORPHAN_GRACE_SECONDS:
                    self._remove_chunk_dir(file_id)
            elif now - status.last_activity > ttl_seconds:
                self._remove_chunk_dir(file_id)
                report.expired.append(file_id)
            elif len(status.stored) == status.meta.total_chunks:
                # Every chunk is here but no record: a crash cut the merge short.
                with contextlib.suppress(PayloadTooLarge, UploadConflict):
                    report.merged.append(self._merge(status.meta, max_file_bytes=max_file_bytes))
        finally:
            lock.release()

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

        statvfs costs tens of microseconds on a busy ext4 and is asked several times per
        chunk, so a figure up to FREE_BYTES_MAX_AGE old is reused while the disk has plenty
        of room; near full, every call asks the kernel, so that space freed or taken is seen
        at once where it decides an answer.
        """
        now = time.monotonic()
        fresh_enough = now - self._free_bytes_at <= FREE_BYTES_MAX_AGE
        if not (fresh_enough and self._free_bytes >= FREE_BYTES_CACHED_ABOVE):
            stats = os.statvfs(self.root)
            self._free_bytes = stats.f_bavail * stats.f_frsize
            self._free_bytes_at = now
        return self._free_bytes

    def is_writable(self) -> bool:
        try:
            probe = self.incoming_dir / self._temp_name("healthz", ".tmp")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True

    def _write_json(self, path: Path, data: object) -> None:
        """Write `data` to `path` atomically: a temp file beside it, then a rename."""
        temp = path.with_name(self._temp_name(f".{path.name}", ".tmp"))
        with open(temp, "wb") as f:
            f.write(json.dumps(data).encode())
            if self.fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
        if self.fsync:
            fsync_dir(path.parent)


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


def iter_temp_files(root: Path) -> Iterator[Path]:
    """Every temporary file under `root` (used by tests and the sweeper's report)."""
    for path in root.rglob("*"):
        if path.name.endswith(TEMP_SUFFIXES):
            yield path
