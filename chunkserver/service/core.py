"""The upload service's shared state: the store, the policy, the manifest, locks, hooks and
metrics, built from the configuration; what both protocols' steps stand on."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from ..auth.identities import ANONYMOUS, Identity
from ..auth.owners import owned_id, public_id
from ..config import Config
from ..errors import ChunkServerError, ServerBusy, UploadStopped
from ..logs import ThrottledLog
from ..metrics import Metrics
from ..model import (
    CompletedUpload,
    UploadMeta,
)
from ..storage.store import Assembler, Backend, Catalog
from .callers import Caller
from .hooks import CreateChanges, Hooks, finish_event_id, upload_body
from .locks import KeyedLocks
from .manifest import Manifest
from .policy import Policy
from .quotas import Quotas

log = logging.getLogger("chunkserver")

# How long a status request may spend finishing a completion left undone (see `status`).
STATUS_FINISH_SECONDS = 1.0
# How often a chunk looks its upload up again when it ended under it (see `receive`).
RECEIVE_ATTEMPTS = 4


class PieceChecker(Protocol):
    """A PATCH's checksum (tus's Upload-Checksum, the draft's digests), fed every byte as it
    passes; `mismatch()` is the error its protocol answers when they do not match."""

    def update(self, piece: memoryview) -> None: ...
    def matches(self) -> bool: ...
    def mismatch(self) -> ChunkServerError: ...


class PatchBody(Protocol):
    """A PATCH's body; `cut` says why it ended early (the client went away), or None."""

    cut: BaseException | None

    def pieces(self) -> AsyncIterator[memoryview]: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """The upload a chunk goes into, and whether this request created it."""

    meta: UploadMeta
    created: bool


class ServiceCore:
    """What both protocols' steps stand on: the configuration, the policy, the manifest, the
    locks, metrics, hooks and quotas; admission of new uploads and of requests on existing
    ones, and the one completion step. It calls the store's catalog, assembler and backend."""

    def __init__(
        self, config: Config, catalog: Catalog, assembler: Assembler, backend: Backend
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.assembler = assembler
        self.backend = backend
        self.policy = Policy(config, backend)
        self.manifest = Manifest()
        self.locks = KeyedLocks()
        self.metrics = Metrics()
        # One WARNING line per outage of the database or the object store, not one per request.
        self.outages = ThrottledLog(log)
        self.hooks = Hooks(config, self.metrics, self.outages)
        self.ledger = backend.ledger()
        self.quotas = Quotas(config, self.ledger)
        self.inflight = 0  # chunk requests being handled now
        self.draining = False  # the process is stopping: answers close their connection

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a chunk request in flight; refuse it (503) past `max_inflight_chunks`."""
        if self.inflight >= self.config.max_inflight_chunks:
            raise ServerBusy(self.config.max_inflight_chunks)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def start(self) -> None:
        await self.backend.open()
        await self.hooks.start(
            self.backend.outbox(), self.catalog.lookup, self._event_body, self.ledger.stop
        )

    async def close(self) -> None:
        await self.hooks.close()
        await self.backend.close()

    def _event_body(self, upload: UploadMeta | CompletedUpload) -> dict[str, Any]:
        return upload_body(
            upload,
            storage=self.config.storage,
            location=self.catalog.location_of(upload.file_id, upload.filename),
        )

    async def rebuild_manifest(self) -> None:
        """Fill the manifest from the store (at start)."""
        for file_id in await self.catalog.uploads_in_progress():
            found = await self.catalog.lookup(file_id)
            if isinstance(found, UploadMeta):
                self.manifest.remember(found)

    async def admit_new(
        self, meta: UploadMeta, caller: Caller | None, length: int | None
    ) -> UploadMeta:
        """A new upload, before anything of it is stored: within its identity's quotas, then
        as the pre-create hook has it (which may refuse it, or change its file_id, metadata
        or owner). `length`: its first request's body, for an upload of unknown length."""
        identity = ANONYMOUS if caller is None else caller.identity
        declared = meta.total_size if meta.total_size is not None else length
        await self.quotas.admit_upload(identity, declared)
        meta = dataclasses.replace(meta, owner=identity.name)
        changes = await self.hooks.pre_create(meta, caller)
        return meta if changes is None else _changed(meta, changes, identity)

    async def check_existing(
        self, known: UploadMeta | CompletedUpload, caller: Caller | None, length: int | None
    ) -> None:
        """A request on an existing upload: the pre-access hook is asked (when listed); one
        adding bytes to an upload in progress is refused when the application stopped it or
        when its bytes pass the identity's quota."""
        if caller is not None:
            await self.hooks.pre_access(known, caller)
        if isinstance(known, UploadMeta):
            await self.check_not_stopped(known)
            identity = ANONYMOUS if caller is None else caller.identity
            await self.quotas.admit_bytes(identity, known, length)

    async def check_not_stopped(self, meta: UploadMeta) -> None:
        """UploadStopped when the application stopped the upload (a post-receive answer)."""
        if self.hooks.wants("post-receive"):
            detail = await self.ledger.stopped(meta.file_id, meta.token)
            if detail is not None:
                raise UploadStopped(detail)

    async def complete_and_announce(
        self, meta: UploadMeta, caller: Caller | None
    ) -> CompletedUpload | None:
        """The completion path of both protocols once every byte is stored. The pre-finish
        hook is asked first (its refusal leaves the bytes where they are, its answer goes to
        the client under "app"). post-finish is queued before the completion (sent once it
        is done, with its figures), so that a process killed between the two loses no
        event; a part of a concatenation is not a file and announces nothing."""
        app = None
        if not meta.is_partial:
            app = await self.hooks.pre_finish(meta, caller)
            await self.hooks.emit(
                "post-finish", meta, caller, finish_event_id(meta.file_id, meta.token)
            )
        completed = await self.complete(meta)
        self.hooks.forget(meta.file_id)
        if completed is not None and app is not None:
            completed = dataclasses.replace(completed, app=app)
        return completed

    async def complete(self, meta: UploadMeta) -> CompletedUpload | None:
        """The one completion step of both protocols: the store completes the upload
        (exactly once across processes and hosts, shielded from a cancelled request), and
        the completion is counted where it happened; None while chunks are missing."""
        async with self.locks.hold(meta.file_id):
            finished = await asyncio.shield(self.assembler.complete(meta))
        if finished is None:
            return None
        completed, here = finished
        if here and not completed.is_partial:  # a part of a concatenation is not a file
            self.metrics.inc("uploads_completed")
        return completed


def _changed(meta: UploadMeta, changes: CreateChanges, identity: Identity) -> UploadMeta:
    """A new upload as a pre-create answer changed it: another file_id, metadata added or
    replaced, another owner (its id then in that identity's namespace)."""
    owner = identity if changes.identity is None else Identity(changes.identity)
    file_id = owned_id(owner, changes.file_id or public_id(meta.file_id))
    metadata = meta.metadata
    if changes.metadata is not None:
        metadata = (meta.metadata or {}) | changes.metadata
    return dataclasses.replace(meta, file_id=file_id, metadata=metadata, owner=owner.name)
