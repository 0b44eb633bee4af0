"""POST /upload-chunk through a real server: the seed's answers and every error row."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path

import aiohttp
import pytest

from chunkserver import Config
from chunkserver.storage.local import receive as local_receive

from .conftest import (
    ClientFactory,
    chunk_form,
    crc64,
    downloaded,
    s3_leftovers,
    sha256,
    split,
    temp_files,
)
from .reference import metric_value

FILE_ID = "550e8400-e29b-41d4-a716-446655440000"
BOTH_BACKENDS = True  # each test runs on the local disk and on S3 (conftest.py)


async def upload_all(client, file_id: str, data: bytes, chunk_size: int, **kw) -> list[dict]:
    answers = []
    chunks = split(data, chunk_size)
    for i, chunk in enumerate(chunks):
        resp = await client.post(
            "/upload-chunk", data=chunk_form(file_id, i, len(chunks), chunk, **kw)
        )
        assert resp.status == 200, await resp.text()
        answers.append(await resp.json())
    return answers


async def test_seed_answers_in_progress_and_complete(client, config: Config) -> None:
    data = os.urandom(5 * 1000 + 17)
    answers = await upload_all(client, FILE_ID, data, 1000, filename="large_file.pdf")
    assert answers[2] == {
        "file_id": FILE_ID,
        "filename": "large_file.pdf",
        "type": "file",
        "status": "uploading",
        "uploaded_chunks": 3,
        "total_chunks": 6,
    }
    last = answers[-1]
    assert last["status"] == "completed"
    assert last["uploaded_chunks"] == last["total_chunks"] == 6
    assert last["size"] == len(data) and last["crc64nvme"] == crc64(data)
    assert await downloaded(client, FILE_ID) == data
    if config.storage == "local":
        merged = Path(config.data_dir) / "uploads" / FILE_ID / "large_file.pdf"
        assert merged.read_bytes() == data
        assert not (Path(config.data_dir) / "chunks" / FILE_ID).exists()


async def test_answers_are_json_with_exact_content_type(client) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("a", 0, 2, b"x"))
    assert resp.headers["Content-Type"] == "application/json"
    resp = await client.post("/upload-chunk", data={"file_id": "a"})
    assert resp.status == 400
    assert resp.headers["Content-Type"] == "application/json"


async def test_chunks_out_of_order_and_in_parallel(client, config: Config) -> None:
    data = os.urandom(64 * 4096 + 100)
    chunks = split(data, 4096)
    order = list(range(len(chunks)))
    import random

    random.Random(7).shuffle(order)
    gate = asyncio.Semaphore(16)

    async def send(i: int) -> dict:
        async with gate:
            resp = await client.post(
                "/upload-chunk", data=chunk_form("par", i, len(chunks), chunks[i])
            )
            assert resp.status == 200
            return await resp.json()

    answers = await asyncio.gather(*(send(i) for i in order))
    completed = [a for a in answers if a["status"] == "completed"]
    assert completed and all(a["crc64nvme"] == crc64(data) for a in completed)
    # Answers of chunks that arrived after the completion say completed too: the merges
    # are counted where they happen, exactly once.
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_uploads_completed_total") == 1
    assert await downloaded(client, "par") == data
    assert temp_files(Path(config.data_dir)) == []


async def test_same_last_chunk_twice_at_once_merges_once(client, config: Config) -> None:
    chunks = [os.urandom(50_000) for _ in range(3)]
    for i in range(2):
        assert (
            await client.post("/upload-chunk", data=chunk_form("twice", i, 3, chunks[i]))
        ).status == 200
    resps = await asyncio.gather(
        *(client.post("/upload-chunk", data=chunk_form("twice", 2, 3, chunks[2])) for _ in range(2))
    )
    answers = [await r.json() for r in resps]
    assert [a["status"] for a in answers] == ["completed", "completed"]
    assert answers[0]["crc64nvme"] == answers[1]["crc64nvme"] == crc64(b"".join(chunks))
    assert await downloaded(client, "twice") == b"".join(chunks)
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_uploads_completed_total") == 1
    assert metric_value(metrics, "chunkserver_uploads_in_progress") == 0
    if config.storage == "local":  # the loser of the race brought no folder (or .lock) back
        assert not (Path(config.data_dir) / "chunks" / "twice").exists()


async def test_retry_is_idempotent(client) -> None:
    for _ in range(3):
        resp = await client.post("/upload-chunk", data=chunk_form("retry", 1, 3, b"abc"))
        assert (await resp.json())["uploaded_chunks"] == 1


async def test_chunk_after_completion_changes_nothing(client, config: Config) -> None:
    data = b"hello world"
    await upload_all(client, "done", data, 4)
    resp = await client.post("/upload-chunk", data=chunk_form("done", 0, 3, b"XXXX"))
    body = await resp.json()
    assert resp.status == 200 and body["status"] == "completed"
    assert body["crc64nvme"] == crc64(data)
    assert await downloaded(client, "done") == data
    assert not (Path(config.data_dir) / "chunks" / "done").exists()


async def test_chunk_part_before_text_fields(client) -> None:
    data = os.urandom(3000)
    chunks = split(data, 1000)
    for i, chunk in enumerate(chunks):
        form = chunk_form("first", i, 3, chunk, chunk_first=True, chunk_sha256=sha256(chunk))
        resp = await client.post("/upload-chunk", data=form)
        assert resp.status == 200, await resp.text()
    assert (await resp.json())["crc64nvme"] == crc64(data)


async def test_empty_file_in_one_empty_chunk(client) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("empty", 0, 1, b""))
    body = await resp.json()
    assert body["status"] == "completed" and body["size"] == 0


@pytest.mark.parametrize(
    ("fields", "detail"),
    [
        (
            {"chunk_index": "0", "total_chunks": "1", "filename": "f"},
            "Missing required parameter: file_id",
        ),
        (
            {"file_id": "a", "total_chunks": "1", "filename": "f"},
            "Missing required parameter: chunk_index",
        ),
        (
            {"file_id": "a", "chunk_index": "0", "filename": "f"},
            "Missing required parameter: total_chunks",
        ),
        (
            {"file_id": "a", "chunk_index": "0", "total_chunks": "1"},
            "Missing required parameter: filename",
        ),
    ],
)
async def test_missing_parameter(client, fields: dict, detail: str) -> None:
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("chunk", b"data", filename="blob")
    resp = await client.post("/upload-chunk", data=form)
    assert resp.status == 400
    assert await resp.json() == {"detail": detail}


async def test_missing_chunk_part(client) -> None:
    form = aiohttp.FormData()
    for name, value in {
        "file_id": "a",
        "chunk_index": "0",
        "total_chunks": "1",
        "filename": "f",
    }.items():
        form.add_field(name, value)
    form.add_field("other", b"not the chunk", filename="x")
    resp = await client.post("/upload-chunk", data=form)
    assert resp.status == 400
    assert await resp.json() == {"detail": "Missing required parameter: chunk"}


@pytest.mark.parametrize(
    ("overrides", "word"),
    [
        ({"chunk_index": "x"}, "chunk_index"),
        ({"total_chunks": "1.5"}, "total_chunks"),
        ({"chunk_index": "3"}, "chunk_index"),
        ({"chunk_index": "-1"}, "chunk_index"),
        ({"total_chunks": "0", "chunk_index": "0"}, "total_chunks"),
        ({"total_chunks": "100001"}, "total_chunks"),
        ({"file_id": "../etc"}, "file_id"),
        ({"file_id": "a" * 129}, "file_id"),
        ({"file_id": "a b"}, "file_id"),
        ({"filename": ""}, "filename"),
        ({"filename": "."}, "filename"),
        ({"filename": ".."}, "filename"),
        ({"filename": "a/b"}, "filename"),
        ({"filename": "..\\x"}, "filename"),
        ({"filename": "a\x00b"}, "filename"),
        ({"filename": "a\nb"}, "filename"),
        ({"filename": "é" * 128}, "filename"),
        ({"chunk_sha256": "zz"}, "chunk_sha256"),
        ({"total_size": "-5"}, "total_size"),
        ({"total_chunks": " 2"}, "total_chunks"),
        ({"chunk_index": "+0"}, "chunk_index"),
        ({"chunk_size": "1_000"}, "chunk_size"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(client, config: Config, overrides, word) -> None:
    values = {
        "file_id": "ok",
        "chunk_index": "0",
        "total_chunks": "3",
        "filename": "f.bin",
        **overrides,
    }
    form = aiohttp.FormData()
    for k, v in values.items():
        form.add_field(k, v)
    form.add_field("chunk", b"data", filename="blob")
    resp = await client.post("/upload-chunk", data=form)
    assert resp.status == 400, await resp.text()
    assert word in (await resp.json())["detail"]
    assert temp_files(Path(config.data_dir)) == []
    if config.storage == "local":
        assert list((Path(config.data_dir) / "uploads").iterdir()) == []


async def test_a_field_given_twice_is_400(client) -> None:
    """Each field of the seed's form is given once; a second value is not silently taken."""
    form = aiohttp.FormData()
    for k, v in (("file_id", "first"), ("chunk_index", "0"), ("total_chunks", "1"),
                 ("filename", "f"), ("file_id", "second")):  # fmt: skip
        form.add_field(k, v)
    form.add_field("chunk", b"data", filename="blob")
    resp = await client.post("/upload-chunk", data=form)
    assert resp.status == 400 and "file_id" in (await resp.json())["detail"]
    for file_id in ("first", "second"):
        assert (await client.get(f"/upload-status/{file_id}")).status == 404


