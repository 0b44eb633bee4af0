"""Hooks an application can build on, against a real receiver, both backends: every event
carries the request (method, path, identity, the headers allowed); pre-create changes an
upload's file_id, metadata and owner; post-create; post-receive throttled, and its answer
stops an upload; pre-finish's answer reaches the client, its refusal keeps the bytes;
pre-access refuses and is cached."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from chunkserver import Config
from chunkserver.auth.identities import IDENTITY, Identity
from chunkserver.config import HOOK_EVENTS
from chunkserver.http.app import access_logger_for

from .conftest import ClientFactory, chunk_form
from .reference import metric_value
from .test_hooks import Receiver, receiver, wait_for

BOTH_BACKENDS = True
IDENTITIES = {"auth_identities": (("alice", "tok-alice"), ("bob", "tok-bob"))}
ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}
V = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
# Every event but the sweep's and pre-access (asked only of existing uploads, and cached).
ALL_EVENTS = tuple(e for e in HOOK_EVENTS if e not in ("post-expire", "pre-access"))

__all__ = ["receiver"]  # the fixture, used by name


def hooked(receiver: Receiver, *events: str, **more: Any) -> dict[str, Any]:
    return {"hook_url": receiver.url, "hook_events": events or ALL_EVENTS, **IDENTITIES, **more}


async def tus_create(client: Any, length: int, headers: dict[str, str] = ALICE) -> str:
    resp = await client.post("/tus/", headers={**V, **headers, "Upload-Length": str(length)})
    assert resp.status == 201, await resp.text()
    return str(resp.headers["Location"].rsplit("/", 1)[1])


async def tus_patch(client: Any, file_id: str, offset: int, data: bytes) -> Any:
    headers = {**V, **ALICE, **OCTETS, "Upload-Offset": str(offset)}
    return await client.patch(f"/tus/{file_id}", data=data, headers=headers)


async def test_every_event_carries_the_request(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(
        **hooked(receiver, hook_request_headers=("X-App-User", "Authorization"))
    )
    headers = {**ALICE, "X-App-User": "42", "X-Not-Listed": "secret"}
    for index, data in enumerate((b"ab", b"c")):
        resp = await client.post(
            "/upload-chunk", data=chunk_form("doc", index, 2, data), headers=headers
        )
        assert resp.status == 200
    await wait_for(receiver, "post-finish", 1)  # sent once the upload is found complete
    assert (await client.delete("/uploads/doc", headers=headers)).status == 204
    expected = {
        "method": "POST",
        "path": "/upload-chunk",
        "identity": "alice",
        "headers": {"X-App-User": "42", "Authorization": "Bearer tok-alice"},
    }
    for kind in ("pre-create", "post-create", "post-receive", "pre-finish", "post-finish"):
        events = await wait_for(receiver, kind, 1)
        assert len(events) == 1, (kind, [e["type"] for e in receiver.events])
        [event] = events
        assert event["upload"]["file_id"] == "doc"
        assert {k: event["request"][k] for k in expected} == expected, kind
        assert event["request"]["remote"]
    [terminated] = await wait_for(receiver, "post-terminate", 1)
    assert terminated["request"]["method"] == "DELETE"
    assert terminated["request"]["path"] == "/uploads/doc"
    assert terminated["request"]["identity"] == "alice"
    # post-receive says how far the upload is; a header not listed is never sent
    [progress] = receiver.of("post-receive")
    assert progress["upload"]["uploaded_chunks"] == 1
    assert all("X-Not-Listed" not in e["request"]["headers"] for e in receiver.events)
    # without hook_request_headers, no header at all (Authorization neither)
    plain = await make_client(**hooked(receiver, "pre-create"))
    assert (
        await plain.post("/upload-chunk", data=chunk_form("p", 0, 2, b"a"), headers=headers)
    ).status == 200
    assert receiver.of("pre-create")[-1]["request"]["headers"] == {}


async def test_pre_create_changes_the_file_id_metadata_and_owner(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    def rename(event: dict[str, Any]) -> tuple[int, Any]:
        file_id = event["upload"]["file_id"]
        if file_id.startswith("give-"):
            return 200, {"identity": "bob"}
        return 200, {"file_id": f"app-{file_id}", "metadata": {"plan": "pro", "user": "7"}}

    receiver.answers["pre-create"] = rename
    client = await make_client(**hooked(receiver, "pre-create", "post-finish"))
    # the seed's protocol: every chunk of the client's id goes to the application's id
    meta = '{"user": "1", "kept": "yes"}'
    first = await client.post(
        "/upload-chunk", data=chunk_form("mine", 0, 2, b"ab", metadata=meta), headers=ALICE
    )
    assert (await first.json())["file_id"] == "app-mine"
    done = await client.post(
        "/upload-chunk", data=chunk_form("mine", 1, 2, b"c", metadata=meta), headers=ALICE
    )
    body = await done.json()
    assert body["status"] == "completed" and body["file_id"] == "app-mine"
    assert body["metadata"] == {"user": "7", "kept": "yes", "plan": "pro"}
    assert await (await client.get("/files/app-mine", headers=ALICE)).read() == b"abc"
    assert (await client.get("/upload-status/mine", headers=ALICE)).status == 404
    [finished] = await wait_for(receiver, "post-finish", 1)
    assert finished["upload"]["file_id"] == "app-mine"
    # tus: the Location names the application's id
    tus_id = await tus_create(client, 3)
    assert tus_id.startswith("app-")
    assert (await tus_patch(client, tus_id, 0, b"xyz")).status == 204
    assert await (await client.get(f"/files/{tus_id}", headers=ALICE)).read() == b"xyz"
    # another owner: the upload is bob's, not alice's
    form = chunk_form("give-it", 0, 1, b"gift")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert (await client.get("/files/give-it", headers=ALICE)).status == 404
    assert await (await client.get("/files/give-it", headers=BOB)).read() == b"gift"


async def test_events_no_request_caused_say_whose_upload_it_was(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(
        **hooked(receiver, "post-expire"), upload_ttl_seconds=0.5, sweep_interval_seconds=0.3
    )
    form = chunk_form("idle", 0, 2, b"a")
    assert (await client.post("/upload-chunk", data=form, headers=BOB)).status == 200
    [expired] = await wait_for(receiver, "post-expire", 1)
    assert expired["upload"]["file_id"] == "idle" and expired["upload"]["identity"] == "bob"
    nobody = {"remote": None, "method": None, "path": None, "identity": None, "headers": {}}
    assert expired["request"] == nobody


@pytest.mark.local_only  # the service's rule: the backend plays no part
async def test_a_pre_create_answer_that_is_not_valid_refuses_with_503(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    receiver.answers["pre-create"] = lambda event: (200, {"file_id": "../etc"})
    client = await make_client(**hooked(receiver, "pre-create"))
    resp = await client.post("/upload-chunk", data=chunk_form("x", 0, 1, b"a"), headers=ALICE)
    assert resp.status == 503 and "file_id" in (await resp.json())["detail"]
    assert (await client.get("/upload-status/x", headers=ALICE)).status == 404


@pytest.mark.local_only  # the service's rule: the backend plays no part
async def test_post_receive_is_throttled_per_upload(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    client = await make_client(**hooked(receiver, "post-receive", hook_progress_seconds=60))
    tus_id = await tus_create(client, 9)
    for offset in (0, 3, 6):
        assert (await tus_patch(client, tus_id, offset, b"abc")).status == 204
    await asyncio.sleep(1.5)  # every event queued has been delivered by now
    [event] = receiver.of("post-receive")
    assert event["upload"]["file_id"] == tus_id and event["upload"]["offset"] == 3
    assert event["request"]["method"] == "PATCH"


async def test_a_post_receive_answer_stops_the_upload(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    receiver.answers["post-receive"] = lambda event: (
        200,
        {"stop": True, "detail": "Over your plan's storage"},
    )
    client = await make_client(**hooked(receiver, "post-receive", hook_progress_seconds=0))
    tus_id = await tus_create(client, 9)
    assert (await tus_patch(client, tus_id, 0, b"abc")).status == 204
    await wait_for(receiver, "post-receive", 1)

    async def refused() -> bool:
        resp = await tus_patch(client, tus_id, 3, b"def")
        if resp.status == 204:
            raise AssertionError("a PATCH after the stop was taken")
        return resp.status == 400 and (await resp.json())["detail"] == "Over your plan's storage"

    assert await refused()
    head = await client.head(f"/tus/{tus_id}", headers={**V, **ALICE})
    assert head.headers["Upload-Offset"] == "3"  # nothing of the refused PATCH stored
    # the seed's protocol too
    form = chunk_form("seed", 0, 3, b"aa")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    await wait_for(receiver, "post-receive", 2)
    await asyncio.sleep(0.3)  # the stop is kept once the answer is read
    form = chunk_form("seed", 1, 3, b"bb")
    resp = await client.post("/upload-chunk", data=form, headers=ALICE)
    assert resp.status == 400 and (await resp.json())["detail"] == "Over your plan's storage"
    status = await (await client.get("/upload-status/seed", headers=ALICE)).json()
    assert status["uploaded_chunks"] == 1


async def test_pre_finish_answers_the_client_and_its_refusal_keeps_the_bytes(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    asked: list[str] = []

    def finish(event: dict[str, Any]) -> tuple[int, Any]:
        asked.append(event["upload"]["file_id"])
        if len(asked) == 1:
            return 422, {"detail": "Scan the file first"}
        return 200, {"url": "https://app.example/doc/1", "pages": 3}

    receiver.answers["pre-finish"] = finish
    client = await make_client(**hooked(receiver, "pre-finish", "post-finish"))
    form = chunk_form("doc", 0, 1, b"content")
    resp = await client.post("/upload-chunk", data=form, headers=ALICE)
    assert resp.status == 422 and await resp.json() == {"detail": "Scan the file first"}
    status = await (await client.get("/upload-status/doc", headers=ALICE)).json()
    assert status["status"] == "completed"  # the status request asked again: admitted
    form = chunk_form("doc", 0, 1, b"content")  # the client's retry: the same answer
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert await (await client.get("/files/doc", headers=ALICE)).read() == b"content"
    # a chunk that completes an upload gets the application's answer under "app"
    form = chunk_form("two", 0, 1, b"more")
    body = await (await client.post("/upload-chunk", data=form, headers=ALICE)).json()
    assert body["status"] == "completed"
    assert body["app"] == {"url": "https://app.example/doc/1", "pages": 3}
    finished = await wait_for(receiver, "post-finish", 2)
    assert sorted(e["upload"]["file_id"] for e in finished) == ["doc", "two"]


@pytest.mark.local_only  # the service's rule: the backend plays no part
async def test_pre_finish_refusal_on_tus_keeps_the_bytes(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    answers = iter([(409, {"detail": "Not now"}), (200, {})])
    receiver.answers["pre-finish"] = lambda event: next(answers)
    client = await make_client(**hooked(receiver, "pre-finish"))
    tus_id = await tus_create(client, 3)
    resp = await tus_patch(client, tus_id, 0, b"abc")
    assert resp.status == 409
    head = await client.head(f"/tus/{tus_id}", headers={**V, **ALICE})
    assert head.headers["Upload-Offset"] == "3"  # the bytes stay
    assert (await client.get(f"/files/{tus_id}", headers=ALICE)).status == 404
    assert (await tus_patch(client, tus_id, 3, b"")).status == 204  # asked again: admitted
    assert await (await client.get(f"/files/{tus_id}", headers=ALICE)).read() == b"abc"


@pytest.mark.local_only  # the service's rule: the backend plays no part
async def test_pre_access_refuses_and_its_answers_are_cached(
    make_client: ClientFactory, receiver: Receiver
) -> None:
    def access(event: dict[str, Any]) -> tuple[int, Any]:
        if event["request"]["path"].startswith("/files/"):
            return 403, {"detail": "Downloads are paid"}
        return 200, {}

    receiver.answers["pre-access"] = access
    client = await make_client(**hooked(receiver, "pre-access", hook_access_cache_seconds=60))
    form = chunk_form("doc", 0, 2, b"ab")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert receiver.of("pre-access") == []  # a new upload: nothing existing to ask about
    form = chunk_form("doc", 1, 2, b"c")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert len(receiver.of("pre-access")) == 1
    for _ in range(3):  # cached: the application is not asked again for a while
        assert (await client.get("/upload-status/doc", headers=ALICE)).status == 200
    assert len(receiver.of("pre-access")) == 1
    uncached = await make_client(**hooked(receiver, "pre-access", hook_access_cache_seconds=0))
    resp = await uncached.get("/files/doc", headers=ALICE)
    assert resp.status == 403 and await resp.json() == {"detail": "Downloads are paid"}
    event = receiver.of("pre-access")[-1]
    assert event["upload"]["file_id"] == "doc" and event["request"]["identity"] == "alice"
    assert (await uncached.get("/upload-status/nothing", headers=ALICE)).status == 404
    assert event is receiver.of("pre-access")[-1]  # no upload, nothing asked


@pytest.mark.local_only  # the service's rule: the backend plays no part
async def test_metrics_name_the_identity(make_client: ClientFactory) -> None:
    client = await make_client(**IDENTITIES)
    form = chunk_form("doc", 0, 1, b"x")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert (await client.get("/upload-status/doc", headers=BOB)).status == 404
    text = await (await client.get("/metrics", headers=ALICE)).text()
    series = "chunkserver_identity_requests_total"
    assert metric_value(text, f'{series}{{identity="alice",status="200"}}') >= 1
    assert metric_value(text, f'{series}{{identity="bob",status="404"}}') == 1


def test_the_access_log_names_the_identity(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("chunkserver.test-access")
    access = access_logger_for(Config())(logger, "")
    request = make_mocked_request("GET", "/upload-status/doc")
    request[IDENTITY] = Identity("alice")
    anonymous = make_mocked_request("GET", "/upload-status/doc")
    with caplog.at_level(logging.INFO, logger="chunkserver.test-access"):
        access.log(request, web.Response(status=404), 0.001)
        access.log(anonymous, web.Response(status=404), 0.001)
    first, second = (r.getMessage() for r in caplog.records)
    assert ' alice "GET /upload-status/doc HTTP/1.1" 404 ' in first
    assert ' - "GET /upload-status/doc HTTP/1.1" 404 ' in second
