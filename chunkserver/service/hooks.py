"""Hooks: the server POSTs JSON events to the application's `hook_url` (docs/integration.md).

Blocking events are asked, and their answer decides: `pre-create` (2xx admits, and may
change the upload's file_id, metadata or owner), `pre-finish` (2xx's JSON object reaches the
client under "app"), `pre-access` (off by default; 2xx kept for `hook_access_cache_seconds`);
a 4xx refuses with the receiver's status and detail, anything else 503.
The post-events (`post-create`, `post-receive`, `post-finish`, `post-terminate`,
`post-expire`) go through the store's outbox (outbox.py) and are delivered at least once, by
one process, retried with exponential backoff and full jitter until the receiver answers 2xx,
across restarts and crashes. Every event has an `id` that stays the same on every retry, for
the receiver to drop duplicates, and carries the request that caused it (callers.py).
A post-receive answer `{"stop": true}` stops its upload (`on_stop`).
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
from dataclasses import dataclass
from typing import Any

import aiohttp

from ..auth.owners import public_id
from ..backoff import jittered_delay
from ..config import Config
from ..errors import HookRefused, HookUnavailable, StoreUnavailable
from ..logs import ThrottledLog
from ..metrics import Metrics
from ..model import CompletedUpload, UploadMeta, check_file_id
from ..storage.outbox import Outbox, Pending
from .callers import NO_CALLER, Caller

log = logging.getLogger("chunkserver")

RETRY_BASE_SECONDS = 1.0
RETRY_CAP_SECONDS = 300.0
IDLE_POLL_SECONDS = 1.0  # how often a process looks for due events when not woken
CLAIM_BATCH = 16
WAIT_FOR_COMPLETION_SECONDS = 1.0  # a post-finish whose upload is still completing
# Uploads a process remembers, at most, for the post-receive throttle and pre-access answers.
UPLOADS_REMEMBERED = 10_000
BLOCKING_EVENTS = frozenset({"pre-create", "pre-finish", "pre-access"})

Lookup = Callable[[str], Awaitable[CompletedUpload | UploadMeta | None]]
BodyOf = Callable[[UploadMeta | CompletedUpload], dict[str, Any]]
OnStop = Callable[[str, str, str], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CreateChanges:
    """What a pre-create answer may change of a new upload; None where it changes nothing."""

    file_id: str | None = None
    metadata: dict[str, str] | None = None
    identity: str | None = None


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
    if upload.is_partial:  # a part of a tus concatenation, not a file of its own
        body["partial"] = True
    # Whose upload it is (null: the anonymous identity's), also in events no request caused.
    body["identity"] = upload.owner or None
    return body | {"storage": storage, "location": location}


def finish_event_id(file_id: str, token: str) -> str:
    """The one id of an upload's post-finish event, whoever queues it (see `Hooks`)."""
    return f"post-finish-{file_id}-{token}"


def owned_id_of_finish(event_id: str) -> str:
    """The owned id (owners.py) of the upload a post-finish event's id names; the event's
    body says the client's file_id."""
    return event_id.removeprefix("post-finish-").rsplit("-", 1)[0]


def progress_event_id(file_id: str, token: str, period: float) -> str:
    """A post-receive's id: the same for every process within one period of an upload, so
    that the outbox keeps one (several processes or hosts receive one upload's bytes)."""
    if period <= 0:
        return f"post-receive-{file_id}-{token}-{uuid.uuid4().hex}"
    return f"post-receive-{file_id}-{token}-{int(time.time() // period)}"


def upload_of_progress(event_id: str) -> tuple[str, str]:
    """The owned id and token of the upload a post-receive event's id names."""
    file_id, token, _ = event_id.removeprefix("post-receive-").rsplit("-", 2)
    return file_id, token


def new_event(
    kind: str, upload: dict[str, Any], caller: Caller | None, event_id: str | None = None
) -> dict[str, Any]:
    now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    return {
        "id": event_id or uuid.uuid4().hex,
        "type": kind,
        "time": now.replace("+00:00", "Z"),
        "upload": upload,
        "request": (caller or NO_CALLER).as_event(),
    }