async def test_an_empty_chunk_that_is_not_the_last_is_422(client) -> None:
    """Without chunk_size as with it: only the last chunk may be empty."""
    for extra in ({}, {"chunk_size": "4"}):
        resp = await client.post("/upload-chunk", data=chunk_form("hollow", 0, 2, b"", **extra))
        assert resp.status == 422, extra
        assert "empty" in (await resp.json())["detail"]
    assert (await client.get("/upload-status/hollow")).status == 404  # nothing was kept
    assert (await client.post("/upload-chunk", data=chunk_form("hollow", 1, 2, b""))).status == 200


async def test_not_multipart_is_400(client) -> None:
    resp = await client.post("/upload-chunk", json={"file_id": "a"})
    assert resp.status == 400
    assert "multipart" in (await resp.json())["detail"]
    resp = await client.post(
        "/upload-chunk",
        data=b"garbage",
        headers={"Content-Type": "multipart/form-data; boundary=zz"},
    )
    assert resp.status == 400


async def test_conflicting_total_chunks_or_filename_is_409(client) -> None:
    assert (await client.post("/upload-chunk", data=chunk_form("c", 0, 3, b"a"))).status == 200
    resp = await client.post("/upload-chunk", data=chunk_form("c", 1, 4, b"a"))
    assert resp.status == 409 and "total_chunks" in (await resp.json())["detail"]
    resp = await client.post("/upload-chunk", data=chunk_form("c", 1, 3, b"a", filename="other"))
    assert resp.status == 409 and "filename" in (await resp.json())["detail"]
    # the conflict is also caught when the fields come after the chunk
    resp = await client.post("/upload-chunk", data=chunk_form("c", 1, 4, b"a", chunk_first=True))
    assert resp.status == 409
    status = await (await client.get("/upload-status/c")).json()
    assert status["uploaded_chunks"] == 1


