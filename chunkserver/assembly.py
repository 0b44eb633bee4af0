"""The merged file, built ahead of the last chunk.

While an upload is in progress its process copies the contiguous prefix of stored chunks
(0, 1, 2, ... up to the first one missing) into one hidden file in the upload's chunk folder
and feeds the same bytes to a running sha256. When the last chunk arrives the merge only has
the remaining chunks to append: its answer comes about one chunk's work after the chunk's
bytes, not after a pass over the whole file.

An assembly is a cache, like the manifest: the chunk files stay the truth. Before the merge
uses one it checks that every chunk it copied is still the same file (inode, size, mtime: a
chunk sent again replaces its file) and that its own file was not removed; if anything
changed, the merge starts over from the first chunk. A process that dies leaves a hidden file
named with its pid, which the sweep removes like any other temporary file.

Every method blocks; a `threading.Lock` keeps the background steps and the merge from
touching one assembly at the same time, whichever threads they run in.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .fileio import append_file

ChunkPath = Callable[[int], Path]


@dataclass(frozen=True, slots=True)
class ChunkIdentity:
    """What tells one stored chunk file from another sent in its place."""

    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, stat: os.stat_result) -> ChunkIdentity:
        return cls(stat.st_ino, stat.st_size, stat.st_mtime_ns)


@dataclass(slots=True)
class Assembly:
    """One upload's merged file in the making, owned by one process."""

    token: str  # the upload it belongs to (see UploadMeta.token)
    path: Path
    inode: int
    fd: int = -1  # open only during a step or the merge: idle uploads hold no descriptor
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    copied: list[ChunkIdentity] = field(default_factory=list)  # chunk i is copied[i]
    size: int = 0
    finished: bool = False  # consumed by a merge, or discarded
    mutex: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, token: str, path: Path) -> Assembly:
        """A new empty assembly at `path`, left open."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        fd = os.open(path, flags, 0o644)
        return cls(token=token, path=path, inode=os.fstat(fd).st_ino, fd=fd)

    def open(self) -> bool:
        """Open the file to go on appending; False when it was removed or changed.

        Call with `mutex` held.
        """
        if self.fd >= 0:
            return True
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        stat = os.fstat(fd)
        if stat.st_ino != self.inode or stat.st_size != self.size:
            os.close(fd)
            return False
        os.lseek(fd, self.size, os.SEEK_SET)
        self.fd = fd
        return True

    def close_file(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def next_index(self) -> int:
        return len(self.copied)

    def append_available(
        self,
        chunk_path: ChunkPath,
        total_chunks: int,
        budget: int,
        has_room: Callable[[int], bool],
    ) -> bool:
        """Append stored chunks in index order until one is missing or `budget` bytes went.

        A chunk is appended only if `has_room(its size)`: the copy must not take the disk
        space that chunks still to come need. Returns True when it stopped for the budget
        (there may be more to do). Call with `mutex` held.
        """
        appended = 0
        while self.next_index < total_chunks and appended < budget:
            src = _open_existing(chunk_path(self.next_index))
            if src is None:
                return False
            try:
                stat = os.fstat(src)
                if not has_room(stat.st_size):
                    return False
                self._append(src, stat)
            finally:
                os.close(src)
            appended += stat.st_size
        return self.next_index < total_chunks

    def append_chunk(self, path: Path) -> bool:
        """Hash and append one chunk file; False when it is not on disk."""
        src = _open_existing(path)
        if src is None:
            return False
        try:
            self._append(src, os.fstat(src))
        finally:
            os.close(src)
        return True

    def _append(self, src: int, stat: os.stat_result) -> None:
        append_file(src, stat.st_size, self.fd, self.digest)
        self.copied.append(ChunkIdentity.of(stat))
        self.size += stat.st_size

    def chunks_unchanged(self, chunk_path: ChunkPath) -> bool:
        """True when every copied chunk is still the file that was copied."""
        try:
            for index, identity in enumerate(self.copied):
                if ChunkIdentity.of(os.stat(chunk_path(index))) != identity:
                    return False
        except FileNotFoundError:
            return False
        return True

    def restart(self) -> None:
        """Forget what was copied: empty the file and the digest."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.digest = hashlib.sha256()
        self.copied.clear()
        self.size = 0

    def close(self) -> None:
        """Close the file for good: the assembly is used up."""
        self.close_file()
        self.finished = True

    def remove(self) -> None:
        """Close and remove the file; call with `mutex` held."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def discard(self) -> None:
        """Close and remove the file; the merge will not use this assembly."""
        with self.mutex:
            self.remove()


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