class Hooks:
    def __init__(self, config: Config, metrics: Metrics, outages: ThrottledLog) -> None:
        self.url = config.hook_url
        self.events = frozenset(config.hook_events) if config.hook_url else frozenset()
        self.timeout = config.hook_timeout_seconds
        self.progress_seconds = config.hook_progress_seconds
        self.access_seconds = config.hook_access_cache_seconds
        self.metrics = metrics
        self.outages = outages
        self.outbox: Outbox | None = None
        # For a post-finish queued before its completion: the upload as it is now, and the
        # body an event gives of it (set by the service); what stops an upload.
        self.lookup: Lookup | None = None
        self.body_of: BodyOf | None = None
        self.on_stop: OnStop | None = None
        self._progress_sent: dict[str, float] = {}  # file_id: when its last post-receive was
        self._access: dict[tuple[str, str, str], float] = {}  # (file_id, token, identity): until
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def wants(self, kind: str) -> bool:
        return kind in self.events

    async def start(self, outbox: Outbox, lookup: Lookup, body_of: BodyOf, on_stop: OnStop) -> None:
        self.outbox, self.lookup, self.body_of, self.on_stop = outbox, lookup, body_of, on_stop
        if not self.url:
            return
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        if self.events - BLOCKING_EVENTS:
            self._task = asyncio.create_task(self._deliver_forever())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._session is not None:
            await self._session.close()

    # -- blocking events: asked, and their answer decides --

    async def _ask(
        self, kind: str, upload: UploadMeta | CompletedUpload, caller: Caller | None
    ) -> Any:
        """The receiver's 2xx answer, as JSON (None when it is not); HookRefused for a 4xx,
        HookUnavailable for anything else."""
        assert self._session is not None and self.body_of is not None
        event = new_event(kind, self.body_of(upload), caller)
        try:
            async with self._session.post(self.url, json=event) as answer:
                text = await answer.text()
                status = answer.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise HookUnavailable(f"{type(e).__name__} {e}".strip()) from None
        if 400 <= status < 500:
            raise HookRefused(status, _detail_of(text, status))
        if not 200 <= status < 300:
            raise HookUnavailable(f"it answered {status}")
        try:
            return json.loads(text) if text.strip() else None
        except ValueError:
            return None

    async def pre_create(self, upload: UploadMeta, caller: Caller | None) -> CreateChanges | None:
        if not self.wants("pre-create"):
            return None
        return _changes_of(await self._ask("pre-create", upload, caller))

    async def pre_finish(self, upload: UploadMeta, caller: Caller | None) -> dict[str, Any] | None:
        """The application's JSON object for the completed answer (None: none)."""
        if not self.wants("pre-finish"):
            return None
        answer = await self._ask("pre-finish", upload, caller)
        return answer if isinstance(answer, dict) else None

    async def pre_access(self, upload: UploadMeta | CompletedUpload, caller: Caller) -> None:
        """Ask before a request on an existing upload; a 2xx is kept for a while, per upload
        and identity."""
        if not self.wants("pre-access"):
            return
        key = (upload.file_id, upload.token, caller.identity.name)
        now = time.monotonic()
        if self._access.get(key, 0.0) > now:
            return
        await self._ask("pre-access", upload, caller)
        if len(self._access) >= UPLOADS_REMEMBERED:
            self._access = {k: t for k, t in self._access.items() if t > now}
            if len(self._access) >= UPLOADS_REMEMBERED:
                self._access.clear()
        self._access[key] = now + self.access_seconds

    # -- post-events: through the outbox --

    async def emit(
        self,
        kind: str,
        upload: UploadMeta | CompletedUpload,
        caller: Caller | None,
        event_id: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Queue an event for delivery (kept until the receiver takes it). An event of an id
        already queued is not queued again. Nothing is built when the event is not wanted."""
        if not self.wants(kind) or self.outbox is None:
            return
        assert self.body_of is not None
        body = self.body_of(upload) | (extra or {})
        await self.outbox.add(new_event(kind, body, caller, event_id))
        self._wake.set()

    async def progress(
        self, meta: UploadMeta, caller: Caller | None, received: dict[str, int]
    ) -> None:
        """post-receive: at most one per upload per `hook_progress_seconds` (per process; the
        event's id makes it one across processes within a period). `received` says how far
        the upload is (tus and the draft: its offset; the seed: its chunks stored)."""
        if not self.wants("post-receive"):
            return
        now = time.monotonic()
        last = self._progress_sent.get(meta.file_id)
        if last is not None and now - last < self.progress_seconds:
            return
        if len(self._progress_sent) >= UPLOADS_REMEMBERED:
            self._progress_sent.clear()
        self._progress_sent[meta.file_id] = now
        event_id = progress_event_id(meta.file_id, meta.token, self.progress_seconds)
        await self.emit("post-receive", meta, caller, event_id, received)

    def forget(self, file_id: str) -> None:
        """An upload ended: its post-receive throttle goes (its cached pre-access answers
        name its token, so a new upload of the same id is asked again)."""
        self._progress_sent.pop(file_id, None)

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
            found = await self._finished_upload(pending)
            if found is None:
                return
            event = {**event, "upload": found}
        try:
            async with self._session.post(self.url, json=event) as answer:
                text = await answer.text()
                ok = 200 <= answer.status < 300
        except (aiohttp.ClientError, TimeoutError, OSError):
            ok = False
        if ok:
            if event["type"] == "post-receive":
                await self._stop_if_asked(event["id"], text)
            await self.outbox.delivered(pending)
            self.metrics.inc("hooks_delivered")
            return
        self.metrics.inc("hooks_retried")
        await self.outbox.retry_at(pending, time.time() + retry_delay(pending.attempts))

    async def _finished_upload(self, pending: Pending) -> dict[str, Any] | None:
        """A post-finish queued before its completion, so that a crash between the two loses
        nothing, is sent once the upload is complete, with what the completion says of it:
        its body then; None when it is not to be sent now (put off, or dropped)."""
        assert self.outbox is not None and self.lookup is not None and self.body_of is not None
        event_id = pending.event["id"]
        found = await self.lookup(owned_id_of_finish(event_id))
        if isinstance(found, UploadMeta) and found.token in event_id:
            wait = WAIT_FOR_COMPLETION_SECONDS
            if pending.attempts >= 30:  # not completing soon: back off like a failure
                wait = retry_delay(pending.attempts - 30)
            await self.outbox.retry_at(pending, time.time() + wait)
            return None
        if not isinstance(found, CompletedUpload) or found.token not in event_id:
            await self.outbox.delivered(pending)  # removed before completing: no event
            return None
        return self.body_of(found)

    async def _stop_if_asked(self, event_id: str, text: str) -> None:
        """A post-receive answered `{"stop": true, "detail": "..."}`: the upload's next
        requests are refused with that detail."""
        with contextlib.suppress(ValueError):
            answer = json.loads(text)
            if isinstance(answer, dict) and answer.get("stop") is True:
                assert self.on_stop is not None
                file_id, token = upload_of_progress(event_id)
                detail = answer.get("detail")
                if not isinstance(detail, str) or not detail:
                    detail = "The upload was stopped by the application"
                await self.on_stop(file_id, token, detail)


def _changes_of(answer: Any) -> CreateChanges | None:
    """A pre-create answer's changes; HookUnavailable when it says them wrongly (the
    application's mistake: the upload waits, as for a receiver that is down)."""
    if not isinstance(answer, dict):
        return None
    file_id, metadata, identity = (answer.get(k) for k in ("file_id", "metadata", "identity"))
    if file_id is not None:
        try:
            check_file_id(file_id if isinstance(file_id, str) else "")
        except Exception:
            raise HookUnavailable(f"its file_id {file_id!r} is not a valid file_id") from None
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise HookUnavailable("its metadata is not an object of strings")
    if identity is not None and not isinstance(identity, str):
        raise HookUnavailable("its identity is not a string")
    if file_id is None and metadata is None and identity is None:
        return None
    return CreateChanges(file_id, metadata, identity)


def _detail_of(text: str, status: int) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        detail = json.loads(text).get("detail")
        if isinstance(detail, str) and detail:
            return detail
    return text.strip()[:500] or f"Refused by the upload hook ({status})"
