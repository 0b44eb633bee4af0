"""Reading a request's body: through aiohttp, or straight from the socket into reused buffers.

aiohttp hands a body over as a new `bytes` object per socket read, which its parser copies
again into another `bytes` per body piece: two copies of every byte and a fresh allocation
per piece before chunkserver sees it. For a large body of known length on a plain TCP or
unix connection, `BodyReader` takes the rest of the body off aiohttp once its headers are
parsed: it installs a `BufferedProtocol` of its own on the transport, so that the kernel
copies the socket's bytes straight into a preallocated buffer (`recv_into`, as nginx reads
into its own buffers), and gives the connection back to aiohttp with a fresh request parser
after the body's last byte. Buffers come from a pool kept by the application, so their pages
are touched once per process, not once per request.

A piece returned by `read()` is only valid until the next `read()`: the buffer then fills
again (reading pauses while the consumer holds a piece; the socket's own buffer keeps what
arrives meanwhile). The multipart parser and the local store's writer use each piece before
asking for the next (views of a `bytearray` are written at once, see `local/receive.py`).
The S3 store hands pieces to an HTTP client that may still hold them later, so there every
body is read through aiohttp.

The takeover uses things aiohttp does not document, all behind `aiohttpfence.py`. Before a
process takes any body over, `takeover_proven()` tries it on a socket pair through aiohttp's
own server (a body taken over, then a pipelined request after it); until it has, and when
it fails, every body is read through aiohttp.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import cast

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.web_protocol import RequestHandler

from ..errors import ClientTooSlow
from .aiohttpfence import internals_present, reading_paused, restart_parser

# One piece of a body: a buffer and how many of its first bytes are the piece
# (multipart.ReadFunction returns these).
Piece = tuple[bytes | bytearray, int]

RECEIVE_BUFFER_BYTES = 1024 * 1024
# Bodies shorter than this are read through aiohttp: the takeover's two protocol switches
# and new parser cost more than the copies they save.
TAKEOVER_MIN_BYTES = 256 * 1024
_EMPTY: Piece = (b"", 0)

# How long the takeover's proof may take at start (it takes a few milliseconds).
PROBE_SECONDS = 2.0
# How long the rest of a body answered early is read and dropped, as aiohttp's lingering_time.
LINGER_SECONDS = 10.0


async def continue_when_read(request: web.Request) -> web.StreamResponse | None:
    """Every route's Expect handler. aiohttp's default sends `100 Continue` before the handler
    runs; here `BodyReader` sends it when it starts reading the body, so that a request
    refused from its headers alone (credentials, limits, an unknown upload, a wrong offset)
    gets its final answer without it, and its client never sends the body."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11 and expect.lower() != "100-continue":
        return web.json_response({"detail": f"Unknown Expect: {expect[:60]}"}, status=417)
    return None


