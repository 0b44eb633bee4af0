"""The HTTP handlers: parse and validate, call the upload service, shape the JSON answer.

No handler builds a path or touches the disk; that is the store's job.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter

from . import openapi
from .addresses import remote_of
from .answers import (
    ChunkUploading,
    Health,
    StatusNotFound,
    answer,
    chunk_completed,
    status_answer,
)
from .bodyreader import BodyReader
from .chunkrequest import receive_chunk_request
from .errors import (
    FileNotFound,
    RangeNotSatisfiable,
    StorageFailure,
)
from .forms import check_file_id
from .keys import CONFIG, RECEIVE_BUFFERS, UPLOADS
from .model import CompletedUpload, StoredObject
from .multipart import MultipartParser, boundary_from_content_type

JSON = "application/json"
STATIC_DIR = Path(__file__).parent / "static"


async def upload_chunk(request: web.Request) -> web.Response:
    with request.app[UPLOADS].admit():
        return await _upload_chunk(request)


async def _upload_chunk(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    boundary = boundary_from_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    with BodyReader(request, config.idle_timeout_seconds, request.app[RECEIVE_BUFFERS]) as body:
        return await _receive_chunk(request, MultipartParser(body.read, boundary))


async def _receive_chunk(request: web.Request, parser: MultipartParser) -> web.Response:
    config = request.app[CONFIG]
    result = await receive_chunk_request(
        request.app[UPLOADS],
        parser,
        content_length=request.content_length,
        max_total_chunks=config.max_total_chunks,
        remote=remote_of(request, config),
    )
    if isinstance(result, CompletedUpload):
        return answer(chunk_completed(result))
    fields = result.fields
    return answer(
        ChunkUploading(
            file_id=fields.file_id,
            filename=fields.filename,
            uploaded_chunks=result.committed.uploaded_chunks,
            total_chunks=fields.total_chunks,
            metadata=result.committed.meta.metadata,
        )
    )


async def upload_status(request: web.Request) -> web.Response:
    file_id = check_file_id(request.match_info["file_id"])
    found = await request.app[UPLOADS].status(file_id)
    if found is None:
        return answer(StatusNotFound(), status=404)
    return answer(status_answer(found))


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def download_file(request: web.Request) -> web.StreamResponse:
    file_id = check_file_id(request.match_info["file_id"])
    found = await request.app[UPLOADS].download(file_id)
    if found is None:
        raise FileNotFound()
    path, record = found
    disposition = content_disposition(record.filename)
    # RFC 9110: a Range the server cannot parse, or several ranges, may be ignored: the
    # whole file, 200.
    whole = usable_range(request.headers.get(hdrs.RANGE), record.size) is None
    if isinstance(path, StoredObject):
        return await stream_object(request, path, disposition, whole=whole)
    prefix = request.app[CONFIG].accel_redirect_prefix
    if prefix:
        # Behind nginx: it sends the file from its internal location, with sendfile and Range.
        location = f"{prefix}{file_id}/{quote(record.filename, safe='')}"
        return web.Response(
            headers={"X-Accel-Redirect": location, hdrs.CONTENT_DISPOSITION: disposition}
        )
    response_type = WholeFileResponse if whole else web.FileResponse
    return response_type(path, headers={hdrs.CONTENT_DISPOSITION: disposition})


class WholeFileResponse(web.FileResponse):
    """A FileResponse that answers the whole file whatever the request's Range says."""

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        headers = {k: v for k, v in request.headers.items() if k.lower() != "range"}
        return await super().prepare(request.clone(headers=headers))


RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def usable_range(header: str | None, size: int) -> str | None:
    """The header when it is one byte range that can be served; None when there is none,
    or it cannot be parsed, or it asks for several ranges (served whole); raises
    RangeNotSatisfiable (416) for a range the file cannot satisfy."""
    if header is None:
        return None
    match = RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if first and last and int(last) < int(first):
        return None  # invalid: ignored, as RFC 9110 allows
    if (first and int(first) >= size) or (not first and int(last) == 0):
        raise RangeNotSatisfiable(size)
    return header


# What a download passes on from the object store's answer.
OBJECT_HEADERS = (hdrs.CONTENT_LENGTH, hdrs.CONTENT_RANGE, hdrs.ETAG, hdrs.LAST_MODIFIED)


async def stream_object(
    request: web.Request, stored: StoredObject, disposition: str, *, whole: bool
) -> web.StreamResponse:
    """A completed file from the object store, streamed through with its Range answer (or
    whole, when the request's Range is to be ignored)."""
    wanted = None if whole else request.headers.get(hdrs.RANGE)
    async with stored.open(wanted) as answer:
        if answer.status == 416:
            return web.Response(status=416, headers={hdrs.CONTENT_RANGE: f"bytes */{stored.size}"})
        if answer.status not in (200, 206):
            raise StorageFailure(f"the object store answered {answer.status} to a download")
        response = web.StreamResponse(status=answer.status)
        for name in OBJECT_HEADERS:
            if name in answer.headers:
                response.headers[name] = answer.headers[name]
        response.headers[hdrs.CONTENT_TYPE] = "application/octet-stream"
        response.headers[hdrs.ACCEPT_RANGES] = "bytes"
        response.headers[hdrs.CONTENT_DISPOSITION] = disposition
        await response.prepare(request)
        if request.method != hdrs.METH_HEAD:
            async for piece in answer.pieces():
                await response.write(piece)
        await response.write_eof()
        return response


async def delete_upload(request: web.Request) -> web.Response:
    file_id = check_file_id(request.match_info["file_id"])
    if not await request.app[UPLOADS].delete(file_id, remote_of(request, request.app[CONFIG])):
        raise FileNotFound()
    return web.Response(status=204)


HEALTH_FAILURES = {
    "data_folder": "The data folder is not writable",
    "object_store": "The object store cannot be reached",
    "database": "The database cannot be reached",
}


async def healthz(request: web.Request) -> web.Response:
    checks = await request.app[UPLOADS].health()
    if all(checks.values()):
        return answer(Health(status="ok"))
    failing = [HEALTH_FAILURES[name] for name, ok in checks.items() if not ok]
    health = Health(
        status="error",
        detail="; ".join(failing),
        checks={name: "ok" if ok else "failing" for name, ok in checks.items()},
    )
    response = answer(health, 503)
    response.headers[hdrs.RETRY_AFTER] = "5"
    return response


async def metrics(request: web.Request) -> web.Response:
    text = await request.app[UPLOADS].render_metrics()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document_bytes(request.app[CONFIG]), content_type=JSON)


STATIC_FILES = {p.name: p for p in STATIC_DIR.iterdir() if p.is_file()}


async def static_file(request: web.Request) -> web.FileResponse:
    """The page's own files, by name only: nothing else can be reached from here."""
    path = STATIC_FILES.get(request.match_info["path"])
    if path is None:
        raise FileNotFound("No such file")
    return web.FileResponse(path)


async def upload_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "index.html")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/upload-chunk", upload_chunk)
    app.router.add_get("/upload-status/{file_id}", upload_status)
    app.router.add_get("/files/{file_id}", download_file)
    app.router.add_delete("/uploads/{file_id}", delete_upload)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/", upload_page)
    app.router.add_get("/static/{path}", static_file)
