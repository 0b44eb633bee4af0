"""Descriptors kept open across an upload's chunks: its folder, data file and record log.

Opening three files per chunk and closing them again cost seven system calls and a path walk
each; an upload's chunks reuse one `OpenUpload` instead. It is a cache and never the truth:
every chunk still checks, after taking its region lock, that the data file at the upload's
path is the one held open (another process may have completed or removed the upload), and
any step that ends an upload retires its entry.

Several requests of one process share the data file's open file description, so its
byte-range locks do not keep them apart: `writing` does, by chunk index (the regions of two
indexes never overlap). A chunk that finds its index taken here goes aside, as it does when
another process holds the region.

The loop and the store's threads both use the cache; a descriptor is closed only once no
request holds its entry (`users`), so none is closed, or reused by the kernel, under a
request still using it.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .recordlog import LOG_NAME

OPEN_FLAGS = os.O_CLOEXEC
MAX_OPEN_UPLOADS = 64  # three descriptors each
IDLE_SECONDS = 60.0


@dataclass(slots=True)
class OpenUpload:
    token: str
    folder_fd: int
    data_fd: int
    log_fd: int
    identity: tuple[int, int]  # (st_dev, st_ino) of the data file
    writing: set[int] = field(default_factory=set)  # chunks written in place, in this process
    users: int = 0
    retired: bool = False
    last_used: float = 0.0

    def close(self) -> None:
        for fd in (self.folder_fd, self.data_fd, self.log_fd):
            os.close(fd)


class OpenUploads:
    def __init__(self, data_name: str, *, capacity: int = MAX_OPEN_UPLOADS) -> None:
        self.data_name = data_name
        self.capacity = capacity
        self._entries: collections.OrderedDict[str, OpenUpload] = collections.OrderedDict()
        self._mutex = threading.Lock()

    def acquire(self, folder: Path, file_id: str, token: str) -> OpenUpload:
        """The upload's open files, counted as used until `release`. Raises
        FileNotFoundError when its folder, data file or log is not there."""
        with self._mutex:
            entry = self._entries.get(file_id)
            if entry is not None and entry.token == token:
                entry.users += 1
                self._entries.move_to_end(file_id)
                return entry
        entry = _open(folder, self.data_name, token)
        entry.users = 1
        with self._mutex:
            old = self._entries.pop(file_id, None)
            if old is not None:
                self._retire(old)
            self._entries[file_id] = entry
            self._evict(self.capacity)
        return entry

    def release(self, entry: OpenUpload) -> None:
        with self._mutex:
            entry.users -= 1
            entry.last_used = time.monotonic()
            if entry.retired and entry.users == 0:
                entry.close()

    def forget(self, file_id: str) -> None:
        """The upload ended or its files are not the ones held: close them once unused."""
        with self._mutex:
            entry = self._entries.pop(file_id, None)
            if entry is not None:
                self._retire(entry)

    def close_idle(self, seconds: float = IDLE_SECONDS) -> None:
        now = time.monotonic()
        with self._mutex:
            for file_id, entry in list(self._entries.items()):
                if entry.users == 0 and now - entry.last_used > seconds:
                    del self._entries[file_id]
                    self._retire(entry)

    def close_all(self) -> None:
        with self._mutex:
            for entry in self._entries.values():
                self._retire(entry)
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self, keep: int) -> None:
        """Retire the least recently used entries that nobody holds, down to `keep`."""
        for file_id in list(self._entries):
            if len(self._entries) <= keep:
                return
            if self._entries[file_id].users == 0:
                self._retire(self._entries.pop(file_id))

    @staticmethod
    def _retire(entry: OpenUpload) -> None:
        entry.retired = True
        if entry.users == 0:
            entry.close()


def _open(folder: Path, data_name: str, token: str) -> OpenUpload:
    folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | OPEN_FLAGS)
    data_fd = log_fd = -1
    try:
        data_fd = os.open(data_name, os.O_RDWR | OPEN_FLAGS, dir_fd=folder_fd)
        # Not created here: a folder being removed must not get a file back.
        log_fd = os.open(LOG_NAME, os.O_RDWR | os.O_APPEND | OPEN_FLAGS, dir_fd=folder_fd)
        held = os.fstat(data_fd)
    except BaseException:
        for fd in (folder_fd, data_fd, log_fd):
            if fd >= 0:
                os.close(fd)
        raise
    return OpenUpload(token, folder_fd, data_fd, log_fd, (held.st_dev, held.st_ino))
