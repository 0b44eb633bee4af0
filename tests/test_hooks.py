"""Hooks against a real HTTP receiver: pre-create admits or refuses (relayed), post-events are
delivered with their bodies, a receiver down then up loses nothing, a server SIGKILLed
between a completion and its delivery delivers after the restart, and several processes
deliver each event once."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from chunkserver.http.keys import UPLOADS

from .conftest import ServerProcess, chunk_form, crc64, s3_flags
from .realstack import free_port
from .reference import metric_value

BOTH_BACKENDS = True


class Receiver:
    """The application's hook endpoint: records every event; refuses pre-create for the file
    ids or filenames in `refuse`; answers an event of a type in `answers` with what that
    function returns, (status, JSON body); can be stopped and started again on the same
    port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.events: list[dict[str, Any]] = []
        self.refuse: dict[str, tuple[int, str]] = {}
        self.answers: dict[str, Callable[[dict[str, Any]], tuple[int, Any]]] = {}
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                event = json.loads(self.rfile.read(length))
                receiver.events.append(event)
                upload = event["upload"]
                status, detail = receiver.refuse.get(
                    upload["file_id"], receiver.refuse.get(upload["filename"], (200, ""))
                )
                if event["type"] != "pre-create":
                    status = 200
                answer: Any = {"detail": detail} if detail else {}
                if event["type"] in receiver.answers:
                    status, answer = receiver.answers[event["type"]](event)
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    def wait_for(self, kind: str, count: int, seconds: float = 20) -> list[dict[str, Any]]:
        deadline = time.monotonic() + seconds
        while len(self.of(kind)) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.of(kind)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    r.start()
    yield r
    r.stop()


async def wait_for(receiver: Receiver, kind: str, count: int, seconds: float = 20) -> list:
    return await asyncio.to_thread(receiver.wait_for, kind, count, seconds)


async def test_pre_create_admits_refuses_and_relays(make_client, receiver: Receiver) -> None:
    client = await make_client(hook_url=receiver.url)
    receiver.refuse["nope"] = (403, "quota exceeded for user 42")
    resp = await client.post("/upload-chunk", data=chunk_form("nope", 0, 2, b"ab"))
    assert resp.status == 403 and await resp.json() == {"detail": "quota exceeded for user 42"}
    assert (await client.get("/upload-status/nope")).status == 404  # nothing stored
    meta = json.dumps({"user": "42"})
    resp = await client.post(
        "/upload-chunk", data=chunk_form("yes", 0, 2, b"ab", metadata=meta, total_size="3")
    )
    assert resp.status == 200
    resp = await client.post("/upload-chunk", data=chunk_form("yes", 1, 2, b"c"))
    assert resp.status == 200  # a later chunk asks no more
    asked = receiver.of("pre-create")
    assert [e["upload"]["file_id"] for e in asked] == ["nope", "yes"]
    event = asked[1]
    assert event["upload"]["metadata"] == {"user": "42"} and event["upload"]["size"] == 3
    assert event["upload"]["filename"] == "file.bin" and event["request"]["remote"]
    assert len(event["id"]) >= 16 and event["time"].endswith("Z")
    receiver.stop()  # unreachable: refused with 503, nothing stored
    resp = await client.post("/upload-chunk", data=chunk_form("down", 0, 2, b"ab"))
    assert resp.status == 503 and resp.headers["Retry-After"]
    assert (await client.get("/upload-status/down")).status == 404


async def test_post_events_are_delivered_with_their_bodies(
    make_client, receiver: Receiver, config
) -> None:
    client = await make_client(hook_url=receiver.url, hook_events=("post-finish",
                               "post-terminate", "post-expire"))  # fmt: skip
    meta = json.dumps({"doc": "7"})
    for i, part in enumerate((b"hello ", b"world")):
        resp = await client.post(
            "/upload-chunk", data=chunk_form("done", i, 2, part, metadata=meta)
        )
        assert resp.status == 200
    [finished] = await wait_for(receiver, "post-finish", 1)
    upload = finished["upload"]
    assert upload["file_id"] == "done" and upload["size"] == 11
    assert upload["crc64nvme"] == crc64(b"hello world") and upload["metadata"] == {"doc": "7"}
    assert upload["storage"] == config.storage
    assert upload["location"].endswith("uploads/done/file.bin")
    assert receiver.of("pre-create") == []  # not among hook_events
    assert (await client.delete("/uploads/done")).status == 204
    [terminated] = await wait_for(receiver, "post-terminate", 1)
    assert terminated["upload"]["file_id"] == "done"
    # an idle upload expired by the sweep
    await client.post("/upload-chunk", data=chunk_form("idle", 0, 2, b"x"))
    uploads = client.server.app[UPLOADS]
    uploads.core.config = uploads.core.config.replace(upload_ttl_seconds=1e-9)
    await asyncio.sleep(0.05)
    await uploads.sweep()
    [expired] = await wait_for(receiver, "post-expire", 1)
    assert expired["upload"]["file_id"] == "idle" and expired["request"]["remote"] is None
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_hooks_delivered_total") == 3
    assert metric_value(metrics, "chunkserver_hooks_pending") == 0


