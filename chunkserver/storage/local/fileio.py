"""Moving and hashing file bytes: vectored writes at an offset, kernel copies, mmap hashing."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

HASH_WINDOW_BYTES = 4 * 1024 * 1024
COPY_STEP_BYTES = 8 * 1024 * 1024


def pwritev_all(fd: int, pieces: list[memoryview], offset: int) -> None:
    """Write `pieces` in order at `offset`, going on after a short write."""
    while pieces:
        written = os.pwritev(fd, pieces, offset)
        offset += written
        # A short write is rare for regular files; drop what went out and go on.
        while pieces and written >= len(pieces[0]):
            written -= len(pieces[0])
            pieces = pieces[1:]
        if written:
            pieces[0] = pieces[0][written:]


def hash_file(fd: int, size: int, digest: hashlib._Hash, offset: int = 0) -> None:
    """Feed `size` bytes of `fd` from `offset` to `digest`.

    Read-only maps of the page cache, a window at a time: no copy into Python, and at most
    one window counted in the process's resident memory whatever the file size.
    """
    end = offset + size
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    while start < end:
        length = min(HASH_WINDOW_BYTES, end - start)
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=start) as view:
            skip = max(0, offset - start)
            digest.update(memoryview(view)[skip:])
        start += length


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, size: int) -> None:
    """Copy `size` bytes between two files at given offsets, inside the kernel if it can."""
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(
                src, dst, size - copied, src_offset + copied, dst_offset + copied
            )
            if n == 0:
                raise OSError(errno.EIO, "copy_file_range stopped early")
            copied += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while copied < size:  # other filesystems: through user space, a step at a time
        data = os.pread(src, min(COPY_STEP_BYTES, size - copied), src_offset + copied)
        if not data:
            raise OSError(errno.EIO, "source ended early")
        pwritev_all(dst, [memoryview(data)], dst_offset + copied)
        copied += len(data)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
