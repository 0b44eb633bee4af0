"""Beginning, looking up, abandoning, downloading and deleting uploads on S3."""

from __future__ import annotations

import functools

from ...errors import (
    UploadGone,
)
from ...model import (
    CompletedUpload,
    StoredObject,
    UploadMeta,
    UploadProgress,
)
from .assembly import S3Assembler
from .layout import S3Layout
from .pieces import MIN_PART_BYTES


class S3Catalog:
    """Beginning, looking up, abandoning, downloading and deleting uploads (rows of
    `chunkserver_uploads`)."""

    def __init__(self, layout: S3Layout, assembler: S3Assembler) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects
        self.assembler = assembler

    def location_of(self, file_id: str, filename: str) -> str:
        return self.layout.object_key(file_id, filename)

    async def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        row = await self.state.uploads.get(file_id)
        if row is None:
            return None
        return row.completed or row.meta

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        row = await self.state.uploads.get(file_id)
        if row is None:
            return None
        if row.completed is not None:
            return row.completed
        if row.status == "completing":
            taken = await self.assembler.take_over(row.meta)
            if taken is not None:
                return taken
        stored = await self.state.chunks.stored_indexes(row.meta)
        return UploadProgress(row.meta, frozenset(stored), row.last_activity)

    async def download(self, file_id: str) -> tuple[StoredObject, CompletedUpload] | None:
        row = await self.state.uploads.get(file_id)
        if row is None or row.completed is None:
            return None
        key = row.object_key
        opener = functools.partial(self.objects.get, key)
        return StoredObject(key, row.completed.size, opener), row.completed

    async def uploads_in_progress(self) -> list[str]:
        return await self.state.uploads.in_progress()

    async def begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        while True:
            row = await self.state.uploads.get(proposed.file_id)
            if row is not None:
                if row.completed is not None:
                    return row.completed, False
                if row.status == "completing":
                    try:
                        completed = await self.assembler.completed_elsewhere(row.meta)
                    except UploadGone:
                        continue  # removed meanwhile: begin it again
                    if completed is None:
                        continue  # that completion failed: the upload takes chunks again
                    return completed, False
                cs = proposed.chunk_size
                if row.meta.chunk_size is None and cs is not None:
                    self.layout.check_fits(row.meta.total_chunks, cs)
                    declared = await self.state.uploads.declare_chunk_size(
                        row.meta, cs, cs >= MIN_PART_BYTES
                    )
                    if declared is not None:
                        row = declared
                if row.meta.metadata is None and proposed.metadata is not None:
                    adopted = await self.state.uploads.adopt_metadata(row.meta, proposed.metadata)
                    if adopted is not None:
                        row = adopted
                return row.meta, False
            direct: bool | None = None
            if proposed.total_chunks == 1:
                direct = True  # the only chunk is the last part, whatever its size
            elif proposed.chunk_size is not None:
                self.layout.check_fits(proposed.total_chunks, proposed.chunk_size)
                direct = proposed.chunk_size >= MIN_PART_BYTES
            key = self.layout.object_key(proposed.file_id, proposed.filename)
            upload_id = await self.objects.create_multipart(key)
            if await self.state.uploads.insert(proposed, key, upload_id, direct):
                return proposed, True
            await self.objects.abort(key, upload_id)  # another request created it first

    async def abandon(self, meta: UploadMeta) -> None:
        row = await self.state.uploads.remove_if_empty(meta)
        if row is not None:
            await self.layout.clean(row)

    async def delete(self, file_id: str) -> bool:
        row = await self.state.uploads.remove(file_id)
        if row is None:
            return False
        await self.layout.clean(row)
        return True
