"""One POST /upload-chunk, from its multipart parts to a stored chunk: the seed protocol's
steps in the order the parts arrive. The handler parses the request and shapes the answer;
this module decides what each part means and calls the upload service.

A chunk part whose fields all came before it is written straight into its upload; one that
came first is kept aside until the fields say which upload it belongs to. Whatever fails on
the way, nothing of the request remains (`ChunkSteps.fail`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..auth.identities import Identity
from ..auth.owners import owned_id
from ..errors import BadRequest, Forbidden
from ..model import ChunkFields, Committed, CompletedUpload
from ..service.callers import Caller
from ..service.uploads import Prepared, UploadService
from ..storage.store import PendingChunk
from .forms import MAX_FIELD_BYTES, TEXT_FIELDS, ChunkForm
from .multipart import MultipartParser


@dataclass(frozen=True, slots=True)
class ChunkStored:
    """A chunk stored, its upload not complete yet."""

    fields: ChunkFields
    committed: Committed


async def receive_chunk_request(
    uploads: UploadService,
    parser: MultipartParser,
    *,
    content_length: int | None,
    max_total_chunks: int,
    caller: Caller,
) -> ChunkStored | CompletedUpload:
    """`caller`: who sends the chunk. Its file_id is taken in the caller's identity's
    namespace (owners.py), and checked against its token's scope, once the fields are known
    and before a byte is stored in an upload."""
    identity = caller.identity
    form = ChunkForm(max_total_chunks=max_total_chunks)
    prepared: Prepared | None = None
    received: PendingChunk | None = None
    try:
        while (part := await parser.next_part()) is not None:
            if part.name == "chunk":
                if received is not None:
                    raise BadRequest("More than one chunk part in the request")
                if not form.has_required():  # its upload is not known yet: kept aside
                    received = await uploads.chunks.receive_unplaced(
                        parser.body(), want_sha256=form.wants_sha256()
                    )
                    continue
                early = _owned(form.fields(), identity)
                found = await uploads.chunks.prepare(early, content_length, caller=caller)
                if isinstance(found, CompletedUpload):
                    return found
                prepared = found
                early = _as_prepared(early, prepared)
                hint = parser.body_length_if_last(content_length)
                outcome = await uploads.chunks.receive(prepared, early, parser.body(), hint, caller)
                if isinstance(outcome, CompletedUpload):
                    return outcome
                prepared, received = outcome
            elif part.name in TEXT_FIELDS:
                form.set(part.name, await parser.read_text(limit=MAX_FIELD_BYTES))
        fields = _owned(form.fields(), identity)
        if received is None:
            raise BadRequest("Missing required parameter: chunk")
        if prepared is None:
            found = await uploads.chunks.prepare(fields, None, caller=caller)
            if isinstance(found, CompletedUpload):
                return found
            prepared = found
        fields = _as_prepared(fields, prepared)
        owned, received = received, None  # store_chunk owns it from here on
        result = await uploads.chunks.store_chunk(fields, prepared, owned, caller)
    except BaseException:
        await uploads.chunks.fail(prepared, received)
        raise
    if isinstance(result, CompletedUpload):
        return result
    return ChunkStored(fields, result)


def _as_prepared(fields: ChunkFields, prepared: Prepared) -> ChunkFields:
    """The fields under the id of the upload they go into (a pre-create hook may have
    given it another)."""
    if fields.file_id == prepared.meta.file_id:
        return fields
    return dataclasses.replace(fields, file_id=prepared.meta.file_id)


def _owned(fields: ChunkFields, identity: Identity) -> ChunkFields:
    """The fields with the file_id the identity owns (owners.py), within its scope."""
    if identity.scope is not None and not identity.scope.allows_file(fields.file_id):
        raise Forbidden("This token is not for this file_id")
    return dataclasses.replace(fields, file_id=owned_id(identity, fields.file_id))
