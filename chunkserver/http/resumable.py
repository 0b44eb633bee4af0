"""Resumable Uploads for HTTP (draft-ietf-httpbis-resumable-upload) under /resumable/.

`POST /resumable/` creates an upload (with or without bytes), `HEAD` gives its offset,
`PATCH` (`application/partial-upload`) appends at it, `DELETE` cancels. The upload is a byte
stream like a tus upload: the same service verbs and store, limits, hooks, expiry and
download; only the headers differ. `Upload-Draft-Interop-Version` selects the revision's
rules (interop.py); errors are problem details (RFC 9457) with the draft's problem types.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import re
import secrets
import time
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.typedefs import Handler

from ..auth.owners import identity_of, owned_id, public_id, upload_id
from ..config import Config
from ..errors import (
    BadRequest,
    ChunkServerError,
    DigestMismatch,
    FileNotFound,
    InconsistentLength,
    OffsetMismatch,
    UnsupportedMediaType,
    UploadAlreadyComplete,
)
from ..model import IETF, CompletedUpload, StoredObject, StreamProgress, UploadMeta
from ..service.callers import Caller
from .addresses import forwarded_base, from_proxy
from .aiohttpfence import write_interim
from .answers import answer, status_answer
from .bodyreader import StreamBody, continue_when_read
from .callers import caller_of
from .digests import DigestCheck, field_value, sha256_of_field
from .forms import check_filename, parse_metadata
from .interop import Interop, interop_of, structured_integer
from .keys import CONFIG, ERROR_FORM, IN_FLIGHT, RECEIVE_BUFFERS, UPLOADS

PREFIX = "/resumable/"
PARTIAL_UPLOAD = "application/partial-upload"
PROBLEM_TYPES = "https://iana.org/assignments/http-problem-types#"
# A creation refused for its bytes leaves no upload (a body cut short does: what arrived
# counts, and the client resumes).
EXPOSED_HEADERS = (
    "Upload-Complete, Upload-Incomplete, Upload-Limit, Upload-Draft-Interop-Version, "
    "Repr-Digest, Accept-Patch"
)


# -- requests --


def _declared_length(request: web.Request, complete: bool, offset: int) -> int | None:
    """The upload's length as this request tells it: `Upload-Length`, or where a completing
    request's content ends; both, when given, must agree."""
    header = structured_integer(request.headers.get("Upload-Length"))
    content_end = None
    if complete and request.content_length is not None:
        content_end = offset + request.content_length
    if header is not None and content_end is not None and header != content_end:
        raise InconsistentLength(
            f"Upload-Length {header} differs from the end of this request's content "
            f"({content_end}), which completes the upload"
        )
    return header if header is not None else content_end


def _has_content(request: web.Request) -> bool:
    if request.content_length is not None:
        return request.content_length > 0
    return request.body_exists  # chunked transfer coding


def _filename(request: web.Request, metadata: dict[str, str] | None, file_id: str) -> str:
    """`Content-Disposition`'s filename (the draft's way), else Upload-Metadata's (what
    tus-js-client sends), else the file_id."""
    named = _disposition_filename(request.headers.get(hdrs.CONTENT_DISPOSITION, ""))
    named = named or (metadata or {}).get("filename") or (metadata or {}).get("name")
    return check_filename(named) if named else file_id


EXTENDED_FILENAME = re.compile(r"""filename\*\s*=\s*([\w!#$%&+^`{}~-]+)'[^']*'([^;\s]+)""", re.I)
PLAIN_FILENAME = re.compile(r"""filename\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]+))""", re.I)