async def test_a_receiver_down_then_up_loses_nothing(make_client, receiver: Receiver) -> None:
    client = await make_client(hook_url=receiver.url, hook_events=("post-finish",))
    receiver.stop()
    for name in ("a", "b", "c"):
        resp = await client.post("/upload-chunk", data=chunk_form(name, 0, 1, name.encode()))
        assert (await resp.json())["status"] == "completed"  # answered at once, queued
    await asyncio.sleep(1.5)
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_hooks_pending") == 3
    # each of the three was tried, refused by the receiver being down, and tried again
    assert metric_value(metrics, "chunkserver_hooks_retried_total") >= 3
    receiver.start()
    events = await wait_for(receiver, "post-finish", 3, seconds=30)
    assert sorted(e["upload"]["file_id"] for e in events) == ["a", "b", "c"]


def hook_config(
    tmp_path: Path, receiver: Receiver, backend: str = "local", request: Any = None
) -> Path:
    """A config file sending post-finish events to `receiver` (on S3: its bucket and
    database, whose outbox every host shares)."""
    config = tmp_path / "hooks.toml"
    lines = [f'hook_url = "{receiver.url}"', 'hook_events = ["post-finish"]']
    if backend == "s3":
        lines += s3_flags(request.getfixturevalue("s3_settings"))
    config.write_text("\n".join(lines) + "\n")
    return config


def data_dir_of(backend: str, tmp_path: Path, host: str) -> Path:
    """One data folder for the local disk; on S3 each host its own (no state is in it)."""
    return tmp_path / ("data" if backend == "local" else host)


