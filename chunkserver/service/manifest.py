"""The in-memory manifest: a cache of the metadata of each upload in progress.

The store is the truth. The manifest spares it a read on the hot path (what an upload's first
chunk fixed) and is dropped for an upload whenever the store says it ended; an unknown file id
means "ask the store".
"""

from __future__ import annotations

from ..model import UploadMeta


class Manifest:
    """file_id -> the metadata of that upload, as last seen."""

    def __init__(self) -> None:
        self._metas: dict[str, UploadMeta] = {}

    def get(self, file_id: str) -> UploadMeta | None:
        return self._metas.get(file_id)

    def remember(self, meta: UploadMeta) -> None:
        self._metas[meta.file_id] = meta

    def retain(self, file_ids: list[str]) -> None:
        """Keep only the entries of these uploads."""
        keep = set(file_ids)
        for file_id in [f for f in self._metas if f not in keep]:
            del self._metas[file_id]

    def forget(self, file_id: str) -> None:
        self._metas.pop(file_id, None)

    def __len__(self) -> int:
        return len(self._metas)

    def __contains__(self, file_id: object) -> bool:
        return file_id in self._metas
