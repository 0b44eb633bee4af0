"""The local disk's names and numbers: file names, the locked offsets, the handles of
received bytes, and the record log's fold as one process knows it."""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ... import checksums
from ...errors import (
    DiskFull,
    StorageFailure,
)
from ...model import (
    ChunkRecord,
    UploadMeta,
)
from ...processes import pid_alive
from . import recordlog
from .openuploads import OpenUpload

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
class KnownLog:
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
                aside_file(entry.chunk_index, entry.aside),
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


def aside_file(index: int, token: str) -> str:
    """The file of chunk `index` kept aside, by the token in its log entry."""
    return f".{RECORD_PREFIX}{index:06d}.{token}{ASIDE_SUFFIX}"


def aside_name(index: int, token: str) -> str | None:
    return aside_file(index, token) if token else None


def progress_in(log_fd: int) -> tuple[int, int]:
    """(offset, crc) of a tus upload from its log; (0, 0) before its first bytes."""
    entry = recordlog.last_of_kind(log_fd, recordlog.OFFSET)
    return (entry.length, entry.crc) if entry is not None else (0, 0)


def touch_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | OPEN_FLAGS, 0o644))


def writer_pid(temp_name: str) -> int | None:
    """The pid in a temporary name (`stem.<pid>.<rand>.suffix`)."""
    parts = temp_name.split(".")
    try:
        return int(parts[-3])
    except (IndexError, ValueError):
        return None


def writer_alive(temp_name: str) -> bool:
    """True when the process named in a temporary name runs."""
    pid = writer_pid(temp_name)
    return pid is not None and pid_alive(pid)


def storage_error(error: OSError) -> DiskFull | StorageFailure:
    """The HTTP error for an OSError met while storing."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFull()
    return StorageFailure(error.strerror or str(error))