async def test_chunk_over_max_chunk_bytes_is_413(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(max_chunk_bytes=1000)
    resp = await client.post("/upload-chunk", data=chunk_form("big", 0, 2, b"x" * 1001))
    assert resp.status == 413 and "max_chunk_bytes" in (await resp.json())["detail"]
    # and when the chunk comes first, so that the limit is met while streaming
    resp = await client.post(
        "/upload-chunk", data=chunk_form("big", 0, 2, b"x" * 5000, chunk_first=True)
    )
    assert resp.status == 413
    assert temp_files(Path(config.data_dir)) == []
    ok = await client.post("/upload-chunk", data=chunk_form("big", 0, 2, b"x" * 1000))
    assert ok.status == 200


async def test_content_length_far_over_the_limit_is_413_before_reading(
    make_client: ClientFactory,
) -> None:
    """Only the head is sent: the answer comes without a byte of the body (a server that
    read first would wait for it until idle_timeout_seconds)."""
    client = await make_client(max_chunk_bytes=1000, idle_timeout_seconds=30)
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 200000\r\n\r\n"
    )
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    resp = await client.post("/upload-chunk", data=chunk_form("big", 0, 2, b"x" * 200_000))
    assert resp.status == 413 and "max_chunk_bytes (1000 bytes)" in (await resp.json())["detail"]


