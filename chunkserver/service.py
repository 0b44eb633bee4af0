"""The upload service above the store, with the manifest, locks, hooks and metrics.

Handlers call this and nothing below it. Every check that can refuse a chunk or a PATCH
(limits, free space, conflicts with earlier chunks, checksums) is in `policy.py`, called here
before the bytes are read and after; the store only stores. The service holds no threads:
the store runs its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .config import Config
from .errors import (
    BadRequest,
    CompletionPending,
    FileNotFound,
    Forbidden,
    OffsetMismatch,
    PayloadTooLarge,
    ServerBusy,
    StorageFailure,
    TusChecksumMismatch,
    UploadConflict,
    UploadGone,
)
from .forms import ChunkFields
from .hooks import Hooks, finish_event_id, upload_body
from .local import LocalStore
from .locks import KeyedLocks
from .logs import ThrottledLog
from .manifest import Manifest
from .metrics import Metrics
from .model import (
    Committed,
    CompletedUpload,
    StoredObject,
    StreamProgress,
    SweepReport,
    UploadMeta,
    UploadProgress,
)
from .policy import Policy
from .store import PendingBytes, PendingChunk, Store

log = logging.getLogger("chunkserver")

# How long a status request may spend finishing a completion left undone (see `status`).
STATUS_FINISH_SECONDS = 1.0
# How often a chunk looks its upload up again when it ended under it (see `receive`).
RECEIVE_ATTEMPTS = 4


class PieceChecker(Protocol):
    """A PATCH's checksum (tus's Upload-Checksum), fed every byte as it passes."""

    def update(self, piece: memoryview) -> None: ...
    def matches(self) -> bool: ...


class PatchBody(Protocol):
    """A PATCH's body; `cut` says why it ended early (the client went away), or None."""

    cut: BaseException | None

    def pieces(self) -> AsyncIterator[memoryview]: ...


@dataclass(frozen=True, slots=True)
class Prepared:
    """The upload a chunk goes into, and whether this request created it."""

    meta: UploadMeta
    created: bool


