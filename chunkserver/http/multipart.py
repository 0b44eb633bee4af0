"""A streaming multipart/form-data reader over large buffers, with no copy of part bodies.

aiohttp's `BodyPartReader.read_chunk` costs 2.5 to 3 times the CPU of reading the raw body on
this kind of machine, so this module parses the framing itself: it searches each buffer the
socket hands over for the boundary with `bytes.find` and yields the body as `memoryview` slices
of those same buffers. A boundary split across two reads is found by keeping back the short
tail of a buffer that could start one; only that tail (never a whole buffer, except in that
rare case) is ever joined to the next read.

The parser knows nothing of HTTP: it is given an async `read` function that returns the next
piece of the body as a buffer and the length of its first bytes that are the piece ((b"", 0)
at the end), and raises `MalformedMultipart` for a body that breaks the framing. A buffer may
be reused by `read` once the next piece is asked for (bodyreader.py): the few bytes kept over
are copied first. Limits are keyword-only arguments.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.message import Message

from ..errors import BadRequest

ReadFunction = Callable[[], Awaitable[tuple[bytes | bytearray, int]]]

_CRLF = b"\r\n"
_HEADERS_END = b"\r\n\r\n"


class MalformedMultipart(BadRequest):
    """The request body is not valid multipart/form-data."""


# What clients send (`multipart/form-data; boundary=...`, quoted or not); anything else goes
# through the email package's parser, which costs about 20 us more per request.
_SIMPLE_CONTENT_TYPE = re.compile(
    r"multipart/form-data;\s*boundary="
    r"""(?:"([0-9A-Za-z'()+_,./:=?-]{1,70})"|([0-9A-Za-z'+_.-]{1,70}))""",
    re.I,
)


def boundary_from_content_type(content_type: str) -> bytes:
    """Return the boundary of a `multipart/form-data` Content-Type, or raise BadRequest."""
    simple = _SIMPLE_CONTENT_TYPE.fullmatch(content_type)
    if simple is not None:
        return (simple[1] or simple[2]).encode("ascii")
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        raise BadRequest("Request must be multipart/form-data")
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 200:
        raise BadRequest("Request must be multipart/form-data with a boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError:
        raise BadRequest("The multipart boundary must be ASCII") from None


@dataclass(slots=True)
class PartHeaders:
    name: str
    filename: str | None
    content_type: str | None


# What browsers and HTTP clients send for form fields and files; anything else (escapes,
# RFC 2231 extended parameters, other spacing) goes through the email package's parser.
_SIMPLE_DISPOSITION = re.compile(r'form-data; name="([^"\\%]*)"(?:; filename="([^"\\%]*)")?', re.I)


def parse_part_headers(block: bytes | bytearray) -> PartHeaders:
    """Parse the header block of one part (without its final blank line)."""
    headers: list[tuple[str, str]] = []
    for line in block.split(_CRLF):
        if not line:
            continue
        key, sep, value = line.decode("utf-8", "replace").partition(":")
        if not sep:
            raise MalformedMultipart("Malformed multipart part header")
        headers.append((key.strip(), value.strip()))
    disposition = content_type = None
    for key, value in headers:
        lowered = key.lower()
        if lowered == "content-disposition" and disposition is None:
            disposition = value
        elif lowered == "content-type" and content_type is None:
            content_type = value
    if disposition is None:
        raise MalformedMultipart("A multipart part has no Content-Disposition header")
    simple = _SIMPLE_DISPOSITION.fullmatch(disposition)
    # Content-Type's `name` parameter can stand in for the filename: leave that to email.
    if simple is not None and (content_type is None or "name" not in content_type.lower()):
        filename = simple[2].strip() if simple[2] is not None else None  # as email does
        return PartHeaders(name=simple[1], filename=filename, content_type=content_type)
    return _parse_with_email(headers, content_type)


def _parse_with_email(headers: list[tuple[str, str]], content_type: str | None) -> PartHeaders:
    message = Message()
    for key, value in headers:
        message[key] = value
    name = message.get_param("name", header="content-disposition")
    filename = message.get_filename()
    if not isinstance(name, str):
        raise MalformedMultipart("A multipart part has no name")
    return PartHeaders(name=name, filename=filename, content_type=content_type)


class MultipartParser:
    """Reads parts one after another: `next_part()`, then `body()` or `read_text()`.

    A part whose body was not read, or only partly, is skipped by the next `next_part()`.
    """

    def __init__(
        self, read: ReadFunction, boundary: bytes, *, max_header_bytes: int = 16 * 1024
    ) -> None:
        self._read = read
        self._dash_boundary = b"--" + boundary
        self._delimiter = _CRLF + self._dash_boundary
        self._max_header_bytes = max_header_bytes
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._end = 0  # the buffer's bytes past this are not the body's
        self._in_body = False
        self._finished = False
        self._started = False
        self._read_total = 0  # bytes of the body read so far

    async def _fill(self) -> None:
        """Append the next read to the unconsumed bytes; raise at a premature end."""
        # Only a few bytes are left over here (a header block in progress, or a tail that
        # could start the boundary): copied before `read` may reuse their buffer.
        left = bytes(self._buf[self._pos : self._end]) if self._pos < self._end else b""
        more, length = await self._read()
        if not length:
            raise MalformedMultipart("Request body ended before the closing multipart boundary")
        self._read_total += length
        if left:
            self._buf = left + more[:length]  # short or rare, as said above
            self._end = len(self._buf)
        else:
            self._buf, self._end = more, length
        self._pos = 0

    async def _skip_preamble(self) -> None:
        """Consume everything up to and including the first boundary."""
        while True:
            if self._buf.startswith(self._dash_boundary, self._pos, self._end):
                self._pos += len(self._dash_boundary)
                return
            idx = self._buf.find(self._delimiter, self._pos, self._end)
            if idx >= 0:
                self._pos = idx + len(self._delimiter)
                return
            if self._end - self._pos > self._max_header_bytes:
                raise MalformedMultipart("No multipart boundary found at the start of the body")
            await self._fill()

    async def next_part(self) -> PartHeaders | None:
        """Advance to the next part and return its headers, or None after the last part."""
        if self._finished:
            return None
        if not self._started:
            self._started = True
            await self._skip_preamble()
        elif self._in_body:
            async for _ in self.body():
                pass
        # Just past a boundary: "--" closes the body, otherwise CRLF and the headers follow.
        while self._end - self._pos < 2:
            await self._fill()
        if self._buf.startswith(b"--", self._pos, self._end):
            self._finished = True
            return None
        while True:
            end = self._buf.find(_HEADERS_END, self._pos, self._end)
            if end >= 0:
                break
            if self._end - self._pos > self._max_header_bytes:
                raise MalformedMultipart("Multipart part headers are too large")
            await self._fill()
        line_end = self._buf.find(_CRLF, self._pos, self._end)
        if self._buf[self._pos : line_end].strip(b" \t"):
            raise MalformedMultipart("Unexpected bytes after a multipart boundary")
        block = self._buf[line_end + 2 : end]
        self._pos = end + len(_HEADERS_END)
        self._in_body = True
        return parse_part_headers(block)

    def body_length_if_last(self, content_length: int | None) -> int | None:
        """The current part's length if only the closing boundary follows it (as every
        common client sends a file part last), from the body's Content-Length."""
        if content_length is None or not self._in_body:
            return None
        consumed = self._read_total - (self._end - self._pos)
        remaining = content_length - consumed - len(self._delimiter) - len(b"--\r\n")
        return remaining if remaining >= 0 else None

    async def body(self) -> AsyncIterator[memoryview]:
        """Yield the current part's body as views of the received buffers, in order."""
        delimiter = self._delimiter
        keep_back = len(delimiter) - 1
        while self._in_body:
            buf, pos, end = self._buf, self._pos, self._end
            idx = buf.find(delimiter, pos, end)
            if idx >= 0:
                self._pos = idx + len(delimiter)
                self._in_body = False
                if idx > pos:
                    yield memoryview(buf)[pos:idx]
                return
            # No whole delimiter here; one may begin in the last `keep_back` bytes, and it
            # can only begin at a CR. Everything before the earliest such CR is body.
            safe_end = end
            cr = buf.find(b"\r", max(pos, end - keep_back), end)
            while cr >= 0:
                if delimiter.startswith(buf[cr:end]):
                    safe_end = cr
                    break
                cr = buf.find(b"\r", cr + 1, end)
            self._pos = safe_end
            if safe_end > pos:
                yield memoryview(buf)[pos:safe_end]
            await self._fill()

    async def read_text(self, *, limit: int) -> str:
        """Read the current part whole as UTF-8 text of at most `limit` bytes."""
        end = self._buf.find(self._delimiter, self._pos, self._end)
        if self._in_body and 0 <= end - self._pos <= limit:  # all here already: the usual case
            text = self._buf[self._pos : end]
            self._pos = end + len(self._delimiter)
            self._in_body = False
            return _utf8(text)
        data = bytearray()
        async for piece in self.body():
            data += piece
            if len(data) > limit:
                raise BadRequest(f"A form field is longer than {limit} bytes")
        return _utf8(data)


def _utf8(data: bytes | bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("A form field is not valid UTF-8") from None