async def _send_continue(request: web.Request) -> None:
    """`100 Continue`, when the client waits for it before sending the body."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if request.version == HttpVersion11 and expect.lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the final answer's size is counted from here


class ReceiveBuffers:
    """Buffers lent to body readers and taken back: a process allocates them once. `usable`
    once the takeover is proven with the installed aiohttp (`takeover_proven`)."""

    def __init__(
        self, size: int = RECEIVE_BUFFER_BYTES, keep: int = 8, *, usable: bool = False
    ) -> None:
        self.size = size
        self.usable = usable
        self._keep = keep
        self._free: list[bytearray] = []

    def lend(self) -> bytearray:
        return self._free.pop() if self._free else bytearray(self.size)

    def take_back(self, buffer: bytearray) -> None:
        if len(self._free) < self._keep:
            self._free.append(buffer)


def receive_buffers_for(storage: str) -> ReceiveBuffers | None:
    """The buffers of a process's takeovers (usable once proven), or None to read every
    body through aiohttp: on S3, whose HTTP client may still hold a piece after asking for
    the next, and with an aiohttp without the internals relied on."""
    if storage != "local" or not internals_present():
        return None
    return ReceiveBuffers()


async def takeover_proven() -> bool:
    """Whether taking a body over works with the installed aiohttp: through aiohttp's own
    server on a socket pair, a body of TAKEOVER_MIN_BYTES + 1 is taken over once its handler
    runs, and a request pipelined right after it is parsed and answered. Anything else
    (a wrong answer, an error, no answer within PROBE_SECONDS): False."""
    if not internals_present():
        return False
    size = TAKEOVER_MIN_BYTES + 1
    started = asyncio.Event()
    taken: list[bool] = []

    async def handler(base: web.BaseRequest) -> web.Response:
        started.set()
        total = 0
        request = cast(web.Request, base)  # what BodyReader reads of it, a BaseRequest has
        with BodyReader(request, PROBE_SECONDS, ReceiveBuffers(64 * 1024, 1, usable=True)) as body:
            while (piece := await body.read())[1]:
                total += piece[1]
            taken.append(body.took_over)
        return web.Response(text=str(total))

    server = web.Server(handler)
    ours, theirs = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport: asyncio.BaseTransport | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(PROBE_SECONDS):
            transport, _ = await loop.connect_accepted_socket(server, ours)
            reader, writer = await asyncio.open_connection(sock=theirs)
            head = f"POST /a HTTP/1.1\r\nHost: probe\r\nContent-Length: {size}\r\n\r\n"
            writer.write(head.encode() + b"x")
            await started.wait()  # the handler runs: what follows is taken over
            pipelined = b"GET /b HTTP/1.1\r\nHost: probe\r\nContent-Length: 0\r\n\r\n"
            writer.write(b"x" * (size - 1) + pipelined)
            answers = [await _answer_body(reader), await _answer_body(reader)]
    except (OSError, TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
        if transport is not None:
            transport.close()
        ours.close()
        theirs.close()
        await server.shutdown(0)
    return answers == [str(size).encode(), b"0"] and taken == [True, False]


async def _answer_body(reader: asyncio.StreamReader) -> bytes:
    """The body of the next answer on `reader` (ValueError when it is not a 200)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    if not lines[0].startswith("HTTP/1.1 200"):
        raise ValueError(lines[0])
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return await reader.readexactly(int(fields.get("Content-Length", "0")))


class _Takeover(asyncio.BufferedProtocol):
    """The transport's protocol while the rest of one body arrives."""

    def __init__(
        self,
        handler: RequestHandler,
        transport: asyncio.Transport,
        remaining: int,
        pool: ReceiveBuffers,
    ) -> None:
        self._handler = handler
        self._transport = transport
        self._remaining = remaining  # body bytes still in the socket
        self._pool = pool
        self._buffer = pool.lend()
        self._filled = 0
        self._lent = False  # the consumer holds a piece of the buffer: reading is paused
        self._paused = False
        self._discarding = False  # the reader stopped early: the rest is dropped
        self._waiter: asyncio.Future[None] | None = None
        self._lost: BaseException | None = None
        self._given_back = False
        self._linger: asyncio.TimerHandle | None = None

    # -- the consumer's side --

    async def read(self) -> Piece:
        if self._lent:  # the last piece is done with: the buffer fills again
            self._lent = False
            self._filled = 0
            self._resume()
        while self._filled == 0:
            if self._lost is not None:
                raise self._lost
            if self._given_back:
                return _EMPTY
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        self._lent = True
        self._pause()
        return (self._buffer, self._filled)

    def _pause(self) -> None:
        if not self._paused and not self._given_back:
            self._paused = True
            self._transport.pause_reading()

    def _resume(self) -> None:
        if self._paused and not self._given_back:
            self._paused = False
            self._transport.resume_reading()

    def stop(self) -> None:
        """The reader is done with the body, whole or not; the buffer goes back. Answered
        before the body's end, the rest is read and dropped, as aiohttp lingers: closing
        with unread bytes would reset the connection, and the client could lose the answer.
        """
        if self._given_back or self._lost is not None:
            self._pool.take_back(self._buffer)
            return
        self._discarding = True
        self._filled = 0
        self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._transport.close)
        self._resume()

    # -- the transport's side --

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._discarding:
            return memoryview(self._buffer)[: min(len(self._buffer), self._remaining)]
        end = min(len(self._buffer), self._filled + self._remaining)
        return memoryview(self._buffer)[self._filled : end]

    def buffer_updated(self, nbytes: int) -> None:
        self._remaining -= nbytes
        if not self._discarding:
            self._filled += nbytes
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if self._remaining == 0:
            self._give_back()
        elif not self._discarding and self._filled == len(self._buffer):
            self._pause()

    def _give_back(self) -> None:
        """Hand the connection back to aiohttp, with a parser that starts a new request."""
        handler = self._handler
        self._given_back = True
        restart_parser(handler)
        self._transport.set_protocol(handler)
        if self._discarding:
            self._pool.take_back(self._buffer)
            self._end_linger()

    def _end_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._lost = ConnectionResetError("The client closed the connection mid-body")
        self._end_linger()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._handler.connection_lost(exc)

    def eof_received(self) -> None:
        self._handler.eof_received()

    def pause_writing(self) -> None:
        self._handler.pause_writing()

    def resume_writing(self) -> None:
        self._handler.resume_writing()


