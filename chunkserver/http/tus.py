"""tus 1.0.0 under /tus/: its headers parsed and answered, the upload service doing the rest.

Extensions: creation, creation-with-upload, creation-defer-length, termination, expiration,
checksum (sha1, md5, crc32) and concatenation. A tus upload is an upload like any other (the
same store, limits, hooks, expiry and download); only the way its bytes arrive differs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import zlib
from collections.abc import Callable
from email.utils import formatdate
from typing import Any
from urllib.parse import urljoin

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from ..auth.owners import identity_of, owned_id, public_id, upload_id
from ..errors import (
    BadRequest,
    FileNotFound,
    TusChecksumMismatch,
    UnsupportedMediaType,
    UnsupportedTusVersion,
)
from ..model import (
    PARTIAL,
    CompletedUpload,
    Concatenation,
    StreamProgress,
    UploadMeta,
    check_file_id,
)
from ..service.callers import Caller
from .addresses import forwarded_base
from .answers import Error, answer
from .bodyreader import StreamBody, continue_when_read
from .callers import caller_of
from .forms import check_filename, encode_metadata, parse_metadata
from .keys import CONFIG, ERROR_FORM, METHOD_OVERRIDE, RECEIVE_BUFFERS, UPLOADS

TUS_VERSION = "1.0.0"
EXTENSIONS = (
    "creation,creation-with-upload,creation-defer-length,termination,expiration,"
    "checksum,concatenation"
)
OFFSET_CONTENT_TYPE = "application/offset+octet-stream"
PREFIX = "/tus/"
# A creation-with-upload refused for its bytes leaves no upload (a body cut short does: what
# arrived counts, and the client resumes).
# What a browser may read of a tus answer (CORS): every header the protocol answers with.
EXPOSED_HEADERS = (
    "Location, Upload-Offset, Upload-Length, Upload-Defer-Length, Upload-Metadata, "
    "Upload-Expires, Upload-Concat, Tus-Resumable, Tus-Version, Tus-Extension, "
    "Tus-Max-Size, Tus-Checksum-Algorithm"
)


class _Crc32:
    """zlib's CRC-32 (IEEE) with hashlib's two methods; its digest is big-endian, as tusd's."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


CHECKSUMS: dict[str, Callable[[], Any]] = {
    "sha1": hashlib.sha1,
    "md5": hashlib.md5,
    "crc32": _Crc32,
}


class UploadChecksum:
    """`Upload-Checksum: <algorithm> <base64 digest>` of one PATCH's bytes."""

    def __init__(self, header: str) -> None:
        algorithm, _, encoded = header.strip().partition(" ")
        factory = CHECKSUMS.get(algorithm)
        if factory is None:
            raise BadRequest(
                f"Upload-Checksum algorithm {algorithm!r} is not supported "
                f"(Tus-Checksum-Algorithm: {','.join(CHECKSUMS)})"
            )
        try:
            self.expected = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("Upload-Checksum: the digest is not base64") from None
        self.hash = factory()
        if len(self.expected) != len(self.hash.digest()):
            raise BadRequest(
                f"Upload-Checksum: a {algorithm} digest has {len(self.hash.digest())} bytes, "
                f"not {len(self.expected)}"
            )

    def update(self, piece: memoryview) -> None:
        self.hash.update(piece)

    def matches(self) -> bool:
        return bool(self.hash.digest() == self.expected)

    def mismatch(self) -> TusChecksumMismatch:
        return TusChecksumMismatch()


# -- header parsing --


def _check_version(request: web.Request) -> None:
    given = request.headers.get("Tus-Resumable")
    if given != TUS_VERSION:
        raise UnsupportedTusVersion(given or "")


def _non_negative(name: str, text: str | None) -> int | None:
    if text is None:
        return None
    text = text.strip()
    # Any number of digits: a length past Tus-Max-Size is a 413, not a malformed header.
    if not (text.isascii() and text.isdigit()) or len(text) > 100:
        raise BadRequest(f"{name} must be a non-negative integer, got {text[:40]!r}")
    return int(text)


def _partial_ids(request: web.Request, concat: Concatenation) -> list[str]:
    """The file_ids of a final upload's parts: absolute URLs of this server (another
    server's upload cannot be a part of this one) or relative references, resolved against
    the creation's URL (`/tus/<id>`, `<id>`, `../tus/<id>`)."""
    urls = concat.parts
    if not urls:
        raise BadRequest("Upload-Concat: final names no partial upload")
    collection = forwarded_base(request, request.config_dict[CONFIG]) + PREFIX
    ids = []
    for url in urls:
        resolved = urljoin(collection, url)
        if not resolved.startswith(collection):
            raise BadRequest(f"Upload-Concat: {url[:200]!r} is not an upload of this server")
        ids.append(upload_id(request, resolved.removeprefix(collection).rstrip("/")))
    return ids


