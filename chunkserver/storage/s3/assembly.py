"""Completion on S3: a lease, parts gathered from staged chunks, the multipart upload
completed, exactly once across hosts; a dead host's completion taken over."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator

from ... import checksums
from ...errors import (
    CompletionPending,
    StorageFailure,
    StoreUnavailable,
    UploadConflict,
    UploadGone,
)
from ...model import (
    CompletedUpload,
    UploadMeta,
)
from ..faults import fault_point
from .layout import IN_DATABASE, S3Layout
from .objects import NoSuchUpload
from .pieces import (
    COMPLETION_RENEW_SECONDS,
    COMPLETION_WAIT_SECONDS,
    WAIT_STEP_SECONDS,
    gather_runs,
    log,
    part_sources,
)
from .state import ChunkRow, UploadRow


class S3Assembler:
    """Completion: the parts gathered, the multipart upload completed, exactly once across
    hosts (a lease in PostgreSQL)."""

    def __init__(self, layout: S3Layout) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects

    async def complete(self, meta: UploadMeta) -> tuple[CompletedUpload, bool] | None:
        claimed = await self.state.claims.claim_completion(meta, self.layout.lease_seconds)
        if claimed is None:
            row = await self.state.uploads.get(meta.file_id)
            if row is None or row.meta.token != meta.token:
                return None
            if row.completed is not None:
                return row.completed, False
            if row.status == "completing":
                completed = await self.completed_elsewhere(row.meta)
                return None if completed is None else (completed, False)
            return None  # chunks still missing
        return await self._complete_claimed(claimed), True

    async def _complete_claimed(self, claimed: UploadRow) -> CompletedUpload:
        renewal = asyncio.get_running_loop().create_task(self._keep_claim(claimed.meta))
        try:
            return await self._complete(claimed)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.state.claims.release_claim(claimed.meta)
            raise
        finally:
            renewal.cancel()

    async def _keep_claim(self, meta: UploadMeta) -> None:
        """Renew the completion's lease until cancelled (the completion has ended)."""
        while True:
            await asyncio.sleep(min(COMPLETION_RENEW_SECONDS, self.layout.lease_seconds / 4))
            with contextlib.suppress(StoreUnavailable):
                await self.state.claims.renew_claim(meta)

    async def take_over(self, meta: UploadMeta) -> CompletedUpload | None:
        """Complete the upload when its completion's host died (its lease ran out); None
        while a live host completes it, or when the completion cannot be done now."""
        claimed = await self.state.claims.claim_completion(meta, self.layout.lease_seconds)
        if claimed is None:
            return None
        try:
            return await self._complete_claimed(claimed)
        except (UploadConflict, StorageFailure) as e:
            log.warning("Could not take over the completion of %s: %s", meta.file_id, e.detail)
            return None

    async def completed_elsewhere(self, meta: UploadMeta) -> CompletedUpload | None:
        """Wait a little for a completion another request (or host) is running; take it over
        when its lease runs out (that host died). None when that completion failed (the
        upload takes chunks again); UploadGone when the upload was removed; CompletionPending
        (503) when it takes longer: the client asks again later."""
        deadline = time.monotonic() + COMPLETION_WAIT_SECONDS
        while True:
            row = await self.state.uploads.get(meta.file_id)
            if row is None or row.meta.token != meta.token:
                raise UploadGone()
            if row.completed is not None:
                return row.completed
            if row.status == "uploading":  # that completion failed
                return None
            claimed = await self.state.claims.claim_completion(row.meta, self.layout.lease_seconds)
            if claimed is not None:
                return await self._complete_claimed(claimed)
            if time.monotonic() > deadline:
                raise CompletionPending()
            await asyncio.sleep(WAIT_STEP_SECONDS)

    async def _complete(self, row: UploadRow) -> CompletedUpload:
        meta = row.meta
        chunks = await self.state.chunks.rows(meta)
        if [c.index for c in chunks] != list(range(meta.total_chunks)):
            raise StorageFailure(f"the chunk records of {meta.file_id} are incomplete")
        size = sum(c.length for c in chunks)
        if meta.total_size is not None and size != meta.total_size:
            raise UploadConflict(
                f"The merged file has {size} bytes, not the total_size {meta.total_size} "
                "given by the client"
            )
        parts = await self._build_parts(row, chunks)
        try:
            await self.objects.complete(row.object_key, row.upload_id, parts)
            completed_here = True
        except NoSuchUpload:
            completed_here = False  # by a host that died before recording it, or never
        fault_point("s3-after-complete")
        if not completed_here:
            # The object must be there, whole. A completion of ours needs no such look:
            # the store made the object of exactly the parts whose ETags it was given.
            await self._check_completed_elsewhere(row.object_key, size)
        if row.stream is not None:  # a tus upload keeps its whole CRC as it goes
            crc = row.stream.crc
        else:
            crc = checksums.combine((c.crc, c.length) for c in chunks)
        record = CompletedUpload.of(
            meta,
            size=size,
            crc64nvme=checksums.to_s3(crc),
            sha256=await self._sha256_of_object(row.object_key) if self.layout.sha256 else None,
        )
        if not await self.state.claims.mark_completed(meta, record):
            await self.objects.delete([row.object_key])  # removed while completing
            raise UploadGone()
        self.layout.later(self.layout.remove_staging(meta))
        return record

    async def _check_completed_elsewhere(self, key: str, size: int) -> None:
        stored = await self.objects.size_of(key)
        if stored != size:
            raise StorageFailure(
                f"the object {key} has {stored} bytes after completion, not {size}"
            )

    async def _sha256_of_object(self, key: str) -> str:
        digest = hashlib.sha256()
        async for piece in self.objects.read_pieces(key):
            await asyncio.to_thread(digest.update, piece)
        return digest.hexdigest()

    async def _build_parts(self, row: UploadRow, chunks: list[ChunkRow]) -> list[tuple[int, str]]:
        """Every part of the object, in order: chunks that are parts, and gathered runs."""
        if row.direct:
            groups = [(c.index + 1, [c]) for c in chunks]
        else:
            groups = list(enumerate(gather_runs(chunks), start=1))
        if len(groups) > self.layout.max_parts:
            raise StorageFailure(f"{len(groups)} parts exceed the store's limit")
        built = {} if row.direct else await self.state.chunks.parts(row.meta)

        async def build(number: int, group: list[ChunkRow]) -> tuple[int, str]:
            ahead = built.get(number)
            if (
                ahead is not None
                and ahead.etag is not None
                and (ahead.first, ahead.last) == (group[0].index, group[-1].index)
                and ahead.sources == part_sources(group)
            ):
                return number, ahead.etag  # gathered while the upload went on
            return number, await self.build_part(row, number, group)

        return list(await asyncio.gather(*(build(n, g) for n, g in groups)))

    async def build_part(self, row: UploadRow, number: int, group: list[ChunkRow]) -> str:
        if len(group) == 1 and group[0].etag is not None:
            return group[0].etag
        async with self.layout.gathering:
            return await self._gather(row, number, group)

    async def _gather(self, row: UploadRow, number: int, group: list[ChunkRow]) -> str:
        only = group[0].staging_key if len(group) == 1 else None
        if only is not None and not only.endswith(IN_DATABASE):
            return await self.objects.copy_part(row.object_key, row.upload_id, number, only)

        async def gathered() -> AsyncIterator[bytes]:
            for chunk in group:
                assert chunk.staging_key is not None
                async for piece in self.layout.read_staged(chunk.staging_key):
                    yield piece

        length = sum(c.length for c in group)
        return await self.objects.put_part(
            row.object_key, row.upload_id, number, gathered(), length
        )