def _disposition_filename(disposition: str) -> str | None:
    """RFC 6266: `filename*` (RFC 8187, percent-encoded in its charset) wins over
    `filename`."""
    extended = EXTENDED_FILENAME.search(disposition)
    if extended is not None:
        try:
            return unquote(extended.group(2), encoding=extended.group(1), errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise BadRequest("Content-Disposition: filename* cannot be decoded") from None
    plain = PLAIN_FILENAME.search(disposition)
    if plain is None:
        return None
    if plain.group(1) is not None:
        return re.sub(r"\\(.)", r"\1", plain.group(1))
    return plain.group(2)


def _digests(request: web.Request, whole: bool) -> DigestCheck | None:
    """What this request's bytes are checked against: Content-Digest always; Repr-Digest
    when they are the whole representation (Repr-Digest on a later request is checked once
    the upload is complete, by `_check_representation`)."""
    expected = {}
    content = sha256_of_field("Content-Digest", request.headers.get("Content-Digest"))
    if content is not None:
        expected["Content-Digest"] = content
    representation = sha256_of_field("Repr-Digest", request.headers.get("Repr-Digest"))
    if representation is not None and whole:
        expected["Repr-Digest"] = representation
    return DigestCheck(expected) if expected else None


# -- answers --


def _limits(config: Config, state: StreamProgress | CompletedUpload | None = None) -> str:
    """Upload-Limit: the largest upload, and an upload in progress's remaining lifetime."""
    limits = f"max-size={config.max_file_bytes}"
    if isinstance(state, StreamProgress):
        remaining = state.last_activity + config.upload_ttl_seconds - time.time()
        limits += f", max-age={max(0, int(remaining))}"
    return limits


def _state_headers(
    request: web.Request, interop: Interop, state: StreamProgress | CompletedUpload
) -> dict[str, str]:
    complete = isinstance(state, CompletedUpload)
    headers = interop.complete_header(complete) | interop.echo()
    if isinstance(state, CompletedUpload):
        headers |= {"Upload-Offset": str(state.size), "Upload-Length": str(state.size)}
        if state.sha256 is not None:
            headers["Repr-Digest"] = field_value(bytes.fromhex(state.sha256))
    else:
        headers["Upload-Offset"] = str(state.offset)
        if state.meta.total_size is not None:
            headers["Upload-Length"] = str(state.meta.total_size)
    headers["Upload-Limit"] = _limits(request.config_dict[CONFIG], state)
    return headers


def _result(
    request: web.Request,
    interop: Interop,
    state: StreamProgress | CompletedUpload,
    status_in_progress: int,
    extra: dict[str, str] | None = None,
) -> web.Response:
    """A creation's or an append's final answer: the completed upload as JSON (what
    /upload-status answers), or the progress (201 or 204) with no content."""
    headers = _state_headers(request, interop, state) | (extra or {})
    if isinstance(state, CompletedUpload):
        return answer(status_answer(state), headers=headers)
    return web.Response(status=status_in_progress, headers=headers)


def _location(request: web.Request, file_id: str) -> str:
    return f"{forwarded_base(request, request.config_dict[CONFIG])}{PREFIX}{file_id}"


def _send_interim(request: web.Request, interop: Interop, headers: dict[str, str]) -> None:
    """104 (Upload Resumption Supported) before the final answer, on HTTP/1.1 when the
    client named a served interop version (the draft forbids it otherwise), and not to a
    trusted proxy: nginx would take it for the final answer."""
    transport = request.transport
    if not interop.sends_interim or request.version < HttpVersion11 or transport is None:
        return
    if from_proxy(request, request.config_dict[CONFIG]):
        return
    write_interim(request, "104 Upload Resumption Supported", headers | interop.echo())


def problem_response(
    request: web.Request, status: int, detail: str, error: BaseException | None
) -> web.Response:
    """An error on /resumable/: problem details (RFC 9457), with the draft's problem types
    for a mismatching offset, an inconsistent length and a completed upload; a 413 says the
    limits (Upload-Limit), as the draft asks."""
    headers = dict(error.headers) if isinstance(error, ChunkServerError) else {}
    if status == 413:
        headers["Upload-Limit"] = _limits(request.config_dict[CONFIG])
    body: dict[str, object] = {"type": "about:blank"}
    if isinstance(error, OffsetMismatch):
        body = {
            "type": PROBLEM_TYPES + "mismatching-upload-offset",
            "expected-offset": error.stored,
            "provided-offset": error.given,
        }
    elif isinstance(error, InconsistentLength):
        body = {"type": PROBLEM_TYPES + "inconsistent-upload-length"}
    elif isinstance(error, UploadAlreadyComplete):
        status = 400
        body = {"type": PROBLEM_TYPES + "completed-upload"}
    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    body |= {"title": title, "status": status, "detail": detail}
    return web.Response(
        body=json.dumps(body).encode(),
        status=status,
        content_type="application/problem+json",
        headers={"Upload-Complete": "?0", **headers},
    )


# -- handlers --


async def options(request: web.Request) -> web.Response:
    """The limits of an upload created here (the draft's OPTIONS on the creation resource)."""
    return web.Response(
        status=204,
        headers={
            "Upload-Limit": _limits(request.config_dict[CONFIG]),
            "Accept-Patch": PARTIAL_UPLOAD,
            hdrs.ALLOW: ", ".join(ROOT),
        },
    )


async def create(request: web.Request) -> web.Response:
    """POST /resumable/: an upload created, then its first bytes appended when it has some
    (or completed at once when `Upload-Complete: ?1`)."""
    interop = interop_of(request)
    uploads = request.config_dict[UPLOADS]
    complete = interop.complete_flag(request)
    if complete is None:
        raise BadRequest(f"{interop.complete_name} is required to create an upload")
    length = _declared_length(request, complete, 0)
    digests = _digests(request, whole=complete)  # malformed: refused before any upload
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    public = secrets.token_urlsafe(16)
    file_id = owned_id(identity_of(request), public)
    meta = UploadMeta.new_stream(
        file_id, _filename(request, metadata, public), length, metadata, protocol=IETF
    )
    representation = sha256_of_field("Repr-Digest", request.headers.get("Repr-Digest"))
    if representation is not None:  # kept with the upload, checked when it completes
        meta = dataclasses.replace(meta, repr_sha256=representation.hex())
    begun = await uploads.streams.create_stream(meta, _caller(request), request.content_length)
    file_id = begun.file_id  # the pre-create hook may have given it another
    location = {"Location": _location(request, public_id(file_id))}
    _send_interim(
        request, interop, location | {"Upload-Limit": _limits(request.config_dict[CONFIG])}
    )
    if not (complete or _has_content(request)):
        progress = StreamProgress(begun, 0, 0, begun.created_at)
        return _result(request, interop, progress, 201, location)
    state = await uploads.create_with_bytes(
        begun, lambda: _append(request, interop, file_id, 0, complete, length, digests)
    )
    return _result(request, interop, state, 201, location)


async def append(request: web.Request) -> web.Response:
    """PATCH /resumable/<file_id>: bytes at the upload's offset."""
    interop = interop_of(request)
    file_id = upload_id(request)
    media_type = request.headers.get(hdrs.CONTENT_TYPE, "").partition(";")[0].strip().lower()
    if interop.requires_media_type and media_type != PARTIAL_UPLOAD:
        raise UnsupportedMediaType(f"An append must have Content-Type: {PARTIAL_UPLOAD}")
    offset = structured_integer(request.headers.get("Upload-Offset"))
    if offset is None:
        raise BadRequest("Upload-Offset (a non-negative integer) is required")
    complete = interop.complete_flag(request)
    if complete is None:
        raise BadRequest(f"{interop.complete_name} is required on an append")
    length = _declared_length(request, complete, offset)
    digests = _digests(request, whole=offset == 0 and complete)
    representation = sha256_of_field("Repr-Digest", request.headers.get("Repr-Digest"))
    if representation is not None:  # kept with the upload, checked when it completes
        await request.config_dict[UPLOADS].streams.keep_digest(file_id, representation.hex())
    with request.config_dict[UPLOADS].core.admit():
        state = await _append(request, interop, file_id, offset, complete, length, digests)
    return _result(request, interop, state, 204)


async def _append(
    request: web.Request,
    interop: Interop,
    file_id: str,
    offset: int,
    complete: bool,
    length: int | None,
    digests: DigestCheck | None,
) -> StreamProgress | CompletedUpload:
    uploads = request.config_dict[UPLOADS]
    content_length = request.content_length
    if content_length is None and not request.body_exists:
        content_length = 0
    in_flight = request.config_dict[IN_FLIGHT]
    await in_flight.cut_earlier(file_id, request.transport)
    with (
        in_flight.track(file_id, request.transport),
        StreamBody(
            request,
            request.config_dict[CONFIG].idle_timeout_seconds,
            request.config_dict[RECEIVE_BUFFERS],
        ) as body,
    ):
        state = await uploads.streams.append(
            file_id,
            offset,
            body,
            length=content_length,
            declared_length=length,
            checksum=digests,
            caller=_caller(request),
            complete=interop.completion(complete),
        )
    if isinstance(state, CompletedUpload):
        await _check_representation(request, state, streamed=offset == 0 and complete)
    return state


async def _check_representation(
    request: web.Request, record: CompletedUpload, *, streamed: bool
) -> None:
    """The Repr-Digests of a completed upload (kept from an earlier request, or on this
    one) against the whole file's sha-256, read back once; `streamed` when this request's
    was checked as its bytes passed (it carried them all). A mismatch removes the upload
    (resuming cannot mend it)."""
    sent = sha256_of_field("Repr-Digest", request.headers.get("Repr-Digest"))
    expected = {sent} if sent is not None and not streamed else set()
    if record.repr_sha256 is not None and bytes.fromhex(record.repr_sha256) != sent:
        expected.add(bytes.fromhex(record.repr_sha256))
    if not expected:
        return
    if record.sha256 is not None:
        actual = bytes.fromhex(record.sha256)
    else:
        actual = await _sha256_of_file(request, record.file_id)
    if expected != {actual}:
        await request.config_dict[UPLOADS].delete(record.file_id, _caller(request))
        raise DigestMismatch(
            "Repr-Digest sha-256 does not match the completed upload's bytes; it was removed"
        )


async def _sha256_of_file(request: web.Request, file_id: str) -> bytes:
    found = await request.config_dict[UPLOADS].download(file_id)
    if found is None:
        raise FileNotFound()
    where, _ = found
    if isinstance(where, StoredObject):
        digest = hashlib.sha256()
        async with where.open(None) as answer:
            async for piece in answer.pieces():
                digest.update(piece)
        return digest.digest()
    return await asyncio.to_thread(_sha256_of_path, where)


def _sha256_of_path(path: Path) -> bytes:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


async def head(request: web.Request) -> web.Response:
    """Offset retrieval (HEAD, or GET as the draft allows): 204 with the upload's state."""
    interop = interop_of(request)
    file_id = upload_id(request)
    await request.config_dict[IN_FLIGHT].cut_earlier(file_id, request.transport)
    found = await request.config_dict[UPLOADS].streams.stream_state(file_id, _caller(request))
    if found is None:
        raise FileNotFound("No upload of this id")
    headers = _state_headers(request, interop, found) | {hdrs.CACHE_CONTROL: "no-store"}
    return web.Response(status=204, headers=headers)


async def cancel(request: web.Request) -> web.Response:
    interop_of(request)
    file_id = upload_id(request)
    await request.config_dict[IN_FLIGHT].cut_earlier(file_id, request.transport)
    if not await request.config_dict[UPLOADS].delete(file_id, _caller(request)):
        raise FileNotFound("No upload of this id")
    return web.Response(status=204)


def _caller(request: web.Request) -> Caller:
    return caller_of(request, request.config_dict[CONFIG])


ROOT: dict[str, Handler] = {"OPTIONS": options, "POST": create}
UPLOAD_METHODS: dict[str, Handler] = {
    "HEAD": head,
    "GET": head,
    "PATCH": append,
    "DELETE": cancel,
}


def resumable_app() -> web.Application:
    """The sub-application of /resumable/: its routes, and problem details for its errors."""
    app = web.Application()
    app[ERROR_FORM] = problem_response
    for method, handler in ROOT.items():
        app.router.add_route(method, "/", handler, expect_handler=continue_when_read)
    for method, handler in UPLOAD_METHODS.items():
        app.router.add_route(method, "/{file_id}", handler, expect_handler=continue_when_read)
    return app
