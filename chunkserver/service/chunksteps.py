"""The seed protocol's steps in the upload service: a chunk admitted, its upload prepared,
its bytes received, checked and committed, the upload completed when it was the last."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from ..auth.identities import ANONYMOUS
from ..auth.owners import public_id
from ..errors import (
    PayloadTooLarge,
    UploadConflict,
    UploadGone,
)
from ..model import (
    ChunkFields,
    Committed,
    CompletedUpload,
    UploadMeta,
    UploadProtocol,
)
from ..storage.meter import ByteLimit
from ..storage.store import Catalog, ChunkWriter, PendingChunk
from .callers import Caller
from .core import RECEIVE_ATTEMPTS, Prepared, ServiceCore

# An upload made with tus or the IETF draft (a byte stream) takes no seed chunk.
STREAM_CONFLICT = "{} is a byte stream (tus or /resumable/): send its bytes with PATCH"


class ChunkSteps:
    """The seed protocol's steps, on the core the stream steps share, the catalog and the
    store's chunk writer."""

    def __init__(self, core: ServiceCore, catalog: Catalog, writer: ChunkWriter[Any]) -> None:
        self.core = core
        self.catalog = catalog
        self.writer = writer

    async def prepare(
        self,
        fields: ChunkFields,
        content_length: int | None,
        *,
        ask_store: bool = False,
        caller: Caller | None = None,
    ) -> Prepared | CompletedUpload:
        """Check a chunk before its bytes are read; find or begin its upload.

        Returns the upload's record when it is already complete (the answer to a late retry).
        With `ask_store`, the upload is looked up under the store's lock (begin), which sees
        it either before or after a completion running elsewhere, never halfway.
        """
        self.core.policy.check_limits(fields, content_length)
        known: CompletedUpload | UploadMeta | None = None
        if not ask_store:
            known = self.core.manifest.get(fields.file_id) or await self.catalog.lookup(
                fields.file_id
            )
        if (
            isinstance(known, CompletedUpload | UploadMeta)
            and known.protocol != UploadProtocol.CHUNKS
        ):
            raise UploadConflict(STREAM_CONFLICT.format(public_id(fields.file_id)))
        if isinstance(known, UploadMeta) and known.chunk_size is None and fields.chunk_index:
            # Another process may have learned the chunk size since this one cached it.
            known = await self.catalog.lookup(fields.file_id)
        if known is not None:
            # The bytes quota is checked once the chunk's own length is known (store_chunk).
            await self.core.check_existing(known, caller, None)
        if isinstance(known, CompletedUpload):
            return known
        if known is not None:
            self.core.policy.check_conflicts(known, self._compared(fields))
        self.core.policy.check_free_space(known, fields, content_length)
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
            if known is None:  # a new upload: quotas, and the application may refuse it
                proposed = await self.core.admit_new(proposed, caller, None)
                fields = dataclasses.replace(
                    fields, file_id=proposed.file_id, metadata=proposed.metadata
                )
            async with self.core.locks.hold(fields.file_id):
                begun, created = await self.catalog.begin(proposed)
            if begun.protocol != UploadProtocol.CHUNKS:
                raise UploadConflict(STREAM_CONFLICT.format(public_id(fields.file_id)))
            if isinstance(begun, CompletedUpload):
                return begun
            self.core.policy.check_conflicts(begun, self._compared(fields))
            known = begun
        self.core.manifest.remember(known)
        return Prepared(known, created)

    def _compared(self, fields: ChunkFields) -> ChunkFields:
        """The fields a chunk is compared with its upload by. With a pre-create hook, the
        metadata is what the first chunk and the hook fixed, not compared again."""
        if self.core.hooks.wants("pre-create"):
            return dataclasses.replace(fields, metadata=None)
        return fields

    async def receive(
        self,
        prepared: Prepared,
        fields: ChunkFields,
        body: AsyncIterator[memoryview],
        length_hint: int | None = None,
        caller: Caller | None = None,
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
                self.core.manifest.forget(fields.file_id)
            again = await self.prepare(fields, None, ask_store=True, caller=caller)
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
        if offset is not None and offset >= self.core.config.max_file_bytes:
            raise PayloadTooLarge(
                f"Upload would exceed max_file_bytes ({self.core.config.max_file_bytes} bytes)"
            )
        received: PendingChunk = await self.writer.receive(
            meta,
            fields.chunk_index,
            body,
            max_bytes=ByteLimit.chunk(self.core.config.max_chunk_bytes),
            want_sha256=fields.chunk_sha256 is not None,
            length_hint=length_hint,
        )
        self.core.metrics.inc("bytes_received", received.length)
        return received

    async def receive_unplaced(
        self, body: AsyncIterator[memoryview], *, want_sha256: bool
    ) -> PendingChunk:
        """A chunk that came before the fields saying which upload it belongs to."""
        received: PendingChunk = await self.writer.receive_unplaced(
            body,
            max_bytes=ByteLimit.chunk(self.core.config.max_chunk_bytes),
            want_sha256=want_sha256,
        )
        self.core.metrics.inc("bytes_received", received.length)
        return received

    async def store_chunk(
        self,
        fields: ChunkFields,
        prepared: Prepared,
        received: PendingChunk,
        caller: Caller | None = None,
    ) -> Committed | CompletedUpload:
        """Check and commit a received chunk; complete the upload when it was the last.

        Takes ownership of `received`: it is committed or discarded.
        """
        try:
            sha256 = None
            if fields.chunk_sha256 is not None:  # computed now when the field came after
                sha256 = received.sha256_hex() or await self.writer.sha256_of(received)
            self.core.policy.check_received(fields, prepared.meta, received, sha256)
            identity = ANONYMOUS if caller is None else caller.identity
            await self.core.quotas.admit_bytes(identity, prepared.meta, received.length)
        except BaseException:
            await self.writer.discard(received)
            raise
        # Shielded: once the commit has started, a cancelled request must not leave it half
        # done; it finishes either way.
        result = await asyncio.shield(
            self.writer.commit(received, prepared.meta, fields.chunk_index)
        )
        if isinstance(result, CompletedUpload):
            self.core.manifest.forget(fields.file_id)
            return result
        self.core.manifest.remember(result.meta)
        self.core.metrics.inc("chunks_stored")
        if prepared.created:
            await self.core.hooks.emit("post-create", result.meta, caller)
        if not result.all_stored:
            extra = {"uploaded_chunks": result.uploaded_chunks}
            await self.core.hooks.progress(result.meta, caller, extra)
            return result
        completed = await self.core.complete_and_announce(result.meta, caller)
        if completed is None:
            return result
        self.core.manifest.forget(fields.file_id)
        return completed

    async def fail(self, prepared: Prepared | None, received: PendingChunk | None) -> None:
        """A chunk request failed: nothing of it may remain, not even an upload it began."""
        if received is not None:
            await self.writer.discard(received)
        if prepared is not None and prepared.created:
            self.core.manifest.forget(prepared.meta.file_id)
            await asyncio.shield(self.catalog.abandon(prepared.meta))
