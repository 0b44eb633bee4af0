"""The other routes through a real server: status, download, delete, health, metrics, auth, CORS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from chunkserver import Config

from .conftest import ClientFactory, chunk_form, crc64
from .reference import metric_value

BOTH_BACKENDS = True  # each test runs on the local disk and on S3 (conftest.py)


async def send(client, file_id: str, index: int, total: int, data: bytes, **kw) -> dict:
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, index, total, data, **kw))
    assert resp.status == 200, await resp.text()
    return await resp.json()


async def test_status_uploading_with_missing_chunks(client) -> None:
    await send(client, "u1", 0, 5, b"a")
    await send(client, "u1", 3, 5, b"b")
    resp = await client.get("/upload-status/u1")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "uploading"
    assert body["uploaded_chunks"] == 2
    assert body["file_exists"] is False
    assert body["total_chunks"] == 5
    assert body["missing_chunks"] == [1, 2, 4]


async def test_status_completed(client) -> None:
    await send(client, "u2", 0, 2, b"hello ", filename="greeting.txt")
    await send(client, "u2", 1, 2, b"world", filename="greeting.txt")
    body = await (await client.get("/upload-status/u2")).json()
    assert body["status"] == "completed" and body["file_exists"] is True
    assert body["filename"] == "greeting.txt"
    assert body["size"] == 11 and body["crc64nvme"] == crc64(b"hello world")


async def test_status_not_found_and_bad_id(client) -> None:
    resp = await client.get("/upload-status/nobody")
    assert resp.status == 404
    assert await resp.json() == {"status": "not_found", "file_exists": False}
    resp = await client.get("/upload-status/bad.id")
    assert resp.status == 400


async def test_download_with_range_and_disposition(client) -> None:
    data = os.urandom(100_000)
    await send(client, "dl", 0, 2, data[:60_000], filename="résumé v2.pdf")
    await send(client, "dl", 1, 2, data[60_000:], filename="résumé v2.pdf")
    resp = await client.get("/files/dl")
    assert resp.status == 200
    assert await resp.read() == data
    disposition = resp.headers["Content-Disposition"]
    assert disposition.startswith("attachment;")
    assert "filename*=UTF-8''r%C3%A9sum%C3%A9%20v2.pdf" in disposition
    resp = await client.get("/files/dl", headers={"Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert await resp.read() == data[1000:2000]
    assert resp.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"


async def test_if_range_compares_entity_tags_strongly(client) -> None:
    """A resumed download must not splice two files: an If-Range naming the ETag of a file
    since deleted and uploaded again under the same id answers 200 with the whole new file;
    the current ETag answers the range; a weak tag never matches; dates work as before."""
    old = os.urandom(5000)
    await send(client, "demo1", 0, 1, old)
    first = await client.get("/files/demo1")
    old_tag = first.headers["ETag"]
    assert await first.read() == old
    assert (await client.delete("/uploads/demo1")).status == 204
    new = os.urandom(5000)
    await send(client, "demo1", 0, 1, new)
    stale = await client.get("/files/demo1", headers={"Range": "bytes=1000-", "If-Range": old_tag})
    assert stale.status == 200 and await stale.read() == new
    current = await client.get("/files/demo1")
    tag, modified = current.headers["ETag"], current.headers["Last-Modified"]
    assert tag != old_tag
    fresh = await client.get("/files/demo1", headers={"Range": "bytes=1000-", "If-Range": tag})
    assert fresh.status == 206 and await fresh.read() == new[1000:]
    weak = await client.get(
        "/files/demo1", headers={"Range": "bytes=1000-", "If-Range": "W/" + tag}
    )
    assert weak.status == 200 and await weak.read() == new
    dated = await client.get("/files/demo1", headers={"Range": "bytes=1000-", "If-Range": modified})
    assert dated.status == 206 and await dated.read() == new[1000:]
    old_date = "Mon, 01 Jan 2001 00:00:00 GMT"
    older = await client.get("/files/demo1", headers={"Range": "bytes=1000-", "If-Range": old_date})
    assert older.status == 200 and await older.read() == new


async def test_ranges_malformed_several_or_unsatisfiable(client) -> None:
    """RFC 9110: a Range that cannot be parsed, or several ranges, is ignored (200, the
    whole file); a range past the end is 416 in JSON with Content-Range; /metrics counts
    each status as sent."""
    data = os.urandom(10_000)
    await send(client, "rng", 0, 1, data)
    for header in ("bytes=abc", "bytes=0-1,5-9", "items=0-9", "bytes=9-3"):
        resp = await client.get("/files/rng", headers={"Range": header})
        assert resp.status == 200, header
        assert await resp.read() == data
    suffix = await client.get("/files/rng", headers={"Range": "bytes=-100"})
    assert suffix.status == 206 and await suffix.read() == data[-100:]
    for header in ("bytes=10000-", "bytes=20000-20010", "bytes=-0"):
        resp = await client.get("/files/rng", headers={"Range": header})
        assert resp.status == 416, header
        assert resp.headers["Content-Type"] == "application/json"
        assert resp.headers["Content-Range"] == "bytes */10000"
        assert "detail" in await resp.json()
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, 'chunkserver_requests_total{status="206"}') == 1
    assert metric_value(metrics, 'chunkserver_requests_total{status="416"}') == 3


async def test_download_unknown_or_unfinished_is_404(client) -> None:
    resp = await client.get("/files/none")
    assert resp.status == 404
    assert await resp.json() == {"detail": "File not found"}
    await send(client, "half", 0, 2, b"x")
    assert (await client.get("/files/half")).status == 404


async def test_delete_in_progress_and_completed(client, config: Config) -> None:
    await send(client, "del1", 0, 2, b"x")
    resp = await client.delete("/uploads/del1")
    assert resp.status == 204
    assert (await client.get("/upload-status/del1")).status == 404
    assert not (Path(config.data_dir) / "chunks" / "del1").exists()

    await send(client, "del2", 0, 1, b"y")
    assert (await client.delete("/uploads/del2")).status == 204
    assert (await client.get("/files/del2")).status == 404
    assert not (Path(config.data_dir) / "uploads" / "del2").exists()

    resp = await client.delete("/uploads/never")
    assert resp.status == 404
    assert await resp.json() == {"detail": "File not found"}
    # a deleted id can be used again from scratch
    answer = await send(client, "del1", 0, 1, b"again", filename="new.bin")
    assert answer["status"] == "completed"
    metrics = await (await client.get("/metrics")).text()
    # "aborted or deleted": the upload in progress and the completed file; not the unknown id
    assert metric_value(metrics, "chunkserver_uploads_aborted_total") == 2


async def test_healthz_and_metrics(client) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    await send(client, "m", 0, 2, b"12345")
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "chunkserver_bytes_received_total") == 5
    assert metric_value(text, "chunkserver_chunks_stored_total") == 1
    assert metric_value(text, "chunkserver_uploads_in_progress") == 1
    assert metric_value(text, 'chunkserver_requests_total{status="200"}') == 2  # healthz, chunk
    assert metric_value(text, "chunkserver_free_disk_bytes") > 0
    assert metric_value(text, "chunkserver_uploads_failed_total") == 0
    assert metric_value(text, "chunkserver_chunks_rejected_total") == 0
    bad = await client.post("/upload-chunk", data=chunk_form("m", 1, 3, b"x"))  # total differs
    assert bad.status == 409
    text = await (await client.get("/metrics")).text()
    assert metric_value(text, "chunkserver_chunks_rejected_total") == 1
    assert metric_value(text, "chunkserver_chunks_stored_total") == 1


async def test_unknown_route_and_method_answer_json(client) -> None:
    resp = await client.get("/nope")
    assert resp.status == 404 and "detail" in await resp.json()
    resp = await client.put("/upload-chunk")
    assert resp.status == 405 and "detail" in await resp.json()
    assert "POST" in resp.headers["Allow"]


async def test_bearer_auth(make_client: ClientFactory) -> None:
    client = await make_client(auth_tokens=("s3cret", "other"))
    for method, path in [
        ("POST", "/upload-chunk"),
        ("GET", "/upload-status/x"),
        ("GET", "/files/x"),
        ("DELETE", "/uploads/x"),
        ("GET", "/metrics"),
    ]:
        resp = await client.request(method, path)
        assert resp.status == 401, path
        assert await resp.json() == {"detail": "Not authenticated"}
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    resp = await client.get("/upload-status/x", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401
    assert (await client.get("/healthz")).status == 200
    good = {"Authorization": "Bearer other"}
    resp = await client.post("/upload-chunk", data=chunk_form("a", 0, 1, b"z"), headers=good)
    assert resp.status == 200
    assert (await client.get("/files/a", headers=good)).status == 200


async def test_cors(make_client: ClientFactory) -> None:
    client = await make_client(cors_origins=("https://app.example",))
    resp = await client.options(
        "/upload-chunk",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    resp = await client.get("/upload-status/x", headers={"Origin": "https://app.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    resp = await client.get("/upload-status/x", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_cors_headers_are_on_every_answer_so_browsers_can_read_errors(
    make_client: ClientFactory,
) -> None:
    """Errors too (a browser hides an answer without them): 400, 401, 404 of a route and of
    an unknown path, 405; preflights of every route pass without a token."""
    origin = {"Origin": "https://app.example"}
    client = await make_client(cors_origins=("https://app.example",), auth_tokens=("t",))
    for path in ("/upload-chunk", "/uploads/x", "/upload-status/x", "/files/x"):
        resp = await client.options(
            path, headers={**origin, "Access-Control-Request-Method": "DELETE"}
        )
        assert resp.status == 204 and "DELETE" in resp.headers["Access-Control-Allow-Methods"]
    bearer = {**origin, "Authorization": "Bearer t"}
    answers = [
        await client.get("/upload-status/x", headers=origin),  # 401
        await client.get("/upload-status/bad.id", headers=bearer),  # 400
        await client.get("/upload-status/x", headers=bearer),  # 404
        await client.get("/no/such/path", headers=bearer),  # 404
        await client.put("/upload-chunk", headers=bearer),  # 405
    ]
    assert [r.status for r in answers] == [401, 400, 404, 404, 405]
    for resp in answers:
        assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "Content-Disposition" in resp.headers["Access-Control-Expose-Headers"]
        assert resp.headers["Vary"] == "Origin"


async def test_upload_page_and_static_files_need_no_token(make_client: ClientFactory) -> None:
    client = await make_client(auth_tokens=("s3cret",))
    page = await client.get("/")
    assert page.status == 200 and "text/html" in page.headers["Content-Type"]
    assert "chunked-uploader.js" in await page.text()
    module = await client.get("/static/chunked-uploader.js")
    assert module.status == 200
    assert module.headers["Content-Type"] in ("application/javascript", "text/javascript")
    assert "export class ChunkedUploader" in await module.text()
    # The dots are resolved before routing: this is /config.py, no static file, so it needs
    # the token (401), and with it is no route (404).
    assert (await client.get("/static/%2e%2e/config.py")).status == 401
    bearer = {"Authorization": "Bearer s3cret"}
    assert (await client.get("/static/%2e%2e/config.py", headers=bearer)).status == 404


@pytest.mark.local_only  # nginx cannot send an object from S3 itself
async def test_download_behind_nginx_answers_x_accel_redirect(make_client: ClientFactory) -> None:
    client = await make_client(accel_redirect_prefix="/_files/")
    await send(client, "acc", 0, 1, b"data", filename="a b.txt")
    resp = await client.get("/files/acc")
    assert resp.status == 200
    assert resp.headers["X-Accel-Redirect"] == "/_files/acc/a%20b.txt"
    assert resp.headers["Content-Disposition"].startswith("attachment;")
    assert await resp.read() == b""
    assert (await client.get("/files/none")).status == 404


async def test_a_status_request_finishes_a_completion_left_undone(client) -> None:
    """Every chunk stored, no completion: what a process or host killed between the last
    chunk's commit and its completion leaves. A status request completes it."""
    from chunkserver.http.app import UPLOADS
    from chunkserver.model import UploadMeta
    from chunkserver.storage.backends import build_store

    from .test_store_contract import begin, put

    store = build_store(client.server.app[UPLOADS].core.config)  # another process's
    await store.backend.open()
    try:
        meta = await begin(store, UploadMeta.new("left", "f.bin", 2, None, 3))
        await put(store, meta, 0, b"abc")
        await put(store, meta, 1, b"de")
    finally:
        await store.backend.close()
    body = await (await client.get("/upload-status/left")).json()
    assert body["status"] == "completed" and body["crc64nvme"] == crc64(b"abcde")
    assert await (await client.get("/files/left")).read() == b"abcde"
