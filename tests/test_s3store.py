"""What only the S3 backend does, against a real Swift and a real PostgreSQL: chunks of 5 MiB or
more streamed straight into parts, small chunks gathered into parts of 5 MiB, the part limit,
a store or database that cannot be reached (503), orphans of dead hosts swept, and a
completion whose host died taken over."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import requests

from chunkserver import Config
from chunkserver.errors import UploadConflict, UploadGone, UploadLocked
from chunkserver.model import UploadMeta
from chunkserver.storage.backends import build_store
from chunkserver.storage.faults import FAULT_POINT_ENV
from chunkserver.storage.meter import ByteLimit
from chunkserver.storage.s3 import S3Store
from chunkserver.storage.s3.assembly import S3Assembler

from . import realstack
from .conftest import ClientFactory, chunk_form, crc64, downloaded, s3_flags, split
from .test_store_contract import read_back

MiB = 2**20


@pytest.fixture
def s3(swift: realstack.Swift) -> Any:
    return realstack.s3_client(swift)


def keys(s3: Any, bucket: str, prefix: str = "") -> list[str]:
    listed = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    return [o["Key"] for o in listed]


async def post(client: Any, form: aiohttp.FormData) -> tuple[int, dict]:
    resp = await client.post("/upload-chunk", data=form)
    return resp.status, await resp.json()


async def test_chunks_of_5_mib_stream_straight_into_parts(
    make_client: ClientFactory, s3_settings: dict, s3: Any
) -> None:
    client = await make_client(**s3_settings)
    bucket = s3_settings["s3_bucket"]
    data = bytes(range(256)) * (4 * 5 * MiB // 256) + b"tail"
    chunks = split(data, 5 * MiB)
    for i, chunk in enumerate(chunks):
        status, body = await post(client, chunk_form("direct", i, len(chunks), chunk))
        assert status == 200, body
        assert keys(s3, bucket, "staging/") == []  # no copy anywhere: the part itself
    assert body["status"] == "completed" and body["crc64nvme"] == crc64(data)
    head = s3.head_object(Bucket=bucket, Key="uploads/direct/file.bin")
    assert head["ContentLength"] == len(data) and head["ETag"].endswith('-5"')
    assert await downloaded(client, "direct") == data


async def test_small_chunks_are_gathered_into_parts_of_5_mib(
    make_client: ClientFactory, s3_settings: dict, s3: Any
) -> None:
    client = await make_client(**s3_settings)
    bucket = s3_settings["s3_bucket"]
    data = bytes(range(256)) * (12 * MiB // 256)
    chunks = split(data, MiB)
    for i, chunk in enumerate(chunks[:-1]):
        status, _ = await post(client, chunk_form("small", i, len(chunks), chunk))
        assert status == 200
    # Staged as rows of the database (a chunk smaller than a part), not as objects.
    assert keys(s3, bucket, "staging/") == []
    assert await staged_rows(s3_settings, "small") == len(chunks) - 1
    status, body = await post(client, chunk_form("small", 11, len(chunks), chunks[-1]))
    assert status == 200 and body["status"] == "completed" and body["crc64nvme"] == crc64(data)
    head = s3.head_object(Bucket=bucket, Key="uploads/small/file.bin")
    assert head["ETag"].endswith('-3"')  # 5 + 5 + 2 MiB
    assert await downloaded(client, "small") == data
    for _ in range(50):  # the staged rows are removed after the answer
        if not await staged_rows(s3_settings, "small"):
            break
        await asyncio.sleep(0.1)
    assert await staged_rows(s3_settings, "small") == 0
    assert keys(s3, bucket, "staging/") == []
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


async def staged_rows(s3_settings: dict, file_id: str) -> int:
    """The staged chunks of an upload kept in the database."""
    sql = "SELECT count(*) FROM chunkserver_staged WHERE file_id = $1"
    count = await realstack.fetchval(s3_settings["database_url"], sql, file_id)
    assert isinstance(count, int)
    return count


async def test_an_upload_needing_too_many_parts_is_413_on_its_first_chunk(
    make_client: ClientFactory, s3_settings: dict
) -> None:
    client = await make_client(**{**s3_settings, "s3_max_parts": 3})
    status, body = await post(client, chunk_form("many", 0, 4, b"x" * 100, chunk_size=str(5 * MiB)))
    assert status == 413 and "s3_max_parts" in body["detail"]
    # learned from the first chunk: 20 chunks of 1 MiB make 4 parts of 5 MiB
    status, body = await post(client, chunk_form("many", 0, 20, b"x" * MiB))
    assert status == 413 and "4 parts" in body["detail"]
    assert (await client.get("/upload-status/many")).status == 404


async def test_a_field_after_a_large_chunk_is_refused_clearly(
    make_client: ClientFactory, s3_settings: dict
) -> None:
    client = await make_client(**s3_settings)
    form = aiohttp.FormData()
    for name, value in [("file_id", "late"), ("chunk_index", "0"), ("total_chunks", "2"),
                        ("filename", "f")]:  # fmt: skip
        form.add_field(name, value)
    form.add_field("chunk", io.BytesIO(b"x" * (6 * MiB)), filename="blob")
    form.add_field("chunk_sha256", "0" * 64)
    status, body = await post(client, form)
    assert status == 400 and "last part of the form" in body["detail"]
    assert (await client.get("/upload-status/late")).status == 404
    # the same chunk as the form's last part goes through
    status, _ = await post(client, chunk_form("late", 0, 2, b"x" * (6 * MiB)))
    assert status == 200


@pytest.fixture
async def proxied(s3_settings: dict) -> AsyncIterator[tuple[dict, Any, Any]]:
    """The settings with the bucket and the database behind proxies a test can cut."""
    endpoint = urlsplit(s3_settings["s3_endpoint_url"])
    database = urlsplit(s3_settings["database_url"])
    to_swift = realstack.CuttableProxy(endpoint.hostname or "", endpoint.port or 80)
    to_db = realstack.CuttableProxy(database.hostname or "", database.port or 5432)
    await to_swift.start()
    await to_db.start()
    settings = {
        **s3_settings,
        "s3_endpoint_url": f"http://127.0.0.1:{to_swift.port}",
        "database_url": urlunsplit(database._replace(netloc=f"chunkserver@127.0.0.1:{to_db.port}")),
    }
    yield settings, to_swift, to_db
    await to_swift.close()
    await to_db.close()


async def test_the_bucket_or_the_database_unreachable_answers_503(
    make_client: ClientFactory, proxied: tuple[dict, Any, Any], caplog
) -> None:
    settings, to_swift, to_db = proxied
    client = await make_client(**settings)
    assert (await post(client, chunk_form("down", 0, 3, b"a")))[0] == 200
    # A small chunk is staged in the database: the database down refuses it; the object
    # store down refuses the last chunk, whose completion builds the object.
    for proxy, part, index, data in (
        (to_db, "database", 1, b"b"),
        (to_swift, "object_store", 2, b"c"),
    ):
        proxy.cut()
        caplog.clear()
        for _ in range(3):
            resp = await client.post("/upload-chunk", data=chunk_form("down", index, 3, data))
            assert resp.status == 503, await resp.text()
            assert resp.headers["Retry-After"] and "unavailable" in (await resp.json())["detail"]
        health = await client.get("/healthz")
        assert health.status == 503 and health.headers["Retry-After"]
        checks = (await health.json())["checks"]
        assert checks == {"object_store": "ok", "database": "ok", part: "failing"}
        # one WARNING line for the outage, no traceback
        warnings = [r for r in caplog.records if r.name == "chunkserver"]
        assert len(warnings) == 1 and warnings[0].levelname == "WARNING", warnings
        assert warnings[0].exc_info is None
        proxy.restore()
        for _ in range(20):  # a pooled connection cut off is replaced on its next use
            resp = await client.post("/upload-chunk", data=chunk_form("down", index, 3, data))
            if resp.status == 200:
                break
            await asyncio.sleep(0.1)
        assert resp.status == 200, await resp.text()
        assert (await client.get("/healthz")).status == 200
        if part == "database":  # nothing was acknowledged that is not stored
            status = await (await client.get("/upload-status/down")).json()
            assert status["missing_chunks"] == [2]
    body = await resp.json()
    assert body["status"] == "completed" and body["crc64nvme"] == crc64(b"abc")


async def open_store(config: Config, **settings: Any) -> S3Store:
    store = build_store(config.replace(**settings))
    assert isinstance(store, S3Store)
    await store.backend.open()
    return store


async def test_the_sweep_removes_what_dead_hosts_left(
    config: Config, s3_settings: dict, s3: Any
) -> None:
    """A multipart upload begun by a host killed before recording it, and staged chunks (an
    object, a row) of an upload removed while its host was cleaning up, are removed by the
    sweep."""
    bucket = s3_settings["s3_bucket"]
    ghost = s3.create_multipart_upload(Bucket=bucket, Key="uploads/ghost/f.bin")["UploadId"]
    s3.put_object(Bucket=bucket, Key="staging/ghost/0123/000000.aa", Body=b"x")
    store = await open_store(config, **s3_settings)
    try:
        # A small chunk staged in the database for an upload that is gone.
        ghost_meta = UploadMeta.new("ghost", "f", 2, None)
        await store.layout.state.staged.put("staging/ghost/x/000000.bb.pg", ghost_meta, b"y")
        await store.catalog.begin(UploadMeta.new("live", "f", 2, None))
        report = await store.janitor.sweep(ttl_seconds=3600)
        assert report.expired == []  # the live upload is young: kept
        assert report.removed_temp_files == 0  # the orphans are young too: a grace period
        await asyncio.sleep(1.1)  # Swift gives listing times rounded up to the second
        report = await store.janitor.sweep(ttl_seconds=1e-9)
        assert report.expired == ["live"] and report.removed_temp_files == 3
        assert await staged_rows(s3_settings, "ghost") == 0
    finally:
        await store.backend.close()
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    assert [u["UploadId"] for u in uploads if u["UploadId"] == ghost] == []
    assert uploads == [] and keys(s3, bucket) == []


async def test_a_completion_whose_host_died_is_taken_over(
    config: Config, s3_settings: dict
) -> None:
    a = await open_store(config, **s3_settings)
    b = await open_store(config, **s3_settings)
    try:
        meta, _ = await a.catalog.begin(UploadMeta.new("orphan", "f", 2, None))
        assert isinstance(meta, UploadMeta)
        for index, data in [(0, b"ab"), (1, b"c")]:

            async def body(data: bytes = data) -> AsyncIterator[memoryview]:
                yield memoryview(data)

            received = await a.chunks.receive(
                meta, index, body(), max_bytes=ByteLimit.chunk(99), want_sha256=False
            )
            await a.chunks.commit(received, meta, index)
        # host A claims the completion, then dies before doing it
        assert (
            await a.layout.state.claims.claim_completion(meta, a.layout.lease_seconds) is not None
        )
        b.layout.lease_seconds = 3.0  # a margin for a loaded machine: the claim is fresh here
        assert (await b.janitor.sweep(ttl_seconds=3600)).completed == []  # A's claim is still fresh
        deadline = time.monotonic() + 20
        while not (report := await b.janitor.sweep(ttl_seconds=3600)).completed:
            assert time.monotonic() < deadline, "B should take the completion over"
            await asyncio.sleep(0.2)
        assert [r.file_id for r in report.completed] == ["orphan"]
        assert report.completed[0].crc64nvme == crc64(b"abc")
        assert await read_back(b, "orphan") == b"abc"
    finally:
        await a.backend.close()
        await b.backend.close()


async def test_an_upload_removed_while_a_part_streams_is_a_conflict_not_a_retry(
    config: Config, s3_settings: dict
) -> None:
    """The body is read by then: UploadGone would have the service read it again, from its
    end, and store an empty chunk. A clear 409 instead, and nothing recorded."""
    store = await open_store(config, **s3_settings)
    try:
        meta, _ = await store.catalog.begin(UploadMeta.new("gone", "f", 2, None, 5 * MiB))
        assert isinstance(meta, UploadMeta)

        async def body() -> AsyncIterator[memoryview]:
            assert await store.catalog.delete("gone")  # a DELETE from another request, meanwhile
            for _ in range(5):
                yield memoryview(b"x" * MiB)

        with pytest.raises(UploadConflict) as caught:
            await store.chunks.receive(
                meta,
                0,
                body(),
                max_bytes=ByteLimit.chunk(2**30),
                want_sha256=False,
                length_hint=5 * MiB,
            )
        assert not isinstance(caught.value, UploadGone)
        assert await store.catalog.status("gone") is None
    finally:
        await store.backend.close()


async def test_a_part_stored_after_its_upload_was_removed_is_not_recorded(
    config: Config, s3_settings: dict, s3: Any
) -> None:
    """S3 may take a part whose upload is aborted while it streams (Swift does): the commit
    then finds the upload gone, records nothing, and aborts it again to free that part."""
    store = await open_store(config, **s3_settings)
    try:
        meta, _ = await store.catalog.begin(UploadMeta.new("late", "f", 2, None, 5 * MiB))
        assert isinstance(meta, UploadMeta)

        async def body() -> AsyncIterator[memoryview]:
            yield memoryview(b"x" * MiB)
            assert await store.catalog.delete("late")
            for _ in range(4):
                yield memoryview(b"x" * MiB)

        # Swift takes the part (the case this test exists for): the receive succeeds, and
        # the commit finds the upload gone.
        received = await store.chunks.receive(
            meta, 0, body(), max_bytes=ByteLimit.chunk(2**30), want_sha256=False,
            length_hint=5 * MiB,
        )  # fmt: skip
        with pytest.raises(UploadGone):
            await store.chunks.commit(received, meta, 0)
        assert await store.catalog.status("late") is None
    finally:
        await store.backend.close()
    assert s3.list_multipart_uploads(Bucket=s3_settings["s3_bucket"]).get("Uploads", []) == []


def test_a_start_without_its_bucket_or_database_says_which(tmp_path, s3_settings: dict) -> None:
    import subprocess
    import sys

    from .conftest import s3_flags

    for key, value, said in [
        ("s3_bucket", "no-such-bucket", "the bucket 'no-such-bucket' cannot be reached"),
        ("database_url", s3_settings["database_url"] + "x", "the database refused"),
    ]:
        config = tmp_path / "host.toml"
        config.write_text("\n".join(s3_flags({**s3_settings, key: value})) + "\n")
        done = subprocess.run(
            [sys.executable, "-m", "chunkserver", "serve", "--config", str(config),
             "--port", "0", "--data-dir", str(tmp_path / "data")],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1
        assert done.stderr.strip().splitlines()[-1].startswith("chunkserver: cannot serve:")
        assert said in done.stderr


async def test_a_complete_multipart_upload_answering_200_with_an_error_is_not_a_completion(
    make_client: ClientFactory, s3_settings: dict, aiohttp_server: Any
) -> None:
    """S3 may answer CompleteMultipartUpload with 200 and an <Error> body. It is read as the
    failure it is (503, retry later); nothing is reported completed while it fails; once the
    store answers again, a status request completes it."""
    from aiohttp import web

    target = s3_settings["s3_endpoint_url"]
    failures = {"left": 100}  # more than botocore's retries

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.method == "POST" and "uploadId" in request.query and failures["left"] > 0:
            failures["left"] -= 1
            return web.Response(
                status=200,
                content_type="application/xml",
                text='<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                "<Message>We encountered an internal error. Please try again.</Message></Error>",
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        async with (
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.request(
                request.method, target + request.path_qs, headers=headers, data=io.BytesIO(body)
            ) as answer,
        ):
            payload = await answer.read()
            kept = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_HEADERS}
            if request.method == "HEAD":  # no body, but the object's length
                kept["Content-Length"] = answer.headers.get("Content-Length", "0")
            return web.Response(status=answer.status, body=payload, headers=kept)

    app = web.Application(client_max_size=64 * MiB)
    app.router.add_route("*", "/{tail:.*}", forward)
    proxy = await aiohttp_server(app)
    client = await make_client(
        **{**s3_settings, "s3_endpoint_url": f"http://127.0.0.1:{proxy.port}"}
    )
    data = b"a" * MiB + b"b" * 100
    assert (await post(client, chunk_form("err200", 0, 2, data[:MiB])))[0] == 200
    resp = await client.post("/upload-chunk", data=chunk_form("err200", 1, 2, data[MiB:]))
    assert resp.status == 503 and resp.headers["Retry-After"], await resp.text()
    assert failures["left"] < 100  # the proxy answered with the error
    failures["left"] = 0
    # every chunk is stored: a status request (as a resend would) completes the upload
    status = await (await client.get("/upload-status/err200")).json()
    assert status["status"] == "completed" and status["crc64nvme"] == crc64(data)
    status, body = await post(client, chunk_form("err200", 1, 2, data[MiB:]))
    assert status == 200 and body["status"] == "completed" and body["crc64nvme"] == crc64(data)
    assert await downloaded(client, "err200") == data


# Not passed on by the test's proxy (Host is: the signature covers it).
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length"}


async def test_a_tus_writer_that_died_holds_the_upload_only_for_its_lease(
    config: Config, s3_settings: dict
) -> None:
    """A host killed mid-PATCH leaves its writer's lease in PostgreSQL: another host answers
    423 (tus clients retry) until the lease runs out, then takes the upload on."""
    store = await open_store(config, **s3_settings)
    try:
        meta, _ = await store.catalog.begin(UploadMeta.new_stream("tusdead", "f", 3, None))
        assert isinstance(meta, UploadMeta)
        assert await store.layout.state.claims.claim_writer(meta, "the-dead-host", 3.0)

        async def body() -> AsyncIterator[memoryview]:
            yield memoryview(b"abc")

        with pytest.raises(UploadLocked):
            await store.streams.receive_at(
                meta, 0, body(), length=3, max_bytes=ByteLimit.chunk(3), on_piece=None
            )
        await asyncio.sleep(3.1)  # the lease runs out
        received = await store.streams.receive_at(
            meta, 0, body(), length=3, max_bytes=ByteLimit.chunk(3), on_piece=None
        )
        progress = await store.streams.commit_at(received)
        assert progress.offset == 3
        completed, here = await store.assembler.complete(progress.meta) or (None, False)
        assert here and completed is not None and completed.crc64nvme == crc64(b"abc")
        assert await read_back(store, progress.meta.file_id) == b"abc"
    finally:
        await store.backend.close()


async def died_mid_completion(store: S3Store, file_id: str, chunks: list[bytes]) -> UploadMeta:
    """What a host killed mid-completion leaves: every chunk stored, the completion claimed
    (its lease fresh), no object."""
    meta, _ = await store.catalog.begin(UploadMeta.new(file_id, "f.bin", len(chunks), None))
    assert isinstance(meta, UploadMeta)
    for index, data in enumerate(chunks):

        async def body(data: bytes = data) -> AsyncIterator[memoryview]:
            yield memoryview(data)

        received = await store.chunks.receive(
            meta, index, body(), max_bytes=ByteLimit.chunk(2**30), want_sha256=False
        )
        await store.chunks.commit(received, meta, index)
    assert (
        await store.layout.state.claims.claim_completion(meta, store.layout.lease_seconds)
        is not None
    )
    return meta


async def test_a_dead_completion_is_taken_over_by_the_next_chunk_or_status(
    make_client: ClientFactory, config: Config, s3_settings: dict, monkeypatch
) -> None:
    """While the dead host's lease runs, the last chunk sent again answers 503 with
    Retry-After (never a 409 saying the upload was removed); once it runs out, that chunk,
    or a status request, completes the upload."""
    import chunkserver.storage.s3.assembly as s3_assembly

    monkeypatch.setattr(s3_assembly, "COMPLETION_WAIT_SECONDS", 0.2)
    client = await make_client(**s3_settings)
    dead = await open_store(config, **s3_settings)
    chunks = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    try:
        await died_mid_completion(dead, "by-chunk", chunks)
        await died_mid_completion(dead, "by-status", chunks)
    finally:
        await dead.backend.close()
    from chunkserver.http.app import UPLOADS

    assembler = client.server.app[UPLOADS].core.assembler
    assert isinstance(assembler, S3Assembler)
    assembler.layout.lease_seconds = 4.0  # the dead host's claims are fresh for the first checks
    resp = await client.post("/upload-chunk", data=chunk_form("by-chunk", 2, 3, chunks[2], "f.bin"))
    assert resp.status == 503 and resp.headers["Retry-After"], await resp.text()
    status = await (await client.get("/upload-status/by-status")).json()
    assert status["status"] == "uploading" and status["missing_chunks"] == []
    deadline = time.monotonic() + 30  # the lease runs out, then the chunk takes it over
    while True:
        resp = await client.post(
            "/upload-chunk", data=chunk_form("by-chunk", 2, 3, chunks[2], "f.bin")
        )
        if resp.status != 503:
            break
        assert time.monotonic() < deadline, "the completion should be taken over"
        await asyncio.sleep(0.5)
    body = await resp.json()
    assert body["status"] == "completed" and body["crc64nvme"] == crc64(b"".join(chunks))
    status = await (await client.get("/upload-status/by-status")).json()
    assert status["status"] == "completed" and status["crc64nvme"] == crc64(b"".join(chunks))
    for file_id in ("by-chunk", "by-status"):
        assert await downloaded(client, file_id) == b"".join(chunks)


def test_a_dead_completion_is_finished_within_30_s_by_live_hosts(
    tmp_path, config: Config, s3_settings: dict, servers, s3: Any
) -> None:
    """Real processes, the real lease: a host is killed inside its completion, after S3's
    CompleteMultipartUpload made the object whole and before its row says so (a fault
    point: chunkserver/faults.py). `chunkserver upload` against one live host, and the last
    chunk sent again to another, both see the upload completed within 30 s of the death,
    the object is the file, and no multipart upload is left open."""
    host_config = tmp_path / "host.toml"
    host_config.write_text("\n".join(s3_flags(s3_settings)) + "\n")
    one = servers("--config", str(host_config), data_dir=tmp_path / "one")
    two = servers("--config", str(host_config), data_dir=tmp_path / "two")
    dying = servers("--config", str(host_config), data_dir=tmp_path / "three",
                    env={FAULT_POINT_ENV: "s3-after-complete"})  # fmt: skip
    data = os.urandom(3 * MiB + 123)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    chunks = split(data, MiB)
    for index, chunk in enumerate(chunks[:-1]):
        resp = requests.post(
            f"{dying.url}/upload-chunk", files={"chunk": ("blob", chunk)},
            data={"file_id": "deadhost", "chunk_index": str(index), "total_chunks": "4",
                  "filename": "f.bin"}, timeout=30,
        )  # fmt: skip
        assert resp.status_code == 200, resp.text
    with pytest.raises(requests.ConnectionError):  # the last chunk's completion kills it
        requests.post(
            f"{dying.url}/upload-chunk", files={"chunk": ("blob", chunks[-1])},
            data={"file_id": "deadhost", "chunk_index": "3", "total_chunks": "4",
                  "filename": "f.bin"}, timeout=30,
        )  # fmt: skip
    assert dying.process.wait(10) == -signal.SIGKILL
    died = time.monotonic()
    uploading = subprocess.Popen(
        [sys.executable, "-m", "chunkserver", "upload", str(path), "--url", one.url,
         "--file-id", "deadhost", "--chunk-size", "1MiB", "--quiet"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    answers = []
    while time.monotonic() - died < 40:
        resp = requests.post(
            f"{two.url}/upload-chunk",
            files={"chunk": ("blob", chunks[-1])},
            data={"file_id": "deadhost", "chunk_index": "3", "total_chunks": "4",
                  "filename": "f.bin"},
            timeout=30,
        )  # fmt: skip
        answers.append(resp.status_code)
        if resp.status_code == 200:
            break
        assert resp.status_code == 503 and resp.headers["Retry-After"], resp.text
        time.sleep(float(resp.headers["Retry-After"]))
    took = time.monotonic() - died
    assert answers[-1] == 200 and took < 30, (answers, took)
    assert resp.json()["crc64nvme"] == crc64(data)
    out, _ = uploading.communicate(timeout=60)
    assert uploading.returncode == 0, out
    assert json.loads(out.splitlines()[-1])["crc64nvme"] == crc64(data)
    body = s3.get_object(Bucket=s3_settings["s3_bucket"], Key="uploads/deadhost/f.bin")
    assert body["Body"].read() == data
    assert s3.list_multipart_uploads(Bucket=s3_settings["s3_bucket"]).get("Uploads", []) == []


async def test_a_host_starting_beside_busy_hosts_runs_no_ddl(s3_settings: dict) -> None:
    """A restarted host must not take the exclusive locks of DDL on a database already at
    the current schema: with other hosts writing, that deadlocked (seen in the S3 soak)."""
    import asyncpg

    from chunkserver.storage.s3.state import SCHEMA_VERSION, UploadState

    first = UploadState(s3_settings["database_url"])
    await first.open()
    writer = await asyncpg.connect(s3_settings["database_url"])
    try:
        async with writer.transaction():
            # What a serving host's commit holds for a moment; a DDL would wait for it.
            await writer.execute("LOCK TABLE chunkserver_uploads IN ROW EXCLUSIVE MODE")
            second = UploadState(s3_settings["database_url"])
            await asyncio.wait_for(second.open(), 5)
            await second.close()
        versions = await writer.fetch("SELECT version FROM chunkserver_schema ORDER BY 1")
        # each numbered migration (chunkserver/storage/s3/migrations/*.sql) recorded once, by the first
        assert [r["version"] for r in versions] == list(range(1, SCHEMA_VERSION + 1))
    finally:
        await writer.close()
        await first.close()


async def test_a_database_of_schema_version_1_is_brought_up_to_date(s3_settings: dict) -> None:
    import asyncpg

    from chunkserver.storage.s3.state import SCHEMA_VERSION, UploadState

    db = await asyncpg.connect(s3_settings["database_url"])
    try:
        await db.execute(
            "CREATE TABLE chunkserver_schema (version integer NOT NULL);"
            "INSERT INTO chunkserver_schema VALUES (1);"
            "CREATE TABLE chunkserver_uploads (file_id text PRIMARY KEY, token text NOT NULL,"
            " filename text NOT NULL, total_chunks integer NOT NULL, total_size bigint,"
            " chunk_size bigint, chunk_size_declared boolean NOT NULL DEFAULT false,"
            " direct boolean, created_at double precision NOT NULL,"
            " last_activity double precision NOT NULL, status text NOT NULL DEFAULT 'uploading',"
            " claimed_at double precision, object_key text NOT NULL, s3_upload_id text NOT NULL,"
            " size bigint, crc64nvme text, sha256 text, completed_at double precision)"
        )
        state = UploadState(s3_settings["database_url"])
        await state.open()
        await state.close()
        columns = {
            r["column_name"]
            for r in await db.fetch(
                "SELECT column_name FROM information_schema.columns"
                " WHERE table_name = 'chunkserver_uploads'"
            )
        }
        assert {"receivers", "stream_offset", "metadata", "protocol"} <= columns
        assert await db.fetchval("SELECT max(version) FROM chunkserver_schema") == SCHEMA_VERSION
    finally:
        await db.close()