# -- answers --


def _expires(request: web.Request, last_activity: float) -> str:
    return formatdate(last_activity + request.config_dict[CONFIG].upload_ttl_seconds, usegmt=True)


def _progress_headers(
    request: web.Request, state: StreamProgress | CompletedUpload
) -> dict[str, str]:
    """What a PATCH (or a creation with bytes) answers: the offset, and the expiry while the
    upload is in progress."""
    if isinstance(state, CompletedUpload):
        return {"Upload-Offset": str(state.size)}
    return {
        "Upload-Offset": str(state.offset),
        "Upload-Expires": _expires(request, state.last_activity),
    }


def _state_headers(request: web.Request, found: StreamProgress | CompletedUpload) -> dict[str, str]:
    """What HEAD answers: the progress, the length, metadata and concatenation."""
    headers = _progress_headers(request, found)
    if isinstance(found, CompletedUpload):
        headers["Upload-Length"] = str(found.size)
        if found.concat is not None:
            headers["Upload-Concat"] = _concat_header(found.concat)
        metadata = found.metadata
    else:
        if found.meta.total_size is None:
            headers["Upload-Defer-Length"] = "1"
        else:
            headers["Upload-Length"] = str(found.meta.total_size)
        if found.meta.concat is not None:
            headers["Upload-Concat"] = _concat_header(found.meta.concat)
        metadata = found.meta.metadata
    if metadata:
        headers["Upload-Metadata"] = encode_metadata(metadata)
    return headers


def _concat_header(concat: Concatenation) -> str:
    """Upload-Concat as the creation sent it; a final upload recorded by an earlier version
    by its parts' file ids names their paths."""
    if not concat.by_id:
        return str(concat)
    return "final;" + " ".join(f"{PREFIX}{public_id(owned)}" for owned in concat.parts)


def _concatenation(header: str) -> Concatenation:
    """Upload-Concat as a creation sends it: `partial`, or `final;<url> <url>...`."""
    if header != "partial" and not header.startswith("final;"):
        raise BadRequest("Upload-Concat must be 'partial' or 'final;<urls>'")
    return Concatenation.parse(header)


def _location(request: web.Request, file_id: str) -> str:
    return f"{forwarded_base(request, request.config_dict[CONFIG])}{PREFIX}{file_id}"


def _new_meta(request: web.Request, file_id: str, length: int | None) -> UploadMeta:
    metadata = parse_metadata(request.headers.get("Upload-Metadata"))
    named = (metadata or {}).get("filename") or (metadata or {}).get("name")
    filename = check_filename(named) if named else public_id(file_id)
    return UploadMeta.new_stream(file_id, filename, length, metadata)


# -- handlers --


def _answer(status: int, headers: dict[str, str] | None = None) -> web.Response:
    """A tus answer: every one says the protocol's version (errors too: app.py)."""
    return web.Response(status=status, headers={"Tus-Resumable": TUS_VERSION, **(headers or {})})


async def options(request: web.Request) -> web.Response:
    config = request.config_dict[CONFIG]
    if "file_id" in request.match_info:
        check_file_id(request.match_info["file_id"])
    return _answer(
        204,
        {
            "Tus-Version": TUS_VERSION,
            "Tus-Extension": EXTENSIONS,
            "Tus-Max-Size": str(config.max_file_bytes),
            "Tus-Checksum-Algorithm": ",".join(CHECKSUMS),
        },
    )


async def create(request: web.Request) -> web.Response:
    """POST /tus/: creation, with an upload (creation-with-upload), deferred length, or a
    concatenation (Upload-Concat)."""
    _check_version(request)
    uploads = request.config_dict[UPLOADS]
    caller = _caller(request)
    length = _non_negative("Upload-Length", request.headers.get("Upload-Length"))
    deferred = request.headers.get("Upload-Defer-Length")
    header = request.headers.get("Upload-Concat", "").strip()
    concat = _concatenation(header) if header else None
    public = secrets.token_urlsafe(16)
    file_id = owned_id(identity_of(request), public)
    meta = _new_meta(request, file_id, length)
    if concat is not None and concat.final:
        if length is not None or deferred is not None:
            raise BadRequest("A final upload's length is its partial uploads': no Upload-Length")
        partials = _partial_ids(request, concat)
        meta = UploadMeta.new_stream(file_id, meta.filename, None, meta.metadata, concat)
        done = await uploads.streams.concatenate(meta, partials, caller)
        made = done.file_id if isinstance(done, CompletedUpload) else done.meta.file_id
        headers = {"Location": _location(request, public_id(made))}
        headers |= _state_headers(request, done)
        return _answer(201, headers)
    if length is None and deferred != "1":
        raise BadRequest("Upload-Length or Upload-Defer-Length: 1 is required")
    if length is not None and deferred is not None:
        raise BadRequest("Upload-Length and Upload-Defer-Length exclude each other")
    if concat == PARTIAL:
        meta = UploadMeta.new_stream(file_id, meta.filename, length, meta.metadata, PARTIAL)
    with_body = request.headers.get(hdrs.CONTENT_TYPE) == OFFSET_CONTENT_TYPE
    body_length = request.content_length if with_body else None
    begun = await uploads.streams.create_stream(meta, caller, body_length)
    headers = {"Location": _location(request, public_id(begun.file_id))}
    if with_body or length == 0:  # an empty upload is complete as soon as it exists
        state = await uploads.create_with_bytes(begun, lambda: _append(request, begun.file_id, 0))
        return _answer(201, headers | _progress_headers(request, state))
    headers |= {"Upload-Offset": "0", "Upload-Expires": _expires(request, begun.created_at)}
    return _answer(201, headers)


