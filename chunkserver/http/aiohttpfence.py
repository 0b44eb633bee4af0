"""The fence around aiohttp: every use of what aiohttp does not document, in one module.

Supported: aiohttp >= 3.14.4, < 3.15 (pyproject.toml); `.ci/run` runs the body reader's tests
against the lowest and the highest release of that range, and `bodyreader.takeover_proven()`
tries a taken-over body and a pipelined request after it on a socket pair, through aiohttp's
own server, before any body is taken over. What is relied on, and why:

- `RequestHandler._reading_paused`: a parser whose reading is paused may hold bytes it has
  not fed yet; a body is then not taken over (`reading_paused`).
- `RequestHandler._parser`: after a taken-over body, the handler gets a new request parser,
  which starts at the next request (`restart_parser`): the old one still waits for the body.
- The parser's arguments, as `RequestHandler.__init__` gives them in 3.14: the handler's
  `_read_bufsize`, `max_line_size`, `max_field_size` and `max_headers` (the configured
  limits), `payload_exception=RequestPayloadError`, `auto_decompress` (the server's: aiohttp's
  default, True, which `server.py` keeps) and `web_protocol.MAX_MSG_QUEUE_SIZE` (its
  pipelining limit). Releases before 3.14.4 kept other internals (no `_read_bufsize`; a
  pause for the message queue of its own): they are outside the range.
- Interim answers: aiohttp sends only `100 Continue` by itself; the draft's `104 Upload
  Resumption Supported` is written on the transport before the final answer
  (`write_interim`), as aiohttp writes its 100.
"""

from __future__ import annotations

import asyncio

from aiohttp import web, web_protocol
from aiohttp.http_parser import HttpRequestParser
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

# The server's, as aiohttp's AppRunner defaults it (server.py does not change it).
AUTO_DECOMPRESS = True
_HANDLER_INTERNALS = ("_parser", "_reading_paused", "_read_bufsize")
_HANDLER_LIMITS = ("max_line_size", "max_field_size", "max_headers")


def internals_present() -> bool:
    """Whether this aiohttp has the names the takeover uses (its behaviour is proven apart:
    bodyreader.takeover_proven)."""
    slots = getattr(RequestHandler, "__slots__", ())
    return (
        hasattr(web_protocol, "MAX_MSG_QUEUE_SIZE")
        and all(hasattr(RequestHandler, name) for name in _HANDLER_INTERNALS)
        and all(name in slots for name in _HANDLER_LIMITS)
    )


def reading_paused(handler: RequestHandler) -> bool:
    paused: bool = handler._reading_paused
    return paused


def restart_parser(handler: RequestHandler) -> None:
    """Give the handler a new request parser, built as the installed aiohttp builds its own."""
    handler._parser = HttpRequestParser(
        handler,
        asyncio.get_running_loop(),
        handler._read_bufsize,
        max_line_size=handler.max_line_size,
        max_field_size=handler.max_field_size,
        max_headers=handler.max_headers,
        payload_exception=RequestPayloadError,
        auto_decompress=AUTO_DECOMPRESS,
        max_msg_queue_size=web_protocol.MAX_MSG_QUEUE_SIZE,
    )


def write_interim(request: web.Request, status_line: str, headers: dict[str, str]) -> None:
    """An interim (1xx) answer before the final one, written on the transport."""
    transport = request.transport
    if transport is None:
        return
    lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    transport.write(f"HTTP/1.1 {status_line}\r\n{lines}\r\n".encode("latin-1"))
