"""Beginning, looking up, abandoning, downloading and deleting local uploads."""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

from ...model import (
    CompletedUpload,
    UploadMeta,
    UploadProgress,
)
from .assembly import LocalAssembler
from .disk import DATA_NAME, META_NAME, OPEN_FLAGS, storage_error, touch_file
from .fileio import fsync_dir
from .layout import LocalLayout
from .locks import FolderGone, lock_range
from .recordlog import LOG_NAME


class LocalCatalog:
    """Beginning, looking up, abandoning, downloading and deleting uploads."""

    def __init__(self, layout: LocalLayout, assembler: LocalAssembler) -> None:
        self.layout = layout
        self.assembler = assembler

    def location_of(self, file_id: str, filename: str) -> str:
        return f"uploads/{file_id}/{filename}"

    async def lookup(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        return self.layout.lookup(file_id)  # two small reads: cheaper than a thread hop

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        return await self.layout.run(self.layout.status, file_id)

    async def begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        try:
            return await self.layout.run(self._begin, proposed)
        except OSError as e:
            raise storage_error(e) from e

    def _begin(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        file_id = proposed.file_id
        with self.assembler.settled(file_id):
            completed = self.layout.read_completion(file_id)
            if completed is not None:  # before the lock, which would make the folder again
                return completed, False
            with self.layout.lock(file_id, create=True):
                return self._begin_locked(proposed)

    def _begin_locked(self, proposed: UploadMeta) -> tuple[CompletedUpload | UploadMeta, bool]:
        file_id = proposed.file_id
        completed = self.layout.read_completion(file_id)
        if completed is not None:
            if self.layout.read_meta(file_id) is None:  # completed since we looked: the lock
                self.layout.discard_folder(file_id)  # made the folder again, take it away
            return completed, False
        meta = self.layout.read_meta(file_id)
        if meta is not None and not (self.layout.folder(file_id) / DATA_NAME).exists():
            # A completion cut short after its rename: finish it now.
            completed = self.assembler.complete_held(meta, None)
            if completed is not None:
                return completed, False
        if meta is not None:
            adopted = meta
            if meta.chunk_size is None and proposed.chunk_size_declared:
                adopted = replace(adopted, chunk_size=proposed.chunk_size, chunk_size_declared=True)
            if meta.metadata is None and proposed.metadata is not None:
                adopted = replace(adopted, metadata=proposed.metadata)
            if adopted != meta:
                meta = adopted
                self.layout.write_json(self.layout.folder(file_id) / META_NAME, meta.stored())
            touch_file(self.layout.folder(file_id) / LOG_NAME)  # begun by a version without the log
            return meta, False
        self._create_data_file(proposed)
        touch_file(self.layout.folder(file_id) / LOG_NAME)
        self.layout.write_json(self.layout.folder(file_id) / META_NAME, proposed.stored())
        if self.layout.fsync:
            fsync_dir(self.layout.chunks_dir)
        return proposed, True

    def _create_data_file(self, meta: UploadMeta) -> None:
        """The data file, with the whole upload's room reserved when its size is known."""
        path = self.layout.folder(meta.file_id) / DATA_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | OPEN_FLAGS, 0o644)
        try:
            if meta.total_size:
                # A full disk answers 507 now, before the client sends a byte of the file.
                os.posix_fallocate(fd, 0, meta.total_size)
        except OSError:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    async def abandon(self, meta: UploadMeta) -> None:
        await self.layout.run(self._abandon, meta)

    def _abandon(self, meta: UploadMeta) -> None:
        """Remove the upload if it holds no record, no chunk kept aside and no writer; at once,
        trash included, since the refused request that began it is answered after this."""
        with contextlib.suppress(FolderGone), self.layout.lock(meta.file_id):
            self._abandon_locked(meta)

    def _abandon_locked(self, meta: UploadMeta) -> None:
        folder = self.layout.folder(meta.file_id)
        on_disk = self.layout.read_meta(meta.file_id)
        if on_disk is None or on_disk.token != meta.token:
            return
        try:
            fd = os.open(folder / DATA_NAME, os.O_RDWR | OPEN_FLAGS)
        except FileNotFoundError:
            return
        try:
            if not lock_range(fd, 0, 0, wait=False):
                return  # a chunk is being written in place
            if any(n.endswith(".part") for n in os.listdir(folder)):
                return  # a chunk is being received aside
            with contextlib.suppress(FileNotFoundError):
                if os.stat(folder / LOG_NAME).st_size:
                    return  # a chunk is stored
            self.layout.discard_folder(meta.file_id)  # unlinked, not left in the trash
        finally:
            os.close(fd)

    async def download(self, file_id: str) -> tuple[Path, CompletedUpload] | None:
        completed = self.layout.read_completion(file_id)
        if completed is None:
            return None
        path = self.layout.uploads_dir / file_id / completed.filename
        return (path, completed) if path.is_file() else None

    async def delete(self, file_id: str) -> bool:
        return await self.layout.run(self._delete, file_id)

    def _delete(self, file_id: str) -> bool:
        # Like a completion, it waits for the chunks being received to be committed.
        with self.assembler.whole_data_file(file_id, wait=True):
            try:
                with self.layout.lock(file_id):
                    existed = self._delete_locked(file_id)
            except FolderGone:  # no upload in progress: a completed file, or nothing
                existed = self._delete_locked(file_id)
        self.layout.known_logs.pop(file_id, None)
        self.layout.run_later(self.layout.empty_trash)
        return existed

    def _delete_locked(self, file_id: str) -> bool:
        completion = self.layout.completion_path(file_id)
        existed = completion.exists() or (self.layout.folder(file_id) / META_NAME).exists()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(completion)
        shutil.rmtree(self.layout.uploads_dir / file_id, ignore_errors=True)
        self.layout.remove_folder(file_id)
        return existed

    async def uploads_in_progress(self) -> list[str]:
        return await self.layout.run(self.layout.uploads_in_progress)