async def test_upload_over_max_file_bytes_is_413(make_client: ClientFactory) -> None:
    client = await make_client(max_file_bytes=2500)
    resp = await client.post(
        "/upload-chunk", data=chunk_form("f", 0, 3, b"x" * 1000, total_size="3000")
    )
    assert resp.status == 413 and "max_file_bytes" in (await resp.json())["detail"]
    for i in range(2):
        assert (
            await client.post("/upload-chunk", data=chunk_form("g", i, 3, b"x" * 1000))
        ).status == 200
    resp = await client.post("/upload-chunk", data=chunk_form("g", 2, 3, b"x" * 1000))
    assert resp.status == 413
    status = await (await client.get("/upload-status/g")).json()
    assert status["uploaded_chunks"] == 2


async def test_checksum_mismatch_is_422_and_discarded(client, config: Config) -> None:
    resp = await client.post(
        "/upload-chunk", data=chunk_form("s", 0, 2, b"abc", chunk_sha256=sha256(b"abd"))
    )
    assert resp.status == 422
    assert await resp.json() == {"detail": "Chunk checksum mismatch"}
    assert (await client.get("/upload-status/s")).status == 404
    resp = await client.post(
        "/upload-chunk", data=chunk_form("s", 0, 2, b"abc", chunk_sha256=sha256(b"abc"))
    )
    assert resp.status == 200
    assert temp_files(Path(config.data_dir)) == []


async def test_total_size_checked_against_merged_size(client) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("t", 0, 2, b"abc", total_size="10"))
    assert resp.status == 200
    resp = await client.post("/upload-chunk", data=chunk_form("t", 1, 2, b"abc", total_size="10"))
    assert resp.status == 409 and "total_size" in (await resp.json())["detail"]
    # the chunks are kept: resending the right bytes completes the upload
    resp = await client.post(
        "/upload-chunk", data=chunk_form("t", 1, 2, b"abcdefg", total_size="10")
    )
    assert (await resp.json())["status"] == "completed"


async def test_low_disk_is_507(make_client: ClientFactory, config: Config) -> None:
    client = await make_client(min_free_bytes=2**62)
    resp = await client.post("/upload-chunk", data=chunk_form("d", 0, 2, b"abc"))
    assert resp.status == 507
    assert await resp.json() == {"detail": "Chunk upload failed: disk space full"}
    assert temp_files(Path(config.data_dir)) == []


async def test_client_disconnect_mid_chunk_leaves_nothing(
    client, config: Config, request: pytest.FixtureRequest
) -> None:
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file_id"\r\n\r\ncut\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="chunk_index"\r\n\r\n0\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="total_chunks"\r\n\r\n2\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="filename"\r\n\r\nf\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="blob"\r\n\r\n'
    ).encode()
    _reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        b"POST /upload-chunk HTTP/1.1\r\nHost: x\r\n"
        + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
        + b"Content-Length: 10000000\r\n\r\n"
        + head
        + os.urandom(3_000_000)
    )
    await writer.drain()
    await asyncio.sleep(0.3)
    writer.close()
    data_dir = Path(config.data_dir)
    for _ in range(50):  # the server notices the cut when its next read fails
        if (await client.get("/upload-status/cut")).status == 404:
            break
        await asyncio.sleep(0.1)
    assert temp_files(data_dir) == []
    # the upload this chunk began is gone with it: nothing of the request remains
    assert (await client.get("/upload-status/cut")).status == 404
    if config.storage == "local":
        assert not (data_dir / "chunks" / "cut").exists()
    else:  # no object, staging object or multipart upload: S3's "nothing remains"
        assert s3_leftovers(request, config, "cut") == []
    # the server keeps serving
    resp = await client.post("/upload-chunk", data=chunk_form("cut", 0, 2, b"ok"))
    assert resp.status == 200


async def test_file_id_and_filename_cannot_escape(client, config: Config, tmp_path: Path) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("..", 0, 1, b"x"))
    assert resp.status == 400
    resp = await client.post(
        "/upload-chunk", data=chunk_form("esc", 0, 1, b"x", filename="../../evil")
    )
    assert resp.status == 400
    resp = await client.get("/upload-status/..%2F..%2Fetc")
    assert resp.status == 400  # the id, decoded, breaks the pattern
    # nothing named evil anywhere: not beside the data folder, not inside it
    assert list(tmp_path.rglob("evil*")) == []