def post(url: str, file_id: str, index: int, total: int, data: bytes) -> dict:
    response = requests.post(
        f"{url}/upload-chunk",
        files={"chunk": ("chunk", data)},
        data={"file_id": file_id, "chunk_index": index, "total_chunks": total, "filename": "f"},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.slow
def test_a_server_killed_before_delivering_delivers_after_its_restart(
    servers: Callable[..., ServerProcess],
    receiver: Receiver,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """At least once across a SIGKILL: on the local disk the restarted process sends it;
    on S3 another host (its own empty data folder) sends it from the database's outbox."""
    config = hook_config(tmp_path, receiver, backend, request)
    receiver.stop()
    first = servers("--config", str(config), data_dir=data_dir_of(backend, tmp_path, "a"))
    assert post(first.url, "kept", 0, 1, b"data")["status"] == "completed"
    first.kill()  # SIGKILL while the event waits for the receiver
    receiver.start()
    servers("--config", str(config), data_dir=data_dir_of(backend, tmp_path, "b"))
    [event] = receiver.wait_for("post-finish", 1)
    assert event["upload"]["file_id"] == "kept"
    time.sleep(1.5)
    assert len(receiver.of("post-finish")) == 1


@pytest.mark.slow
def test_several_processes_deliver_each_event_once(
    servers: Callable[..., ServerProcess],
    receiver: Receiver,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    config = hook_config(tmp_path, receiver, backend, request)
    a = servers("--config", str(config), data_dir=data_dir_of(backend, tmp_path, "a"))
    b = servers("--config", str(config), data_dir=data_dir_of(backend, tmp_path, "b"))
    for n in range(10):
        post(a.url, f"u{n}", 0, 2, b"x")
        post(b.url, f"u{n}", 1, 2, b"y")
    events = receiver.wait_for("post-finish", 10)
    time.sleep(2)  # any duplicate would have come by now
    ids = [e["id"] for e in receiver.of("post-finish")]
    assert sorted(e["upload"]["file_id"] for e in events) == sorted(f"u{n}" for n in range(10))
    assert len(ids) == len(set(ids)) == 10


async def test_a_post_finish_queued_before_its_completion_waits_for_it(
    make_client, receiver: Receiver
) -> None:
    """post-finish is queued before the completion, so that a process killed between the
    two loses nothing: the event waits while the upload is incomplete, is sent once with the
    completion's figures, and a second queueing of it (the same id) adds nothing."""
    from chunkserver.service.hooks import finish_event_id

    client = await make_client(hook_url=receiver.url, hook_events=("post-finish",))
    uploads = client.server.app[UPLOADS]
    assert (await client.post("/upload-chunk", data=chunk_form("w", 0, 2, b"ab"))).status == 200
    meta = uploads.core.manifest.get("w")
    assert meta is not None
    # as if a process had queued it and died before completing
    await uploads.core.hooks.emit("post-finish", meta, None, finish_event_id("w", meta.token))
    await asyncio.sleep(1.5)
    assert receiver.of("post-finish") == []  # not while the upload is incomplete
    resp = await client.post("/upload-chunk", data=chunk_form("w", 1, 2, b"c"))
    assert (await resp.json())["status"] == "completed"
    [event] = await wait_for(receiver, "post-finish", 1)
    assert event["id"] == finish_event_id("w", meta.token)
    assert event["upload"]["size"] == 3 and event["upload"]["crc64nvme"] == crc64(b"abc")
    await asyncio.sleep(1.5)
    assert len(receiver.of("post-finish")) == 1


async def test_tus_uploads_fire_the_hooks(make_client, receiver: Receiver) -> None:
    client = await make_client(hook_url=receiver.url)
    tus = {"Tus-Resumable": "1.0.0"}
    receiver.refuse["secret.bin"] = (403, "no secrets here")

    def named(name: str) -> str:
        return "filename " + base64.b64encode(name.encode()).decode()

    refused = await client.post(
        "/tus/", headers={**tus, "Upload-Length": "3", "Upload-Metadata": named("secret.bin")}
    )
    assert refused.status == 403 and await refused.json() == {"detail": "no secrets here"}
    assert refused.headers["Tus-Resumable"] == "1.0.0"
    metadata = named("a.bin") + ",user " + base64.b64encode(b"42").decode()
    created = await client.post(
        "/tus/", headers={**tus, "Upload-Length": "5", "Upload-Metadata": metadata}
    )
    assert created.status == 201
    path = "/tus/" + created.headers["Location"].rsplit("/tus/", 1)[1]
    patched = await client.patch(
        path,
        data=b"hello",
        headers={**tus, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"},
    )
    assert patched.status == 204
    asked = receiver.of("pre-create")[-1]["upload"]
    assert asked["filename"] == "a.bin" and asked["size"] == 5
    finished = (await wait_for(receiver, "post-finish", 1))[0]["upload"]
    assert finished["file_id"] == path.rsplit("/", 1)[1] and finished["filename"] == "a.bin"
    assert finished["size"] == 5 and finished["crc64nvme"] == crc64(b"hello")
    assert finished["metadata"] == {"filename": "a.bin", "user": "42"}
    other = await client.post("/tus/", headers={**tus, "Upload-Length": "9"})
    other_path = "/tus/" + other.headers["Location"].rsplit("/tus/", 1)[1]
    assert (await client.delete(other_path, headers=tus)).status == 204
    terminated = (await wait_for(receiver, "post-terminate", 1))[0]["upload"]
    assert terminated["file_id"] == other.headers["Location"].rsplit("/", 1)[1]


async def test_ietf_draft_uploads_fire_the_hooks(make_client, receiver: Receiver) -> None:
    client = await make_client(hook_url=receiver.url)
    receiver.refuse["secret.bin"] = (403, "no secrets here")
    refused = await client.post(
        "/resumable/",
        data=b"abc",
        headers={"Upload-Complete": "?1", "Content-Disposition": 'inline; filename="secret.bin"'},
    )
    assert refused.status == 403
    assert refused.headers["Content-Type"] == "application/problem+json"
    assert (await refused.json())["detail"] == "no secrets here"
    created = await client.post(
        "/resumable/",
        data=b"hello",
        headers={"Upload-Complete": "?1", "Content-Disposition": 'inline; filename="a.bin"'},
    )
    assert created.status == 200
    finished = (await wait_for(receiver, "post-finish", 1))[0]["upload"]
    assert finished["filename"] == "a.bin" and finished["size"] == 5
    assert finished["crc64nvme"] == crc64(b"hello")


async def test_the_parts_of_a_concatenation_are_not_finished_files(
    make_client, receiver: Receiver
) -> None:
    """tus-js-client's parallelUploads: two partial uploads, then the final. One post-finish,
    for the final, with its metadata; the partials' pre-create events say they are parts."""
    client = await make_client(hook_url=receiver.url)
    tus = {"Tus-Resumable": "1.0.0"}
    octets = {**tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "0"}
    paths = []
    for data in (b"abc", b"defg"):
        part = await client.post(
            "/tus/", headers={**tus, "Upload-Length": str(len(data)), "Upload-Concat": "partial"}
        )
        path = "/tus/" + part.headers["Location"].rsplit("/tus/", 1)[1]
        assert (await client.patch(path, data=data, headers=octets)).status == 204
        paths.append(path)
    metadata = "filename " + base64.b64encode(b"whole.bin").decode()
    final = await client.post(
        "/tus/",
        headers={**tus, "Upload-Concat": "final;" + " ".join(paths), "Upload-Metadata": metadata},
    )
    assert final.status == 201
    [finished] = await wait_for(receiver, "post-finish", 1)
    await asyncio.sleep(0.5)  # no other post-finish follows
    assert len(receiver.of("post-finish")) == 1
    assert finished["upload"]["filename"] == "whole.bin"
    assert finished["upload"]["metadata"] == {"filename": "whole.bin"}
    assert finished["upload"]["crc64nvme"] == crc64(b"abcdefg")
    created = receiver.of("pre-create")
    assert [e["upload"].get("partial", False) for e in created] == [True, True, False]