class UploadService:
    def __init__(self, config: Config, store: Store[Any, Any]) -> None:
        self.config = config
        self.store = store
        self.policy = Policy(config, store)
        self.manifest = Manifest()
        self.locks = KeyedLocks()
        self.metrics = Metrics()
        # One WARNING line per outage of the database or the object store, not one per request.
        self.outages = ThrottledLog(log)
        self.hooks = Hooks(config, self.metrics, self.outages)
        self.inflight = 0  # chunk requests being handled now
        self.draining = False  # the process is stopping: answers close their connection

    @classmethod
    def open(cls, config: Config) -> UploadService:
        """The service on the configured backend (connected later, by `start`)."""
        sha256 = "sha256" in config.checksums
        store: Store[Any, Any]
        if config.storage == "s3":
            # Imported here: botocore's models cost the local backend ~20 MiB of memory.
            from .s3 import S3Store
            from .s3objects import Settings

            store = S3Store(
                Settings(
                    bucket=config.s3_bucket,
                    endpoint_url=config.s3_endpoint_url or None,
                    region=config.s3_region or None,
                    access_key_id=config.s3_access_key_id or None,
                    secret_access_key=config.s3_secret_access_key or None,
                ),
                config.database_url,
                prefix=config.s3_prefix,
                scratch=Path(config.data_dir) / "scratch",
                sha256=sha256,
                max_parts=config.s3_max_parts,
                max_file_bytes=config.max_file_bytes,
            )
        else:
            store = LocalStore(Path(config.data_dir), fsync=config.fsync, sha256=sha256)
        return cls(config, store)

    async def start(self) -> None:
        await self.store.open()
        await self.hooks.start(self.store.outbox(), self.store.lookup, self._event_body)

    async def close(self) -> None:
        await self.hooks.close()
        await self.store.close()

    def _event_body(self, upload: UploadMeta | CompletedUpload) -> dict[str, Any]:
        return upload_body(
            upload,
            storage=self.config.storage,
            location=self.store.location_of(upload.file_id, upload.filename),
        )

    async def rebuild_manifest(self) -> None:
        """Fill the manifest from the store (at start)."""
        for file_id in await self.store.uploads_in_progress():
            found = await self.store.lookup(file_id)
            if isinstance(found, UploadMeta):
                self.manifest.remember(found)

    # -- receiving a chunk --

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

    async def prepare(
        self,
        fields: ChunkFields,
        content_length: int | None,
        *,
        ask_store: bool = False,
        remote: str | None = None,
    ) -> Prepared | CompletedUpload:
        """Check a chunk before its bytes are read; find or begin its upload.

        Returns the upload's record when it is already complete (the answer to a late retry).
        With `ask_store`, the upload is looked up under the store's lock (begin), which sees
        it either before or after a completion running elsewhere, never halfway.
        """
        self.policy.check_limits(fields, content_length)
        known: CompletedUpload | UploadMeta | None = None
        if not ask_store:
            known = self.manifest.get(fields.file_id) or await self.store.lookup(fields.file_id)
        if isinstance(known, CompletedUpload | UploadMeta) and known.protocol != "chunks":
            raise UploadConflict(f"{fields.file_id} is a tus upload: send its bytes with PATCH")
        if isinstance(known, CompletedUpload):
            return known
        if known is not None and known.chunk_size is None and fields.chunk_index != 0:
            # Another process may have learned the chunk size since this one cached it.
            known = await self.store.lookup(fields.file_id)
            if isinstance(known, CompletedUpload):
                return known
        if known is not None:
            self.policy.check_conflicts(known, fields)
        self.policy.check_free_space(known, fields, content_length)
        created = False
        if known is None or known.adopts(fields.chunk_size, fields.metadata):
            proposed = UploadMeta.new(
                fields.file_id,
                fields.filename,
                fields.total_chunks,
                fields.total_size,
                fields.chunk_size,
                fields.metadata,
            )
            if known is None:  # a new upload: the application may refuse it first
                await self.hooks.pre_create(proposed, remote)
            async with self.locks.hold(fields.file_id):
                begun, created = await self.store.begin(proposed)
            if begun.protocol != "chunks":
                raise UploadConflict(f"{fields.file_id} is a tus upload: send its bytes with PATCH")
            if isinstance(begun, CompletedUpload):
                return begun
            self.policy.check_conflicts(begun, fields)
            known = begun
        self.manifest.remember(known)
        return Prepared(known, created)

    async def receive(
        self,
        prepared: Prepared,
        fields: ChunkFields,
        body: AsyncIterator[memoryview],
        length_hint: int | None = None,
    ) -> tuple[Prepared, PendingChunk] | CompletedUpload:
        """Stream the chunk's bytes to the store.

        When the upload has ended since it was looked up (the manifest knew a completed or
        removed upload, or a completion elsewhere was under way), the store raises UploadGone
        before reading a byte, and the upload is asked for again under the store's lock.
        """
        for _ in range(RECEIVE_ATTEMPTS - 1):
            try:
                return prepared, await self._receive(prepared.meta, fields, body, length_hint)
            except UploadGone:
                self.manifest.forget(fields.file_id)
            again = await self.prepare(fields, None, ask_store=True)
            if isinstance(again, CompletedUpload):
                return again
            prepared = again
        return prepared, await self._receive(prepared.meta, fields, body, length_hint)

    async def _receive(
        self,
        meta: UploadMeta,
        fields: ChunkFields,
        body: AsyncIterator[memoryview],
        length_hint: int | None,
    ) -> PendingChunk:
        offset = meta.offset_of(fields.chunk_index)
        if offset is not None and offset >= self.config.max_file_bytes:
            raise PayloadTooLarge(
                f"Upload would exceed max_file_bytes ({self.config.max_file_bytes} bytes)"
            )
        received: PendingChunk = await self.store.receive(
            meta,
            fields.chunk_index,
            body,
            max_bytes=self.config.max_chunk_bytes,
            want_sha256=fields.chunk_sha256 is not None,
            length_hint=length_hint,
        )
        self.metrics.inc("bytes_received", received.length)
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, want_sha256: bool
    ) -> PendingChunk:
        """A chunk that came before the fields saying which upload it belongs to."""
        received: PendingChunk = await self.store.receive_unplaced(
            body, max_bytes=self.config.max_chunk_bytes, want_sha256=want_sha256
        )
        self.metrics.inc("bytes_received", received.length)
        return received

    async def store_chunk(
        self,
        fields: ChunkFields,
        prepared: Prepared,
        received: PendingChunk,
        remote: str | None = None,
    ) -> Committed | CompletedUpload:
        """Check and commit a received chunk; complete the upload when it was the last.

        Takes ownership of `received`: it is committed or discarded.
        """
        try:
            await self.policy.check_received(fields, prepared.meta, received)
        except BaseException:
            await self.store.discard(received)
            raise
        # Shielded: once the commit has started, a cancelled request must not leave it half
        # done; it finishes either way.
        result = await asyncio.shield(
            self.store.commit(received, prepared.meta, fields.chunk_index)
        )
        if isinstance(result, CompletedUpload):
            self.manifest.forget(fields.file_id)
            return result
        self.manifest.remember(result.meta)
        self.metrics.inc("chunks_stored")
        if not result.all_stored:
            return result
        # post-finish is queued before the completion (sent once it is done, with its
        # figures), so that a process killed between the two loses no event.
        await self.hooks.emit(
            "post-finish",
            result.meta,
            remote,
            finish_event_id(result.meta.file_id, result.meta.token),
        )
        completed = await self._complete(result.meta)
        if completed is None:
            return result
        self.manifest.forget(fields.file_id)
        return completed

    async def _complete(self, meta: UploadMeta) -> CompletedUpload | None:
        """The one completion step of both protocols: the store completes the upload
        (exactly once across processes and hosts, shielded from a cancelled request), and
        the completion is counted where it happened; None while chunks are missing."""
        async with self.locks.hold(meta.file_id):
            finished = await asyncio.shield(self.store.complete(meta))
        if finished is None:
            return None
        completed, here = finished
        if here and not completed.is_partial:  # a part of a concatenation is not a file
            self.metrics.inc("uploads_completed")
        return completed

    async def fail(self, prepared: Prepared | None, received: PendingChunk | None) -> None:
        """A chunk request failed: nothing of it may remain, not even an upload it began."""
        if received is not None:
            await self.store.discard(received)
        if prepared is not None and prepared.created:
            self.manifest.forget(prepared.meta.file_id)
            await asyncio.shield(self.store.abandon(prepared.meta))

    # -- tus uploads: a byte stream written at offsets --

    async def create_stream(self, meta: UploadMeta, remote: str | None) -> UploadMeta:
        """Begin a tus upload (its file_id is new) after the limits and the pre-create hook."""
        if meta.total_size is not None:
            self.policy.check_stream_size(meta.total_size)
            self.policy.check_stream_room(meta.total_size)
        await self.hooks.pre_create(meta, remote)
        async with self.locks.hold(meta.file_id):
            begun, _ = await self.store.begin(meta)
        if isinstance(begun, CompletedUpload) or begun.token != meta.token:
            raise UploadConflict(f"{meta.file_id} exists already")
        return begun

    async def stream_state(self, file_id: str) -> StreamProgress | CompletedUpload | None:
        """A tus upload's progress, or any completed upload's record (a file sent with the
        seed's protocol reads as a complete tus upload); None otherwise."""
        known = await self.store.lookup(file_id)
        if known is None or isinstance(known, CompletedUpload):
            return known
        if not known.is_stream:
            return None
        return await self.store.stream_progress(known)

    async def append(
        self,
        file_id: str,
        offset: int,
        body: PatchBody,
        *,
        length: int | None,
        declared_length: int | None,
        checksum: PieceChecker | None,
        remote: str | None,
    ) -> StreamProgress | CompletedUpload:
        """A PATCH: its bytes at `offset`, then the completion when they were the last.
        `length` is None for a body without Content-Length (chunked transfer coding): it
        ends where the body ends, within the upload's length.

        A refused PATCH changes nothing: its bytes are discarded and a length it declares is
        kept only once its bytes are committed. A body cut short (the client went away)
        still counts for what arrived, unless a checksum was to be checked; the cut is
        raised after the commit."""
        on_piece = None if checksum is None else checksum.update
        meta = await self._stream_to_patch(file_id, offset, length, declared_length)
        if isinstance(meta, CompletedUpload):
            return meta
        deferred = meta.total_size is None
        room = self.policy.room_after(meta, offset, declared_length)
        meta = _with_length(meta, declared_length)
        try:
            received: PendingBytes = await self.store.receive_at(
                meta, offset, body.pieces(), length=length, max_bytes=room, on_piece=on_piece
            )
        except UploadGone:
            # The cached upload ended elsewhere (before a byte was read): ask the store.
            self.manifest.forget(file_id)
            meta = await self._stream_to_patch(file_id, offset, length, declared_length)
            if isinstance(meta, CompletedUpload):
                return meta
            meta = _with_length(meta, declared_length)
            received = await self.store.receive_at(
                meta, offset, body.pieces(), length=length, max_bytes=room, on_piece=on_piece
            )
        self.metrics.inc("bytes_received", received.length)
        short = body.cut is not None or (length is not None and received.length < length)
        if (short and checksum is not None) or (checksum is not None and not checksum.matches()):
            await self.store.discard_at(received)
            if short:
                raise body.cut or BadRequest("The body ended before its Content-Length")
            raise TusChecksumMismatch()
        if declared_length is not None and deferred:
            # Every check passed (offset, checksum, room): the length counts from now on.
            await self.store.declare_length(meta, declared_length)
        progress = await asyncio.shield(self.store.commit_at(received))
        if short:
            raise body.cut or BadRequest("The body ended before its Content-Length")
        return await self._complete_stream(progress, remote)

    async def _stream_to_patch(
        self, file_id: str, offset: int, length: int | None, declared_length: int | None
    ) -> UploadMeta | CompletedUpload:
        """The tus upload a PATCH goes into, after every check that needs no byte of it; or
        its record when complete and the PATCH adds nothing.

        The manifest spares the store a lookup per PATCH, as for chunks: it holds a tus
        upload once its length is known (nothing of it changes after that but its offset,
        which the store checks)."""
        cached = self.manifest.get(file_id)
        known: UploadMeta | CompletedUpload | None = cached
        if cached is None or not cached.is_stream:
            known = await self.store.lookup(file_id)
        if known is None or (isinstance(known, UploadMeta) and not known.is_stream):
            raise FileNotFound("No tus upload of this id")
        if known.concat is not None and known.concat.startswith("final"):
            raise Forbidden("A final upload of a concatenation takes no PATCH")
        if isinstance(known, CompletedUpload):
            if offset != known.size:
                raise OffsetMismatch(offset, known.size)
            if length != 0 or (declared_length not in (None, known.size)):
                raise PayloadTooLarge("The upload is complete: no byte may be added")
            return known
        if declared_length is not None:
            if known.total_size is None:
                self.policy.check_stream_size(declared_length)
            elif known.total_size != declared_length:
                raise BadRequest(
                    f"Upload-Length {declared_length} differs from the upload's length "
                    f"{known.total_size}"
                )
        end = offset + (length or 0)
        limit = known.total_size if known.total_size is not None else declared_length
        if limit is not None and end > limit:
            await self._check_offset(known, offset)  # a wrong offset is told first (409)
            raise PayloadTooLarge(f"The PATCH ends at {end}, past the upload's length {limit}")
        self.policy.check_stream_size(end)
        if known.total_size is None and length:  # no room was reserved
            self.policy.check_stream_room(length)
        return known

    async def _check_offset(self, meta: UploadMeta, offset: int) -> None:
        """OffsetMismatch (409, with the right offset) when `offset` is not the upload's."""
        state = await self.store.stream_progress(meta)
        if isinstance(state, StreamProgress) and state.offset != offset:
            raise OffsetMismatch(offset, state.offset)
        if isinstance(state, CompletedUpload) and state.size != offset:
            raise OffsetMismatch(offset, state.size)

    async def _complete_stream(
        self, progress: StreamProgress, remote: str | None
    ) -> StreamProgress | CompletedUpload:
        meta = progress.meta
        if meta.total_size is None or progress.offset != meta.total_size:
            if meta.total_size is not None:
                self.manifest.remember(meta)
            return progress
        self.manifest.forget(meta.file_id)
        if meta.concat != "partial":  # a part of a concatenation is not a file yet
            await self.hooks.emit(
                "post-finish", meta, remote, finish_event_id(meta.file_id, meta.token)
            )
        completed = await self._complete(meta)
        return progress if completed is None else completed

    async def abandon_stream(self, meta: UploadMeta) -> None:
        """A creation whose bytes were refused: nothing of it remains (its room included)."""
        self.manifest.forget(meta.file_id)
        await asyncio.shield(self.store.abandon(meta))

    async def concatenate(
        self, meta: UploadMeta, partial_ids: list[str], remote: str | None
    ) -> CompletedUpload | StreamProgress:
        """A final upload made of completed partial uploads, in order."""
        sources: list[CompletedUpload] = []
        for partial_id in partial_ids:
            found = await self.store.lookup(partial_id)
            if found is None:
                raise BadRequest(f"Upload-Concat names {partial_id}, which does not exist")
            if not isinstance(found, CompletedUpload):
                raise BadRequest(f"Upload-Concat names {partial_id}, which is not complete")
            if not found.is_partial:
                raise BadRequest(f"Upload-Concat names {partial_id}, which is not a partial upload")
            sources.append(found)
        total = sum(source.size for source in sources)
        begun = await self.create_stream(dataclasses.replace(meta, total_size=total), remote)
        progress = await asyncio.shield(self.store.concatenate(begun, sources))
        return await self._complete_stream(progress, remote)

    # -- the other verbs --

    async def status(
        self, file_id: str
    ) -> CompletedUpload | UploadProgress | StreamProgress | None:
        found = await self.store.status(file_id)
        if isinstance(found, UploadProgress) and found.meta.is_stream:
            return await self.store.stream_progress(found.meta)
        if isinstance(found, UploadProgress) and not found.missing:
            # Every chunk is stored but the upload is not complete: a completion whose
            # process or host died before or during it. Any request that finds it finishes
            # it (exactly once, whoever else tries), a status request too.
            found = await self._complete_left_over(found)
        if isinstance(found, UploadProgress):
            self.manifest.remember(found.meta)
        else:
            self.manifest.forget(file_id)
        return found

    async def _complete_left_over(
        self, progress: UploadProgress
    ) -> CompletedUpload | UploadProgress:
        try:
            # At most a second: a completion that another live process or host runs is
            # waited for by the chunks, not by status requests (it goes on, shielded).
            async with asyncio.timeout(STATUS_FINISH_SECONDS):
                completed = await self._complete(progress.meta)
        except TimeoutError:
            return progress
        except (UploadConflict, CompletionPending, StorageFailure) as e:
            log.warning(
                "Could not complete %s from a status request: %s", progress.meta.file_id, e.detail
            )
            return progress
        return progress if completed is None else completed

    async def download(self, file_id: str) -> tuple[Path | StoredObject, CompletedUpload] | None:
        found = await self.store.download(file_id)
        if found is not None and found[1].is_partial:
            return None  # a part of a concatenation is served only within its final upload
        return found

    async def delete(self, file_id: str, remote: str | None = None) -> bool:
        async with self.locks.hold(file_id):
            known = await self.store.lookup(file_id) if self.hooks.wants("post-terminate") else None
            existed = await self.store.delete(file_id)
        self.manifest.forget(file_id)
        if existed:
            self.metrics.inc("uploads_aborted")
            if known is not None:
                await self.hooks.emit("post-terminate", known, remote)
        return existed

    async def sweep(self) -> SweepReport:
        report = await self.store.sweep(ttl_seconds=self.config.upload_ttl_seconds)
        # Forget what ended anywhere: expired, completed here or elsewhere, deleted.
        self.manifest.retain(await self.store.uploads_in_progress())
        self.metrics.inc("uploads_failed", len(report.expired))
        self.metrics.inc("uploads_completed", len(report.completed))
        for meta in report.expired_uploads:
            await self.hooks.emit("post-expire", meta, None)
        for record in report.completed:  # finished by the sweep after a crash
            if record.is_partial:
                continue
            event_id = finish_event_id(record.file_id, record.token)
            await self.hooks.emit("post-finish", record, None, event_id)
        return report

    async def render_metrics(self) -> str:
        in_progress = len(await self.store.uploads_in_progress())
        gauges = {
            "uploads_in_progress": (
                "Uploads with chunks stored, not yet complete",
                in_progress,
            ),
            "free_disk_bytes": (
                "Free bytes on the data folder's filesystem",
                self.store.free_bytes(),
            ),
        }
        if self.hooks.outbox is not None and self.config.hook_url:
            pending = await self.hooks.outbox.count()
            gauges["hooks_pending"] = ("Hook events waiting to be delivered", pending)
        return await asyncio.to_thread(self.metrics.render, gauges)

    async def health(self) -> dict[str, bool]:
        return await self.store.health()


def _with_length(meta: UploadMeta, declared_length: int | None) -> UploadMeta:
    """A deferred-length upload as a PATCH declaring its length sees it: its bytes are
    received knowing that length (S3 plans its last part by it), which is recorded only
    once they pass every check, before their commit."""
    if declared_length is None or meta.total_size is not None:
        return meta
    return dataclasses.replace(meta, total_size=declared_length)
