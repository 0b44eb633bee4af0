"""Log lines that a flood must not multiply: an outage of the database or the object store,
or a client sending bad requests, gives one WARNING line per kind and interval, not one per
request, and never a traceback for what is not the server's fault."""

from __future__ import annotations

import logging
import time

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
