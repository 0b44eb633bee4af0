"""The IETF draft's appends this process is receiving, by upload.

A client that lost its connection mid-append resumes with HEAD and PATCH at once, while the
server may not have seen the old connection go (that takes up to `idle_timeout_seconds`).
The draft recommends cutting the earlier request: a new request to the same upload aborts the
older append's connection, waits for what it received to be committed, then goes on, so the
offset it reads is current and accepted. Within one process only: an append received by
another process or host is refused (409 or 423) until it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

CUT_WAIT_SECONDS = 10.0  # at most this long for the cut append to commit what it received


@dataclass(slots=True)
class _Append:
    transport: asyncio.BaseTransport
    done: asyncio.Event = field(default_factory=asyncio.Event)


class InFlightAppends:
    def __init__(self) -> None:
        self._appends: dict[str, _Append] = {}

    @contextlib.contextmanager
    def track(self, file_id: str, transport: asyncio.BaseTransport | None) -> Iterator[None]:
        """Mark an append to `file_id` in flight on `transport` while the block runs."""
        if transport is None:
            yield
            return
        append = _Append(transport)
        self._appends[file_id] = append
        try:
            yield
        finally:
            append.done.set()
            if self._appends.get(file_id) is append:
                del self._appends[file_id]

    async def cut_earlier(self, file_id: str, transport: asyncio.BaseTransport | None) -> None:
        """Abort the connection of an append to `file_id` in flight on another connection,
        and wait until it has committed what it received."""
        earlier = self._appends.get(file_id)
        if earlier is None or earlier.transport is transport:
            return
        if isinstance(earlier.transport, asyncio.Transport):
            earlier.transport.abort()
        else:
            earlier.transport.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CUT_WAIT_SECONDS):
                await earlier.done.wait()
