"""tus's steps in the upload service: a stream begun, PATCHes appended at its offset,
concatenation, completion when the offset reaches the length."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

from ..auth.owners import public_id
from ..errors import (
    BadRequest,
    DigestMismatch,
    FileNotFound,
    Forbidden,
    InconsistentLength,
    OffsetMismatch,
    PayloadTooLarge,
    UploadAlreadyComplete,
    UploadConflict,
    UploadGone,
)
from ..model import (
    CompletedUpload,
    StreamProgress,
    UploadMeta,
)
from ..storage.store import Catalog, PendingBytes, StreamWriter
from .callers import Caller
from .core import PatchBody, PieceChecker, ServiceCore


class StreamSteps:
    """The byte-stream protocols' steps (tus, the IETF draft), on the core the seed's steps
    share, the catalog and the store's stream writer."""

    def __init__(self, core: ServiceCore, catalog: Catalog, writer: StreamWriter[Any]) -> None:
        self.core = core
        self.catalog = catalog
        self.writer = writer

    async def progress(self, meta: UploadMeta) -> StreamProgress | CompletedUpload | None:
        """A stream's offset and CRC so far; its record once complete."""
        return await self.writer.stream_progress(meta)

    async def create_stream(
        self, meta: UploadMeta, caller: Caller | None, length: int | None = None
    ) -> UploadMeta:
        """Begin a stream (its file_id is new) after the limits, the identity's quotas and
        the pre-create hook, which may give it another file_id, metadata or owner: the
        upload begun says. `length`: the creation request's body, when it carries one."""
        if meta.total_size is not None:
            self.core.policy.check_stream_size(meta.total_size)
            self.core.policy.check_stream_room(meta.total_size)
        meta = await self.core.admit_new(meta, caller, length)
        async with self.core.locks.hold(meta.file_id):
            begun, _ = await self.catalog.begin(meta)
        if isinstance(begun, CompletedUpload) or begun.token != meta.token:
            raise UploadConflict(f"{public_id(meta.file_id)} exists already")
        await self.core.hooks.emit("post-create", begun, caller)
        return begun

    async def stream_state(
        self, file_id: str, caller: Caller | None = None
    ) -> StreamProgress | CompletedUpload | None:
        """A tus upload's progress, or any completed upload's record (a file sent with the
        seed's protocol reads as a complete tus upload); None otherwise."""
        known = await self.catalog.lookup(file_id)
        if known is not None and caller is not None:
            await self.core.hooks.pre_access(known, caller)
        if known is None or isinstance(known, CompletedUpload):
            return known
        if not known.is_stream:
            return None
        return await self.writer.stream_progress(known)

    async def keep_digest(self, file_id: str, sha256: str) -> None:
        """Keep a representation digest (hex SHA-256) with an upload in progress, to be
        checked against its bytes when it completes; one that differs from the digest an
        earlier request gave is refused (400) before any byte is read."""
        known = await self.catalog.lookup(file_id)
        if known is None or (isinstance(known, UploadMeta) and not known.is_stream):
            raise FileNotFound("No upload of this id")
        if isinstance(known, CompletedUpload):
            return  # checked against the completed bytes by the caller
        if known.repr_sha256 is None:
            known = await self.writer.declare_digest(known, sha256)
            self.core.manifest.forget(file_id)
        if known.repr_sha256 != sha256:
            raise DigestMismatch("Repr-Digest differs from the one an earlier request gave")

    async def append(
        self,
        file_id: str,
        offset: int,
        body: PatchBody,
        *,
        length: int | None,
        declared_length: int | None,
        checksum: PieceChecker | None,
        caller: Caller | None,
        complete: bool | None = None,
    ) -> StreamProgress | CompletedUpload:
        """A PATCH: its bytes at `offset`, then the completion when they were the last.
        `length` is None for a body without Content-Length (chunked transfer coding): it
        ends where the body ends, within the upload's length.

        `complete` says when the upload completes: None (tus) once its offset reaches its
        length; True or False (the IETF draft's Upload-Complete) with this PATCH or not,
        whatever the offset. A completing PATCH fixes a length still unknown at its end.

        A refused PATCH changes nothing: its bytes are discarded and a length it declares is
        kept only once its bytes are committed. A body cut short (the client went away)
        still counts for what arrived, unless a checksum was to be checked; the cut is
        raised after the commit."""
        on_piece = None if checksum is None else checksum.update
        meta = await self._stream_to_patch(file_id, offset, length, declared_length, caller)
        if isinstance(meta, CompletedUpload):
            return meta
        deferred = meta.total_size is None
        room = self.core.policy.room_after(meta, offset, declared_length)
        meta = _with_length(meta, declared_length)
        try:
            received: PendingBytes = await self.writer.receive_at(
                meta, offset, body.pieces(), length=length, max_bytes=room, on_piece=on_piece
            )
        except UploadGone:
            # The cached upload ended elsewhere (before a byte was read): ask the store.
            self.core.manifest.forget(file_id)
            meta = await self._stream_to_patch(file_id, offset, length, declared_length, caller)
            if isinstance(meta, CompletedUpload):
                return meta
            meta = _with_length(meta, declared_length)
            received = await self.writer.receive_at(
                meta, offset, body.pieces(), length=length, max_bytes=room, on_piece=on_piece
            )
        self.core.metrics.inc("bytes_received", received.length)
        short = body.cut is not None or (length is not None and received.length < length)
        if (short and checksum is not None) or (checksum is not None and not checksum.matches()):
            await self.writer.discard_at(received)
            if short:
                raise body.cut or BadRequest("The body ended before its Content-Length")
            raise checksum.mismatch()
        if declared_length is not None and deferred:
            # Every check passed (offset, checksum, room): the length counts from now on.
            await self.writer.declare_length(meta, declared_length)
        progress = await asyncio.shield(self.writer.commit_at(received))
        if short:
            raise body.cut or BadRequest("The body ended before its Content-Length")
        if complete and progress.meta.total_size is None:
            # Said complete, its length unknown until its body ended (chunked): declared now
            # by an append of no bytes, as a tus client would (S3 puts its staged tail).
            return await self.append(
                file_id, progress.offset, NO_BYTES, length=0,
                declared_length=progress.offset, checksum=None, caller=caller, complete=True,
            )  # fmt: skip
        return await self._complete_stream(progress, caller, complete)

    async def _stream_to_patch(
        self,
        file_id: str,
        offset: int,
        length: int | None,
        declared_length: int | None,
        caller: Caller | None = None,
    ) -> UploadMeta | CompletedUpload:
        """The tus upload a PATCH goes into, after every check that needs no byte of it; or
        its record when complete and the PATCH adds nothing.

        The manifest spares the store a lookup per PATCH, as for chunks: it holds a tus
        upload once its length is known (nothing of it changes after that but its offset,
        which the store checks)."""
        cached = self.core.manifest.get(file_id)
        known: UploadMeta | CompletedUpload | None = cached
        if cached is None or not cached.is_stream:
            known = await self.catalog.lookup(file_id)
        if known is None or (isinstance(known, UploadMeta) and not known.is_stream):
            raise FileNotFound("No upload of this id")
        await self.core.check_existing(known, caller, length)
        if known.is_final:
            raise Forbidden("A final upload of a concatenation takes no PATCH")
        if isinstance(known, CompletedUpload):
            if offset != known.size:
                raise OffsetMismatch(offset, known.size)
            if length != 0 or (declared_length not in (None, known.size)):
                raise UploadAlreadyComplete()
            return known
        if declared_length is not None:
            if known.total_size is None:
                self.core.policy.check_stream_size(declared_length)
            elif known.total_size != declared_length:
                await self._check_offset(known, offset)  # a wrong offset is told first (409)
                raise InconsistentLength(
                    f"Upload-Length {declared_length} differs from the upload's length "
                    f"{known.total_size}"
                )
        end = offset + (length or 0)
        limit = known.total_size if known.total_size is not None else declared_length
        if limit is not None and end > limit:
            await self._check_offset(known, offset)  # a wrong offset is told first (409)
            raise PayloadTooLarge(
                f"This request's content ends at byte {end}, past the upload's length "
                f"({limit} bytes)"
            )
        self.core.policy.check_stream_size(end)
        if known.total_size is None and length:  # no room was reserved
            self.core.policy.check_stream_room(length)
        return known

    async def _check_offset(self, meta: UploadMeta, offset: int) -> None:
        """OffsetMismatch (409, with the right offset) when `offset` is not the upload's."""
        state = await self.writer.stream_progress(meta)
        if isinstance(state, StreamProgress) and state.offset != offset:
            raise OffsetMismatch(offset, state.offset)
        if isinstance(state, CompletedUpload) and state.size != offset:
            raise OffsetMismatch(offset, state.size)

    async def _complete_stream(
        self, progress: StreamProgress, caller: Caller | None, complete: bool | None = None
    ) -> StreamProgress | CompletedUpload:
        if complete:
            self._check_complete_length(progress)
        meta = progress.meta
        if complete is False or meta.total_size is None or progress.offset != meta.total_size:
            if meta.total_size is not None:
                self.core.manifest.remember(meta)
            await self.core.hooks.progress(meta, caller, {"offset": progress.offset})
            return progress
        self.core.manifest.forget(meta.file_id)
        completed = await self.core.complete_and_announce(meta, caller)
        return progress if completed is None else completed

    def _check_complete_length(self, progress: StreamProgress) -> None:
        """An upload said complete ends at its length."""
        length = progress.meta.total_size
        if length is not None and length != progress.offset:
            raise InconsistentLength(
                f"The upload is said complete at offset {progress.offset}, but its length "
                f"is {length}"
            )

    async def abandon_stream(self, meta: UploadMeta) -> None:
        """A creation whose bytes were refused: nothing of it remains (its room included)."""
        self.core.manifest.forget(meta.file_id)
        await asyncio.shield(self.catalog.abandon(meta))

    async def concatenate(
        self, meta: UploadMeta, partial_ids: list[str], caller: Caller | None
    ) -> CompletedUpload | StreamProgress:
        """A final upload made of completed partial uploads, in order."""
        sources: list[CompletedUpload] = []
        for partial_id in partial_ids:
            found = await self.catalog.lookup(partial_id)
            named = f"Upload-Concat names {public_id(partial_id)}"
            if found is None:
                raise BadRequest(f"{named}, which does not exist")
            if not isinstance(found, CompletedUpload):
                raise BadRequest(f"{named}, which is not complete")
            if not found.is_partial:
                raise BadRequest(f"{named}, which is not a partial upload")
            sources.append(found)
        total = sum(source.size for source in sources)
        begun = await self.create_stream(dataclasses.replace(meta, total_size=total), caller)
        progress = await asyncio.shield(self.writer.concatenate(begun, sources))
        return await self._complete_stream(progress, caller)


class _NoBytes:
    """The body of an append that carries no byte."""

    cut: BaseException | None = None

    async def pieces(self) -> AsyncIterator[memoryview]:
        return
        yield


NO_BYTES = _NoBytes()


def _with_length(meta: UploadMeta, declared_length: int | None) -> UploadMeta:
    """A deferred-length upload as a PATCH declaring its length sees it: its bytes are
    received knowing that length (S3 plans its last part by it), which is recorded only
    once they pass every check, before their commit."""
    if declared_length is None or meta.total_size is not None:
        return meta
    return dataclasses.replace(meta, total_size=declared_length)
