"""The in-memory manifest: a cache of what the disk says about each upload in progress.

The disk is the truth. The manifest spares the disk a read on the hot path (the metadata an
upload's first chunk fixed, the chunks this process has seen stored) and is corrected under
the cross-process lock at every commit. An unknown file id means "look at the disk".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import UploadMeta


class ChunkSet:
    """The stored chunks of one upload that a process knows of, with their sizes.

    `first_missing` keeps a low-water mark, so finding the lowest unknown index is cheap
    however many chunks the upload has.
    """

    __slots__ = ("_low", "_sizes", "token", "total_bytes")

    def __init__(self, token: str = "") -> None:
        self.token = token
        self._sizes: dict[int, int] = {}
        self._low = 0
        self.total_bytes = 0

    def reset(self, token: str) -> None:
        self.__init__(token)  # type: ignore[misc]

    def add(self, index: int, size: int) -> None:
        self.total_bytes += size - self._sizes.get(index, 0)
        self._sizes[index] = size

    def size_of(self, index: int) -> int:
        return self._sizes.get(index, 0)

    def bytes_between(self, start: int, stop: int) -> int:
        """The bytes of the known chunks with indexes in [start, stop)."""
        return sum(self._sizes.get(index, 0) for index in range(start, stop))

    def first_missing(self) -> int:
        while self._low in self._sizes:
            self._low += 1
        return self._low

    def __contains__(self, index: object) -> bool:
        return index in self._sizes

    def __len__(self) -> int:
        return len(self._sizes)


@dataclass(slots=True)
class ManifestEntry:
    meta: UploadMeta
    chunks: ChunkSet
    touched_at: float = field(default_factory=time.monotonic)


class Manifest:
    """file_id -> what this process knows of that upload in progress."""

    def __init__(self) -> None:
        self._entries: dict[str, ManifestEntry] = {}

    def get(self, file_id: str) -> ManifestEntry | None:
        return self._entries.get(file_id)

    def remember(self, meta: UploadMeta, chunks: ChunkSet | None = None) -> ManifestEntry:
        """Cache `meta`, keeping the known chunks when it is the same upload as before."""
        entry = self._entries.get(meta.file_id)
        if entry is not None and entry.meta.token == meta.token:
            entry.meta = meta
            entry.touched_at = time.monotonic()
            if chunks is not None:
                entry.chunks = chunks
            return entry
        entry = ManifestEntry(meta=meta, chunks=chunks or ChunkSet(meta.token))
        self._entries[meta.file_id] = entry
        return entry

    def retain(self, file_ids: list[str]) -> None:
        """Keep only the entries of these uploads."""
        keep = set(file_ids)
        for file_id in [f for f in self._entries if f not in keep]:
            del self._entries[file_id]

    def forget(self, file_id: str) -> None:
        self._entries.pop(file_id, None)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, file_id: object) -> bool:
        return file_id in self._entries
