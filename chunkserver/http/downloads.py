"""GET /files/{file_id}: a completed file, with Range and conditional requests (RFC 9110).

From the local disk through aiohttp's `FileResponse` (the kernel's sendfile), or through
nginx's X-Accel-Redirect; from an object store streamed through. aiohttp reads `If-Range`
only as a date, so an entity tag is compared here first, strongly (a weak tag never
matches): on a mismatch the Range is dropped and the whole file answered, never a range of
another representation (a file deleted and uploaded again under the same id).
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from urllib.parse import quote

from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.helpers import parse_http_date

from ..auth.owners import upload_id
from ..errors import FileNotFound, RangeNotSatisfiable, StorageFailure
from ..model import StoredObject
from .callers import caller_of
from .keys import CONFIG, UPLOADS

RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# What a download passes on from the object store's answer.
OBJECT_HEADERS = (hdrs.CONTENT_LENGTH, hdrs.CONTENT_RANGE, hdrs.ETAG, hdrs.LAST_MODIFIED)


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = filename.encode("ascii", "replace").decode().replace('"', "_").replace("?", "_")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


async def download_file(request: web.Request) -> web.StreamResponse:
    file_id = upload_id(request)
    found = await request.config_dict[UPLOADS].download(
        file_id, caller_of(request, request.config_dict[CONFIG])
    )
    if found is None:
        raise FileNotFound()
    path, record = found
    disposition = content_disposition(record.filename)
    # RFC 9110: a Range the server cannot parse, or several ranges, may be ignored: the
    # whole file, 200.
    whole = usable_range(request.headers.get(hdrs.RANGE), record.size) is None
    if isinstance(path, StoredObject):
        return await stream_object(request, path, disposition, whole=whole)
    prefix = request.config_dict[CONFIG].accel_redirect_prefix
    if prefix:
        # Behind nginx: it sends the file from its internal location, with sendfile, Range
        # and If-Range (entity tags compared strongly).
        location = f"{prefix}{file_id}/{quote(record.filename, safe='')}"
        return web.Response(
            headers={"X-Accel-Redirect": location, hdrs.CONTENT_DISPOSITION: disposition}
        )
    return FileDownload(path, whole=whole, headers={hdrs.CONTENT_DISPOSITION: disposition})


class FileDownload(web.FileResponse):
    """aiohttp's FileResponse, its Range dropped when it is to be ignored (`whole`) or when
    an If-Range entity tag does not match the file's."""

    def __init__(self, path: Path, *, whole: bool, headers: dict[str, str]) -> None:
        super().__init__(path, headers=headers)
        self.path = path
        self.whole = whole

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if not self.whole and hdrs.RANGE in request.headers:
            if_range = request.headers.get(hdrs.IF_RANGE)
            if if_range is not None and is_entity_tag(if_range):
                st = await asyncio.to_thread(os.stat, self.path)
                # The ETag FileResponse sends for this stat.
                self.whole = not tag_matches(if_range, f'"{st.st_mtime_ns:x}-{st.st_size:x}"')
        if self.whole:
            headers = {k: v for k, v in request.headers.items() if k.lower() != "range"}
            request = request.clone(headers=headers)
        return await super().prepare(request)


def is_entity_tag(validator: str) -> bool:
    return validator.strip().startswith(('"', "W/"))


def tag_matches(validator: str, etag: str | None) -> bool:
    """RFC 9110's strong comparison: both tags strong and the same characters."""
    validator = validator.strip()
    return etag is not None and not validator.startswith("W/") and validator == etag.strip()


def if_range_holds(validator: str, etag: str | None, last_modified: str | None) -> bool:
    """Whether a Range with this If-Range is to be served: the entity tag matches strongly,
    or the representation is not newer than the date (as aiohttp judges a date)."""
    if is_entity_tag(validator):
        return tag_matches(validator, etag)
    date, modified = parse_http_date(validator), parse_http_date(last_modified)
    return date is not None and modified is not None and modified <= date


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


async def stream_object(
    request: web.Request, stored: StoredObject, disposition: str, *, whole: bool
) -> web.StreamResponse:
    """A completed file from the object store, streamed through with its Range answer (or
    whole, when the request's Range is to be ignored or its If-Range does not hold: the
    object is then asked for again, whole)."""
    wanted = None if whole else request.headers.get(hdrs.RANGE)
    async with stored.open(wanted) as answer:
        if_range = request.headers.get(hdrs.IF_RANGE)
        if wanted is not None and if_range is not None and answer.status == 206:
            validators = answer.headers.get(hdrs.ETAG), answer.headers.get(hdrs.LAST_MODIFIED)
            if not if_range_holds(if_range, *validators):
                return await stream_object(request, stored, disposition, whole=True)
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
