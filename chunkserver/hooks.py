"""Hooks: the server POSTs JSON events to the application's `hook_url` (PROTOCOL.md,
"Hooks").

`pre-create` is asked before the first chunk of a new upload is accepted, and its answer
decides: 2xx admits, 4xx refuses with the receiver's status and detail, anything else 503.
The post-events (`post-finish`, `post-terminate`, `post-expire`) go through the store's
outbox (outbox.py) and are delivered at least once, by one process, retried with exponential
backoff and full jitter until the receiver answers 2xx, across restarts and crashes. Every
event has an `id` that stays the same on every retry, for the receiver to drop duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from .backoff import jittered_delay
from .config import Config
from .errors import HookRefused, HookUnavailable, StoreUnavailable
from .logs import ThrottledLog
from .metrics import Metrics
from .model import CompletedUpload, UploadMeta
from .outbox import Outbox, Pending
from .owners import public_id

log = logging.getLogger("chunkserver")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
IDLE_POLL_SECONDS = 1.0  # how often a process looks for due events when not woken
CLAIM_BATCH = 16
WAIT_FOR_COMPLETION_SECONDS = 1.0  # a post-finish whose upload is still completing


def retry_delay(attempts: int) -> float:
    """Exponential backoff with full jitter, at least a tenth of a second."""
    delay = jittered_delay(
        attempts, base=RETRY_BASE_SECONDS, cap=RETRY_CAP_SECONDS, least_fraction=0.0
    )
    return max(0.1, delay)


def upload_body(
    upload: UploadMeta | CompletedUpload, *, storage: str, location: str
) -> dict[str, Any]:
    """What an event says of its upload."""
    body: dict[str, Any] = {
        "file_id": public_id(upload.file_id),
        "filename": upload.filename,
        "total_chunks": upload.total_chunks,
    }
    if isinstance(upload, CompletedUpload):
        body |= {"size": upload.size, "crc64nvme": upload.crc64nvme}
        if upload.sha256 is not None:
            body["sha256"] = upload.sha256
    elif upload.total_size is not None:
        body["size"] = upload.total_size
    if upload.metadata is not None:
        body["metadata"] = upload.metadata
    if upload.concat == "partial":  # a part of a tus concatenation, not a file of its own
        body["partial"] = True
    return body | {"storage": storage, "location": location}


def finish_event_id(file_id: str, token: str) -> str:
    """The one id of an upload's post-finish event, whoever queues it (see `Hooks`)."""
    return f"post-finish-{file_id}-{token}"


def owned_id_of_finish(event_id: str) -> str:
    """The owned id (owners.py) of the upload a post-finish event's id names; the event's
    body says the client's file_id."""
    return event_id.removeprefix("post-finish-").rsplit("-", 1)[0]


def new_event(
    kind: str, upload: dict[str, Any], remote: str | None, event_id: str | None = None
) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {
        "id": event_id or uuid.uuid4().hex,
        "type": kind,
        "time": now.replace("+00:00", "Z"),
        "upload": upload,
        "request": {"remote": remote},
    }


class Hooks:
    def __init__(self, config: Config, metrics: Metrics, outages: ThrottledLog) -> None:
        self.url = config.hook_url
        self.events = frozenset(config.hook_events) if config.hook_url else frozenset()
        self.timeout = config.hook_timeout_seconds
        self.metrics = metrics
        self.outages = outages
        self.outbox: Outbox | None = None
        # For a post-finish queued before its completion: the upload as it is now, and the
        # body an event gives of it (set by the service).
        self.lookup: Callable[[str], Awaitable[CompletedUpload | UploadMeta | None]] | None = None
        self.body_of: Callable[[UploadMeta | CompletedUpload], dict[str, Any]] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def wants(self, kind: str) -> bool:
        return kind in self.events

    async def start(
        self,
        outbox: Outbox,
        lookup: Callable[[str], Awaitable[CompletedUpload | UploadMeta | None]],
        body_of: Callable[[UploadMeta | CompletedUpload], dict[str, Any]],
    ) -> None:
        self.outbox, self.lookup, self.body_of = outbox, lookup, body_of
        if not self.url:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self._task = asyncio.create_task(self._deliver_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    # -- pre-create: asked, and its answer decides --

    async def pre_create(self, upload: UploadMeta, remote: str | None) -> None:
        if not self.wants("pre-create"):
            return
        assert self._session is not None and self.body_of is not None
        event = new_event("pre-create", self.body_of(upload), remote)
        try:
            async with self._session.post(self.url, json=event) as answer:
                text = await answer.text()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise HookUnavailable(f"{type(e).__name__} {e}".strip()) from None
        if 200 <= status < 300:
            return
        if 400 <= status < 500:
            raise HookRefused(status, _detail_of(text, status))
        raise HookUnavailable(f"it answered {status}")

    # -- post-events: through the outbox --

    async def emit(
        self,
        kind: str,
        upload: UploadMeta | CompletedUpload,
        remote: str | None,
        event_id: str | None = None,
    ) -> None:
        """Queue an event for delivery (kept until the receiver takes it). An event of an id
        already queued is not queued again. Nothing is built when the event is not wanted."""
        if not self.wants(kind) or self.outbox is None:
            return
        assert self.body_of is not None
        await self.outbox.add(new_event(kind, self.body_of(upload), remote, event_id))
        self._wake.set()

    async def _deliver_forever(self) -> None:
        while True:
            try:
                await self._deliver_due()
            except StoreUnavailable as e:  # the outbox's database: one line per outage
                self.outages.warning(e.component, f"Hook delivery waits: {e.detail}")
            except Exception:
                log.exception("Hook delivery failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_POLL_SECONDS):
                    await self._wake.wait()
            self._wake.clear()

    async def _deliver_due(self) -> None:
        assert self.outbox is not None
        while pending := await self.outbox.claim_due(CLAIM_BATCH):
            await asyncio.gather(*(self._deliver(p) for p in pending))

    async def _deliver(self, pending: Pending) -> None:
        assert self.outbox is not None and self._session is not None
        event = pending.event
        if event["type"] == "post-finish" and "crc64nvme" not in event["upload"]:
            # Queued before its completion, so that a crash between the two loses nothing:
            # sent once the upload is complete, with what the completion says of it.
            assert self.lookup is not None and self.body_of is not None
            found = await self.lookup(owned_id_of_finish(event["id"]))
            if isinstance(found, UploadMeta) and found.token in event["id"]:
                wait = WAIT_FOR_COMPLETION_SECONDS
                if pending.attempts >= 30:  # not completing soon: back off like a failure
                    wait = retry_delay(pending.attempts - 30)
                await self.outbox.retry_at(pending, time.time() + wait)
                return
            if not isinstance(found, CompletedUpload) or found.token not in event["id"]:
                await self.outbox.delivered(pending)  # removed before completing: no event
                return
            event = {**event, "upload": self.body_of(found)}
        try:
            async with self._session.post(self.url, json=event) as answer:
                await answer.read()
                ok = 200 <= answer.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            await self.outbox.delivered(pending)
            self.metrics.inc("hooks_delivered")
            return
        self.metrics.inc("hooks_retried")
        await self.outbox.retry_at(pending, time.time() + retry_delay(pending.attempts))


def _detail_of(text: str, status: int) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        detail = json.loads(text).get("detail")
        if isinstance(detail, str) and detail:
            return detail
    return text.strip()[:500] or f"Refused by the upload hook ({status})"