async def head(request: web.Request) -> web.Response:
    _check_version(request)
    file_id = upload_id(request)
    found = await request.config_dict[UPLOADS].streams.stream_state(file_id, _caller(request))
    if found is None:
        raise FileNotFound()
    headers = _state_headers(request, found) | {hdrs.CACHE_CONTROL: "no-store"}
    return _answer(200, headers)


async def patch(request: web.Request) -> web.Response:
    _check_version(request)
    file_id = upload_id(request)
    if request.headers.get(hdrs.CONTENT_TYPE) != OFFSET_CONTENT_TYPE:
        raise UnsupportedMediaType()
    offset = _non_negative("Upload-Offset", request.headers.get("Upload-Offset"))
    if offset is None:
        raise BadRequest("Upload-Offset is required")
    with request.config_dict[UPLOADS].core.admit():
        state = await _append(request, file_id, offset)
    return _answer(204, _progress_headers(request, state))


async def _append(
    request: web.Request, file_id: str, offset: int
) -> StreamProgress | CompletedUpload:
    # Without Content-Length (chunked transfer coding, as tus-java-client sends every
    # PATCH) the body's length is what arrives.
    length = request.content_length if request.content_length is not None else None
    if length is None and not request.body_exists:
        length = 0
    checksum_header = request.headers.get("Upload-Checksum")
    with StreamBody(
        request,
        request.config_dict[CONFIG].idle_timeout_seconds,
        request.config_dict[RECEIVE_BUFFERS],
    ) as body:
        return await request.config_dict[UPLOADS].streams.append(
            file_id,
            offset,
            body,
            length=length,
            declared_length=_non_negative("Upload-Length", request.headers.get("Upload-Length")),
            checksum=UploadChecksum(checksum_header) if checksum_header else None,
            caller=_caller(request),
        )


async def delete(request: web.Request) -> web.Response:
    """termination: the upload and its bytes are removed, in progress or complete."""
    _check_version(request)
    file_id = upload_id(request)
    if not await request.config_dict[UPLOADS].delete(file_id, _caller(request)):
        raise FileNotFound()
    return _answer(204)


def _caller(request: web.Request) -> Caller:
    return caller_of(request, request.config_dict[CONFIG])


# The methods of each tus route, and what serves them.
COLLECTION_METHODS: dict[str, Handler] = {"OPTIONS": options, "POST": create}
UPLOAD_METHODS: dict[str, Handler] = {
    "OPTIONS": options,
    "HEAD": head,
    "PATCH": patch,
    "DELETE": delete,
}


def _dispatcher(methods: dict[str, Handler]) -> Handler:
    """The route's handler: `X-HTTP-Method-Override`, when sent, wins over the request's
    method, on every tus route (what clients behind a proxy that passes only GET and POST
    send: tus-js-client's overridePatchMethod)."""

    async def dispatch(request: web.Request) -> web.StreamResponse:
        method = request.headers.get("X-HTTP-Method-Override", request.method).strip().upper()
        handler = methods.get(method)
        if handler is None:
            raise web.HTTPMethodNotAllowed(method, sorted(methods))
        return await handler(request)

    return dispatch


def tus_error(
    request: web.Request, status: int, detail: str, error: BaseException | None
) -> web.Response:
    """A tus error: `{"detail": ...}`, saying the protocol's version as every tus answer."""
    response = answer(Error(detail=detail), status)
    response.headers["Tus-Resumable"] = TUS_VERSION
    return response


def tus_app() -> web.Application:
    """The sub-application of /tus/: its routes, its errors, X-HTTP-Method-Override."""
    app = web.Application()
    app[ERROR_FORM] = tus_error
    app[METHOD_OVERRIDE] = True
    # Every method reaches the dispatcher: X-HTTP-Method-Override wins over any of them.
    expect = continue_when_read
    app.router.add_route("*", "/", _dispatcher(COLLECTION_METHODS), expect_handler=expect)
    upload = _dispatcher(UPLOAD_METHODS)
    app.router.add_route("*", "/{file_id}", upload, expect_handler=expect)
    return app
