"""The upload service above the store, with the manifest, locks, hooks and metrics.

Handlers call this and nothing below it. `UploadService` is the seed protocol's steps
(`chunksteps.py`), tus's (`streamsteps.py`) and the verbs both share (here), around the state
of `servicecore.py`. Every check that can refuse a chunk or a PATCH (limits, free space,
conflicts with earlier chunks, checksums) is in `policy.py`, called before the bytes are read
and after; the store only stores. The service holds no threads: the store runs its own.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Self, TypeVar

from ..config import Config
from ..errors import (
    CompletionPending,
    DigestMismatch,
    DiskFull,
    HookRefused,
    HookUnavailable,
    InconsistentLength,
    PayloadTooLarge,
    ServerBusy,
    StorageFailure,
    TusChecksumMismatch,
    UploadConflict,
)
from ..model import (
    CompletedUpload,
    StoredObject,
    StreamProgress,
    SweepReport,
    UploadMeta,
    UploadProgress,
)
from ..storage.backends import build_store
from ..storage.store import Store
from .callers import Caller
from .chunksteps import ChunkSteps
from .core import STATUS_FINISH_SECONDS, Prepared, ServiceCore, log
from .hooks import finish_event_id
from .streamsteps import StreamSteps

__all__ = ["Prepared", "UploadService"]

T = TypeVar("T")
# What refuses a creation's first bytes, on either stream protocol.
REFUSED_CREATION_BODY = (
    TusChecksumMismatch,
    DigestMismatch,
    PayloadTooLarge,
    ServerBusy,
    DiskFull,
    InconsistentLength,
)


class UploadService:
    """The service the HTTP layer calls: the seed protocol's steps (`chunks`), the stream
    protocols' (`streams`), both on one core (`core`), and the verbs they share."""

    def __init__(self, config: Config, store: Store[Any, Any]) -> None:
        self.core = ServiceCore(config, store.catalog, store.assembler, store.backend)
        self.chunks = ChunkSteps(self.core, store.catalog, store.chunks)
        self.streams = StreamSteps(self.core, store.catalog, store.streams)
        self.catalog = store.catalog
        self.janitor = store.janitor
        self.backend = store.backend

    @classmethod
    def open(cls, config: Config) -> Self:
        """The service on the configured backend (connected later, by `start`)."""
        return cls(config, build_store(config))

    async def start(self) -> None:
        await self.core.start()

    async def close(self) -> None:
        await self.core.close()

    async def rebuild_manifest(self) -> None:
        await self.core.rebuild_manifest()

    async def status(
        self, file_id: str, caller: Caller | None = None
    ) -> CompletedUpload | UploadProgress | StreamProgress | None:
        found = await self.catalog.status(file_id)
        if found is not None and caller is not None:
            await self.core.hooks.pre_access(_upload_of(found), caller)
        if isinstance(found, UploadProgress) and found.meta.is_stream:
            return await self.streams.progress(found.meta)
        if isinstance(found, UploadProgress) and not found.missing:
            # Every chunk is stored but the upload is not complete: a completion whose
            # process or host died before or during it. Any request that finds it finishes
            # it (exactly once, whoever else tries), a status request too.
            found = await self._complete_left_over(found, caller)
        if isinstance(found, UploadProgress):
            self.core.manifest.remember(found.meta)
        else:
            self.core.manifest.forget(file_id)
        return found

    async def _complete_left_over(
        self, progress: UploadProgress, caller: Caller | None
    ) -> CompletedUpload | UploadProgress:
        try:
            # At most a second: a completion that another live process or host runs is
            # waited for by the chunks, not by status requests (it goes on, shielded). With
            # a pre-finish hook, the application is asked again (it may have refused the
            # completion the last chunk asked for).
            async with asyncio.timeout(STATUS_FINISH_SECONDS):
                if self.core.hooks.wants("pre-finish"):
                    completed = await self.core.complete_and_announce(progress.meta, caller)
                else:
                    completed = await self.core.complete(progress.meta)
        except TimeoutError:
            return progress
        except (HookRefused, HookUnavailable):
            return progress
        except (UploadConflict, CompletionPending, StorageFailure) as e:
            log.warning(
                "Could not complete %s from a status request: %s", progress.meta.file_id, e.detail
            )
            return progress
        return progress if completed is None else completed

    async def create_with_bytes(self, begun: UploadMeta, append: Callable[[], Awaitable[T]]) -> T:
        """A stream's creation that carries its first bytes (tus's creation-with-upload, the
        draft's creation): `append` stores them, counted among the requests in flight. A
        body refused (its checksum or digest, a limit, the room, the server's load, a
        length) leaves nothing of the creation: the one rule of both stream protocols."""
        try:
            with self.core.admit():
                return await append()
        except REFUSED_CREATION_BODY:
            await self.streams.abandon_stream(begun)
            raise

    async def download(
        self, file_id: str, caller: Caller | None = None
    ) -> tuple[Path | StoredObject, CompletedUpload] | None:
        found = await self.catalog.download(file_id)
        if found is not None and found[1].is_partial:
            return None  # a part of a concatenation is served only within its final upload
        if found is not None and caller is not None:
            await self.core.hooks.pre_access(found[1], caller)
        return found

    async def delete(self, file_id: str, caller: Caller | None = None) -> bool:
        wants_upload = self.core.hooks.wants("post-terminate") or self.core.hooks.wants(
            "pre-access"
        )
        async with self.core.locks.hold(file_id):
            known = await self.catalog.lookup(file_id) if wants_upload else None
            if known is not None and caller is not None:
                await self.core.hooks.pre_access(known, caller)
            existed = await self.catalog.delete(file_id)
        self.core.manifest.forget(file_id)
        self.core.hooks.forget(file_id)
        if existed:
            self.core.metrics.inc("uploads_aborted")
            if known is not None:
                await self.core.hooks.emit("post-terminate", known, caller)
        return existed

    async def sweep(self) -> SweepReport:
        # With a pre-finish hook, an upload whose chunks are all stored is completed only
        # by a request (the application decides), not by the sweep.
        report = await self.janitor.sweep(
            ttl_seconds=self.core.config.upload_ttl_seconds,
            finish=not self.core.hooks.wants("pre-finish"),
        )
        # Forget what ended anywhere: expired, completed here or elsewhere, deleted.
        self.core.manifest.retain(await self.catalog.uploads_in_progress())
        self.core.metrics.inc("uploads_failed", len(report.expired))
        self.core.metrics.inc("uploads_completed", len(report.completed))
        for meta in report.expired_uploads:
            await self.core.hooks.emit("post-expire", meta, None)
        for record in report.completed:  # finished by the sweep after a crash
            if record.is_partial:
                continue
            event_id = finish_event_id(record.file_id, record.token)
            await self.core.hooks.emit("post-finish", record, None, event_id)
        return report

    async def render_metrics(self) -> str:
        in_progress = len(await self.catalog.uploads_in_progress())
        gauges = {
            "uploads_in_progress": (
                "Uploads with chunks stored, not yet complete",
                in_progress,
            ),
            "free_disk_bytes": (
                "Free bytes on the data folder's filesystem",
                self.backend.free_bytes(),
            ),
        }
        if self.core.hooks.outbox is not None and self.core.config.hook_url:
            pending = await self.core.hooks.outbox.count()
            gauges["hooks_pending"] = ("Hook events waiting to be delivered", pending)
        return await asyncio.to_thread(self.core.metrics.render, gauges)

    async def health(self) -> dict[str, bool]:
        return await self.backend.health()


def _upload_of(found: CompletedUpload | UploadProgress) -> CompletedUpload | UploadMeta:
    return found if isinstance(found, CompletedUpload) else found.meta
