"""Log lines that a flood must not multiply: an outage of the database or the object store,
or a client sending bad requests, gives one WARNING line per kind and interval, not one per
request, and never a traceback for what is not the server's fault."""

from __future__ import annotations

import logging
import time

from aiohttp.http_exceptions import HttpProcessingError

THROTTLE_SECONDS = 30.0


class ThrottledLog:
    """At most one line per key every `interval` seconds; the next line says how many were
    left out meanwhile."""

    def __init__(self, logger: logging.Logger, interval: float = THROTTLE_SECONDS) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def warning(self, key: str, message: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            message += f" ({left_out} more like it in the last {now - last:.0f} s)"  # type: ignore[operator]
        self.logger.warning(message)


class MalformedRequests(logging.Filter):
    """On aiohttp's server logger: a request that HTTP itself refuses (a NUL in a header, a
    bad request line) is the client's fault, answered 400 by aiohttp. Instead of an ERROR
    with a traceback per request, one WARNING line per THROTTLE_SECONDS says what it was."""

    def __init__(self, throttled: ThrottledLog) -> None:
        super().__init__()
        self.throttled = throttled

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if not isinstance(error, HttpProcessingError):
            return True
        reason = " ".join(str(error.message).split())[:200]
        where = record.getMessage().replace("Error handling request", "A malformed request")
        self.throttled.warning("malformed", f"{where} was refused (400): {reason}")
        return False
