"""The HTTP handlers: parse and validate, call the upload service, shape the JSON answer.

No handler builds a path or touches the disk; that is the store's job.
"""

from __future__ import annotations

import logging
from pathlib import Path

from aiohttp import hdrs, web

from ..auth.owners import public_id, upload_id
from ..errors import ChunkServerError, FileNotFound, InternalFailure
from ..model import CompletedUpload
from . import openapi
from .answers import (
    ChunkUploading,
    Health,
    StatusNotFound,
    answer,
    chunk_completed,
    status_answer,
)
from .bodyreader import BodyReader, continue_when_read
from .callers import caller_of
from .chunkrequest import receive_chunk_request
from .downloads import download_file
from .keys import CONFIG, RECEIVE_BUFFERS, UPLOADS
from .multipart import MultipartParser, boundary_from_content_type

log = logging.getLogger("chunkserver")

JSON = "application/json"
STATIC_DIR = Path(__file__).parent / "static"


UPLOAD_CHUNK_ROUTE = "upload-chunk"  # its refusals are counted (chunks_rejected)


async def upload_chunk(request: web.Request) -> web.Response:
    with request.config_dict[UPLOADS].core.admit():
        try:
            return await _upload_chunk(request)
        except (ChunkServerError, web.HTTPException, ConnectionResetError):
            raise
        except Exception as e:
            log.exception("Unexpected error on %s %s", request.method, request.path)
            raise InternalFailure("Chunk upload failed: internal error") from e


async def _upload_chunk(request: web.Request) -> web.Response:
    config = request.config_dict[CONFIG]
    boundary = boundary_from_content_type(request.headers.get(hdrs.CONTENT_TYPE, ""))
    request.config_dict[UPLOADS].core.policy.check_request_length(request.content_length)
    with BodyReader(
        request, config.idle_timeout_seconds, request.config_dict[RECEIVE_BUFFERS]
    ) as body:
        return await _receive_chunk(request, MultipartParser(body.read, boundary))


async def _receive_chunk(request: web.Request, parser: MultipartParser) -> web.Response:
    config = request.config_dict[CONFIG]
    result = await receive_chunk_request(
        request.config_dict[UPLOADS],
        parser,
        content_length=request.content_length,
        max_total_chunks=config.max_total_chunks,
        caller=caller_of(request, config),
    )
    if isinstance(result, CompletedUpload):
        return answer(chunk_completed(result))
    fields = result.fields
    return answer(
        ChunkUploading(
            file_id=public_id(fields.file_id),
            filename=fields.filename,
            uploaded_chunks=result.committed.uploaded_chunks,
            total_chunks=fields.total_chunks,
            metadata=result.committed.meta.metadata,
        )
    )


async def upload_status(request: web.Request) -> web.Response:
    file_id = upload_id(request)
    found = await request.config_dict[UPLOADS].status(
        file_id, caller_of(request, request.config_dict[CONFIG])
    )
    if found is None:
        return answer(StatusNotFound(), status=404)
    return answer(status_answer(found))


async def delete_upload(request: web.Request) -> web.Response:
    file_id = upload_id(request)
    if not await request.config_dict[UPLOADS].delete(
        file_id, caller_of(request, request.config_dict[CONFIG])
    ):
        raise FileNotFound()
    return web.Response(status=204)


HEALTH_FAILURES = {
    "data_folder": "The data folder is not writable",
    "object_store": "The object store cannot be reached",
    "database": "The database cannot be reached",
}


async def healthz(request: web.Request) -> web.Response:
    checks = await request.config_dict[UPLOADS].health()
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
    text = await request.config_dict[UPLOADS].render_metrics()
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(body=openapi.document_bytes(request.config_dict[CONFIG]), content_type=JSON)


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
    app.router.add_post(
        "/upload-chunk", upload_chunk, expect_handler=continue_when_read, name=UPLOAD_CHUNK_ROUTE
    )
    app.router.add_get("/upload-status/{file_id}", upload_status)
    app.router.add_get("/files/{file_id}", download_file)
    app.router.add_delete("/uploads/{file_id}", delete_upload)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi_document)
    app.router.add_get("/", upload_page)
    app.router.add_get("/static/{path}", static_file)
