"""The local disk's locks across processes: flock on an upload's lock file, and byte-range
locks over a region of a data file.

`FileLock` is an exclusive `flock` on a lock file inside the upload's chunk folder. The kernel
drops it when its holder dies, so a crash never leaves an upload locked. Because the folder may
be removed by the holder (after a merge, an abort or an expiry), a waiter that gets the lock
checks that its file is still the one at the path, and starts over if not. Only the lock that
begins an upload creates its folder: any other raises `FolderGone` when the folder is not
there, so a request that lost a race with a completion never brings the folder back.

`lock_range` takes an open-file-description (OFD) write lock on a byte range of a file: it holds
across processes and between two descriptors of one process alike, and the kernel drops it
when the descriptor is closed or its process dies, so a killed writer never leaves it behind.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from types import TracebackType


class FolderGone(Exception):
    """The folder of a lock file is not there (and the lock may not create it)."""


class FileLock:
    """A blocking, exclusive, cross-process lock on `path`; with `create`, its parent folder
    is made when missing, otherwise `acquire` raises FolderGone."""

    def __init__(self, path: Path, *, blocking: bool = True, create: bool = False) -> None:
        self.path = path
        self.blocking = blocking
        self.create = create
        self._fd: int | None = None

    def acquire(self) -> bool:
        flags = fcntl.LOCK_EX if self.blocking else fcntl.LOCK_EX | fcntl.LOCK_NB
        while True:
            if self.create:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:
                if not self.create:
                    raise FolderGone(str(self.path.parent)) from None
                continue  # the folder was removed between mkdir and open
            try:
                fcntl.flock(fd, flags)
            except BlockingIOError:
                os.close(fd)
                return False
            if _same_file(fd, self.path):
                self._fd = fd
                return True
            os.close(fd)  # the holder before us removed the file; lock the new one

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)


# struct flock on Linux (x86_64 and aarch64): l_type, l_whence, l_start, l_len, l_pid, padding.
_FLOCK = struct.Struct("hhqqi4x")


def lock_range(fd: int, start: int, length: int, *, wait: bool, shared: bool = False) -> bool:
    """Write-lock (or with `shared`, read-lock) `length` bytes of `fd` from `start` (0: to the
    end and beyond).

    Returns False when another descriptor holds a conflicting lock there and `wait` is False;
    with `wait` it blocks until the range is free (call it from a thread).
    """
    command = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
    kind = fcntl.F_RDLCK if shared else fcntl.F_WRLCK
    try:
        fcntl.fcntl(fd, command, _FLOCK.pack(kind, os.SEEK_SET, start, length, 0))
    except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: held elsewhere
        return False
    return True


def unlock_range(fd: int, start: int, length: int) -> None:
    """Drop this descriptor's lock on `length` bytes of `fd` from `start` (0: to the end)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(fcntl.F_UNLCK, os.SEEK_SET, start, length, 0))