class BodyReader:
    """The body of one request as pieces, each with an idle timeout (ClientTooSlow).

    Use as a context manager: on leaving, a takeover still in progress is ended.
    """

    def __init__(
        self, request: web.Request, idle_seconds: float, pool: ReceiveBuffers | None
    ) -> None:
        self._request = request
        self._idle_seconds = idle_seconds
        self._pool = pool
        self._takeover: _Takeover | None = None
        self._started = False
        self.took_over = False  # the body's rest came straight from the socket

    def __enter__(self) -> BodyReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._takeover is not None:
            self._takeover.stop()
            self._takeover = None

    async def read(self) -> Piece:
        try:
            async with asyncio.timeout(self._idle_seconds):
                if not self._started:
                    self._started = True
                    await _send_continue(self._request)
                    first = self._begin()
                    if first is not None and first[1]:
                        return first
                if self._takeover is not None:
                    return await self._takeover.read()
                return await self._read_through_aiohttp()
        except TimeoutError:
            raise ClientTooSlow(self._idle_seconds) from None

    def _begin(self) -> Piece | None:
        """What aiohttp received already, taking the rest of the body over if it may."""
        request = self._request
        content = request.content
        pool = self._pool
        if pool is None or not pool.usable or content.is_eof() or not self._may_take_over():
            return None
        # Draining may let a paused parser feed what it held back: drain until empty.
        pieces = []
        while data := content.read_nowait(-1):
            pieces.append(data)
        first = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        handler = request.protocol
        transport = request.transport
        assert isinstance(handler, RequestHandler) and transport is not None
        remaining = (request.content_length or 0) - content.total_bytes
        if content.is_eof() or reading_paused(handler) or remaining <= 0:
            return (first, len(first))  # the rest, if any, through aiohttp
        content.feed_eof()
        self._takeover = _Takeover(handler, transport, remaining, pool)
        self.took_over = True
        transport.set_protocol(self._takeover)
        return (first, len(first))

    def _may_take_over(self) -> bool:
        request = self._request
        headers = request.headers
        transport = request.transport
        return (
            request.content_length is not None
            and request.content_length >= TAKEOVER_MIN_BYTES
            and hdrs.CONTENT_ENCODING not in headers
            and hdrs.TRANSFER_ENCODING not in headers
            and transport is not None
            and transport.get_protocol() is request.protocol
            and transport.get_extra_info("sslcontext") is None
            and isinstance(request.protocol, RequestHandler)
        )

    async def _read_through_aiohttp(self) -> Piece:
        """`readchunk` hands over one received buffer as it is, where `readany` would join
        all the buffers waiting into a new one: a copy of every byte when the loop lags."""
        content = self._request.content
        while True:
            data, end_of_http_chunk = await content.readchunk()
            # (b"", True) marks the end of a chunked-encoding chunk, and is all that an
            # empty body ever answers (at EOF already: return, do not spin).
            if data or not end_of_http_chunk or content.at_eof():
                return (data, len(data))


class StreamBody:
    """A PATCH's body as pieces (tus, the IETF draft); a client that goes away ends it, the
    reason kept in `cut` (the service commits what arrived, then raises it)."""

    def __init__(
        self, request: web.Request, idle_seconds: float, buffers: ReceiveBuffers | None
    ) -> None:
        self.reader = BodyReader(request, idle_seconds, buffers)
        self.cut: BaseException | None = None

    def __enter__(self) -> StreamBody:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.reader.__exit__(*exc_info)

    async def pieces(self) -> AsyncIterator[memoryview]:
        while True:
            try:
                data, length = await self.reader.read()
            except (ConnectionError, ClientTooSlow, asyncio.CancelledError) as e:
                # Cancelled too (a server that cancels handlers of lost clients).
                self.cut = e
                return
            if not length:
                return
            yield memoryview(data)[:length]
