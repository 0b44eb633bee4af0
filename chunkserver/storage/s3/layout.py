"""The shared state of the S3 backend's roles: the object store, the upload state in
PostgreSQL, names of objects, background work, health."""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

from ...errors import (
    PayloadTooLarge,
    StorageFailure,
)
from ...model import (
    UploadMeta,
)
from .objects import ObjectStore, Settings
from .pieces import (
    COMPLETION_LEASE_SECONDS,
    GATHER_CONCURRENCY,
    MIN_PART_BYTES,
    STAGED_COPIES_BYTES,
    STAGED_COPIES_FILES,
    MiB,
    StagedCopies,
    log,
)
from .state import UploadRow, UploadState

# The suffix of a staging key whose bytes are a row of chunkserver_staged, not an object.
IN_DATABASE = ".pg"


class S3Layout:
    """The object store, the state, and what every role shares."""

    def __init__(
        self,
        settings: Settings,
        database_url: str,
        *,
        prefix: str = "",
        scratch: Path,
        sha256: bool = False,
        max_parts: int = 10_000,
        max_file_bytes: int = 100 * 1024 * MiB,
    ) -> None:
        self.objects = ObjectStore(settings)
        self.state = UploadState(database_url)
        self.prefix = prefix
        self.scratch = scratch
        self.sha256 = sha256
        self.max_parts = max_parts
        self.max_file_bytes = max_file_bytes
        self.lease_seconds = COMPLETION_LEASE_SECONDS
        self._background: set[asyncio.Task[None]] = set()
        self.gathering = asyncio.Semaphore(GATHER_CONCURRENCY)  # parts built at once
        self.copies = StagedCopies(scratch, STAGED_COPIES_BYTES, STAGED_COPIES_FILES)

    def object_key(self, file_id: str, filename: str) -> str:
        return f"{self.prefix}uploads/{file_id}/{filename}"

    def staging_prefix(self, meta: UploadMeta) -> str:
        return f"{self.prefix}staging/{meta.file_id}/{meta.token}/"

    def staging_key(self, meta: UploadMeta, index: int, *, in_database: bool = False) -> str:
        """Where a staged chunk goes: an object, or a row of PostgreSQL (`in_database`)."""
        key = f"{self.staging_prefix(meta)}{index:06d}.{secrets.token_hex(6)}"
        return key + IN_DATABASE if in_database else key

    async def read_staged(self, key: str) -> AsyncIterator[bytes]:
        """A staged chunk's bytes: this host's copy, the database's row or the object."""
        copy = self.copies.take(key)
        if copy is not None:
            with copy:  # closed before the yield: a consumer may stop there
                copy.seek(0)
                kept = copy.read()  # less than 5 MiB, from the page cache
            yield kept
        elif key.endswith(IN_DATABASE):
            data = await self.state.staged.read(key)
            if data is None:
                raise StorageFailure(f"the staged chunk {key} is missing")
            yield data
        else:
            async for piece in self.objects.read_pieces(key):
                yield piece

    async def delete_staged(self, keys: list[str]) -> None:
        for key in keys:
            copy = self.copies.take(key)
            if copy is not None:
                copy.close()
        await self.state.staged.delete([k for k in keys if k.endswith(IN_DATABASE)])
        await self.objects.delete([k for k in keys if not k.endswith(IN_DATABASE)])

    async def clean(self, row: UploadRow) -> None:
        """Remove what the object store holds of a removed upload."""
        if row.status == "completed":
            await self.objects.delete([row.object_key])
            return
        await self.objects.abort(row.object_key, row.upload_id)
        await self.remove_staging(row.meta)

    async def remove_staging(self, meta: UploadMeta) -> None:
        self.copies.forget(self.staging_prefix(meta))
        await self.state.staged.delete_upload(meta)
        listed = await self.objects.list_objects(self.staging_prefix(meta))
        await self.objects.delete([o.key for o in listed])

    async def finish_background(self) -> None:
        """Wait for the clean-up started by `later` (at close)."""
        for task in list(self._background):
            with contextlib.suppress(Exception):
                await task

    def later(self, work: object) -> None:
        """Clean-up that the answer need not wait for; failures only logged (the sweep
        removes what is left)."""

        async def run() -> None:
            try:
                await work  # type: ignore[misc]
            except Exception as e:
                log.warning("Background clean-up failed: %s", e)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def check_fits(self, total_chunks: int, chunk_size: int) -> None:
        """Refuse (413) an upload whose parts would exceed the store's part limit."""
        if chunk_size >= MIN_PART_BYTES:
            parts = total_chunks
        else:
            parts = math.ceil(total_chunks / math.ceil(MIN_PART_BYTES / max(chunk_size, 1)))
        if parts > self.max_parts:
            raise PayloadTooLarge(
                f"Upload needs {parts} parts of the object store, more than its limit of "
                f"{self.max_parts} (s3_max_parts): use larger chunks"
            )