@pytest.mark.local_only
async def test_a_storage_failure_answers_500_in_json_and_is_logged(
    client, config: Config, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def failing_disk(*args: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(local_receive, "pwritev_all", failing_disk)
    resp = await client.post("/upload-chunk", data=chunk_form("eio", 0, 1, b"abc"))
    assert resp.status == 500
    assert await resp.json() == {"detail": "Chunk upload failed: Input/output error"}
    failures = [r for r in caplog.records if r.getMessage().startswith("Storage failure")]
    assert failures and failures[0].exc_info is not None
    assert temp_files(Path(config.data_dir)) == []


async def test_metadata_is_fixed_by_the_first_chunk_and_returned(client) -> None:
    meta = json.dumps({"user": "42", "document": "Résumé"})
    resp = await client.post("/upload-chunk", data=chunk_form("m", 1, 3, b"b", metadata=meta))
    assert (await resp.json())["metadata"] == {"user": "42", "document": "Résumé"}
    # a chunk without it is fine; one with other metadata is a conflict
    resp = await client.post("/upload-chunk", data=chunk_form("m", 2, 3, b"c"))
    assert resp.status == 200
    other = json.dumps({"user": "43"})
    resp = await client.post("/upload-chunk", data=chunk_form("m", 0, 3, b"a", metadata=other))
    assert resp.status == 409 and "metadata" in (await resp.json())["detail"]
    status = await (await client.get("/upload-status/m")).json()
    assert status["status"] == "uploading" and status["metadata"]["user"] == "42"
    resp = await client.post("/upload-chunk", data=chunk_form("m", 0, 3, b"a", metadata=meta))
    body = await resp.json()
    assert body["status"] == "completed" and body["metadata"]["document"] == "Résumé"
    status = await (await client.get("/upload-status/m")).json()
    assert status["status"] == "completed" and status["metadata"]["user"] == "42"


async def test_metadata_given_by_a_later_chunk_is_taken(client) -> None:
    assert (await client.post("/upload-chunk", data=chunk_form("late", 1, 2, b"b"))).status == 200
    meta = json.dumps({"user": "7"})
    resp = await client.post("/upload-chunk", data=chunk_form("late", 0, 2, b"a", metadata=meta))
    assert (await resp.json())["metadata"] == {"user": "7"}
    # an upload without metadata answers without the key
    resp = await client.post("/upload-chunk", data=chunk_form("none", 0, 1, b"x"))
    assert "metadata" not in await resp.json()


@pytest.mark.parametrize(
    "value",
    ["not json", "[1, 2]", '{"n": 1}', '{"a": null}', '"text"', json.dumps({"k": "v" * 4100})],
)
async def test_bad_metadata_is_400(client, value: str) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("bad", 0, 1, b"x", metadata=value))
    assert (resp.status == 400 and "metadata" in (await resp.json())["detail"].lower()) or (
        "longer than" in (await resp.json())["detail"]
    )
    assert (await client.get("/upload-status/bad")).status == 404


def files_left(data_dir: Path) -> list[Path]:
    """Every file of uploads under the data folder, the trash included (not the process's
    own: metrics, the hook outbox, S3's scratch folder when empty)."""
    found = []
    for folder in ("chunks", "uploads"):
        for root, _, names in os.walk(data_dir / folder):
            found += [Path(root, name) for name in names]
    return found


@pytest.mark.parametrize(
    ("fields", "data", "status"),
    [
        ({"chunk_crc64nvme": crc64(b"other")}, b"x" * 1000, 422),
        ({"chunk_size": "1000"}, b"x" * 999, 409),
        ({}, b"x" * 1001, 413),
    ],
    ids=["checksum", "chunk_size", "max_chunk_bytes"],
)
async def test_a_refused_first_chunk_leaves_no_file_anywhere(
    make_client: ClientFactory,
    config: Config,
    fields: dict,
    data: bytes,
    status: int,
    request: pytest.FixtureRequest,
) -> None:
    """Nothing of a refused first chunk remains once it is answered: no upload folder, no
    data file reserved for total_size, nothing in the trash; on S3 no object, no staging
    object and no open multipart upload in the bucket."""
    client = await make_client(max_chunk_bytes=1000)
    form = chunk_form("refused", 0, 3, data, total_size="2500", **fields)
    resp = await client.post("/upload-chunk", data=form)
    assert resp.status == status, await resp.text()
    assert (await client.get("/upload-status/refused")).status == 404
    if config.storage == "local":
        assert files_left(Path(config.data_dir)) == []
    else:
        assert s3_leftovers(request, config, "refused") == []
