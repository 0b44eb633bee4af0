"""Moving and hashing file bytes without bringing them into Python: mmap and the kernel."""

from __future__ import annotations

import errno
import hashlib
import mmap
import os
from pathlib import Path

HASH_WINDOW_BYTES = 4 * 1024 * 1024


def hash_file(fd: int, size: int, digest: hashlib._Hash) -> None:
    """Feed the first `size` bytes of `fd` to `digest`.

    Read-only maps of the page cache, a window at a time: no copy into Python, and at most
    one window counted in the process's resident memory whatever the file size.
    """
    for offset in range(0, size, HASH_WINDOW_BYTES):
        length = min(HASH_WINDOW_BYTES, size - offset)
        with mmap.mmap(fd, length, prot=mmap.PROT_READ, offset=offset) as view:
            digest.update(view)


def append_file(src: int, size: int, out: int, digest: hashlib._Hash) -> None:
    """Hash the first `size` bytes of `src` and append them to `out`."""
    if size == 0:
        return
    hash_file(src, size, digest)
    copy_range(src, out, size)


def copy_range(src: int, out: int, size: int) -> None:
    """Copy `size` bytes from the start of `src` to `out`'s position inside the kernel."""
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(src, out, size - copied, copied)
            if n == 0:
                raise OSError(errno.EIO, "copy_file_range stopped early")
            copied += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while copied < size:  # other filesystems: sendfile still avoids user space
        n = os.sendfile(out, src, copied, size - copied)
        if n == 0:
            raise OSError(errno.EIO, "sendfile stopped early")
        copied += n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
