"""tus 1.0.0 under /tus/, request by request, on both backends (a real server, real sockets)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import socket
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from . import realstack
from .conftest import (
    ClientFactory,
    ServerProcess,
    chunk_form,
    crc64,
    downloaded,
    s3_flags,
    wait_until,
)

BOTH_BACKENDS = True  # each test runs on the local disk and on S3 (conftest.py)

MiB = 1024 * 1024
V = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


async def create(client, length: int | None, metadata: str | None = None, **headers: str):
    sent = dict(V)
    if length is None:
        sent["Upload-Defer-Length"] = "1"
    else:
        sent["Upload-Length"] = str(length)
    if metadata is not None:
        sent["Upload-Metadata"] = metadata
    sent.update(headers)
    resp = await client.post("/tus/", headers=sent)
    assert resp.status == 201, await resp.text()
    location = resp.headers["Location"]
    return resp, "/tus/" + location.rsplit("/tus/", 1)[1]


async def patch(client, path: str, offset: int, data: bytes, **headers: str):
    return await client.patch(
        path,
        data=io.BytesIO(data),  # aiohttp warns of bytes bodies over 1 MiB
        headers={**V, **OCTETS, "Upload-Offset": str(offset), **headers},
    )


async def head(client, path: str):
    return await client.head(path, headers=V)


async def status_of(client, path: str) -> dict[str, Any]:
    return await (await client.get("/upload-status/" + path.rsplit("/", 1)[1])).json()


async def test_options_tells_the_capabilities(make_client: ClientFactory) -> None:
    client = await make_client(max_file_bytes=5 * 1024**3)
    resp = await client.options("/tus/")
    assert resp.status == 204
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert resp.headers["Tus-Version"] == "1.0.0"
    assert set(resp.headers["Tus-Extension"].split(",")) == {
        "creation", "creation-with-upload", "creation-defer-length", "termination",
        "expiration", "checksum", "concatenation",
    }  # fmt: skip
    assert resp.headers["Tus-Max-Size"] == str(5 * 1024**3)
    assert set(resp.headers["Tus-Checksum-Algorithm"].split(",")) == {"sha1", "md5", "crc32"}


async def test_an_upload_in_patches_is_a_file_like_any_other(client) -> None:
    data = os.urandom(3 * MiB + 123)
    resp, path = await create(client, len(data), f"filename {b64('movie.mp4')},user {b64('42')}")
    assert resp.headers["Tus-Resumable"] == "1.0.0"
    assert "Upload-Expires" in resp.headers
    file_id = path.rsplit("/", 1)[1]
    offset = 0
    for piece in (data[:MiB], data[MiB : 2 * MiB + 7]):
        answer = await patch(client, path, offset, piece)
        assert answer.status == 204, await answer.text()
        offset += len(piece)
        assert answer.headers["Upload-Offset"] == str(offset)
        assert answer.headers["Tus-Resumable"] == "1.0.0"
    probe = await head(client, path)
    assert probe.status == 200
    assert probe.headers["Upload-Offset"] == str(offset)
    assert probe.headers["Upload-Length"] == str(len(data))
    assert probe.headers["Cache-Control"] == "no-store"
    assert probe.headers["Upload-Metadata"] == f"filename {b64('movie.mp4')},user {b64('42')}"
    assert await status_of(client, path) == {
        "status": "uploading",
        "file_exists": False,
        "file_id": file_id,
        "protocol": "tus",
        "offset": offset,
        "size": len(data),
        "filename": "movie.mp4",
        "metadata": {"filename": "movie.mp4", "user": "42"},
    }
    last = await patch(client, path, offset, data[offset:])
    assert last.status == 204 and last.headers["Upload-Offset"] == str(len(data))
    done = await status_of(client, path)
    assert done["status"] == "completed" and done["file_exists"] is True
    assert done["filename"] == "movie.mp4" and done["size"] == len(data)
    assert done["crc64nvme"] == crc64(data)
    assert await downloaded(client, file_id) == data
    probe = await head(client, path)
    assert probe.headers["Upload-Offset"] == probe.headers["Upload-Length"] == str(len(data))


async def test_creation_with_upload(client) -> None:
    data = os.urandom(200_000)
    resp = await client.post(
        "/tus/",
        data=data[:150_000],
        headers={**V, **OCTETS, "Upload-Length": str(len(data)), "Upload-Metadata": "name "
                 + b64("photo.jpg")},
    )  # fmt: skip
    assert resp.status == 201, await resp.text()
    assert resp.headers["Upload-Offset"] == "150000"
    path = "/tus/" + resp.headers["Location"].rsplit("/tus/", 1)[1]
    assert (await status_of(client, path))["filename"] == "photo.jpg"  # Uppy's `name`
    assert (await patch(client, path, 150_000, data[150_000:])).status == 204
    assert await downloaded(client, path.rsplit("/", 1)[1]) == data


async def test_creation_with_the_upload_type_and_no_body(client) -> None:
    """Content-Type of an upload but no body (schemathesis found it spinning the loop)."""
    resp = await client.post("/tus/", headers={**V, **OCTETS, "Upload-Length": "5"})
    assert resp.status == 201 and resp.headers["Upload-Offset"] == "0"
    assert (await client.get("/healthz")).status == 200


async def test_an_empty_upload_is_complete_at_once(client) -> None:
    resp, path = await create(client, 0, f"filename {b64('empty.txt')}")
    assert resp.headers["Upload-Offset"] == "0"
    done = await status_of(client, path)
    assert done["status"] == "completed" and done["size"] == 0
    assert await downloaded(client, path.rsplit("/", 1)[1]) == b""


async def test_deferred_length(client) -> None:
    data = os.urandom(300_000)
    _, path = await create(client, None, f"filename {b64('stream.log')}")
    probe = await head(client, path)
    assert probe.headers["Upload-Defer-Length"] == "1" and "Upload-Length" not in probe.headers
    assert (await patch(client, path, 0, data[:100_000])).status == 204
    assert "size" not in await status_of(client, path)
    last = await patch(client, path, 100_000, data[100_000:], **{"Upload-Length": str(len(data))})
    assert last.status == 204, await last.text()
    assert (await status_of(client, path))["status"] == "completed"
    assert await downloaded(client, path.rsplit("/", 1)[1]) == data


async def test_protocol_errors(client) -> None:
    _, path = await create(client, 10)
    wrong_offset = await patch(client, path, 3, b"abc")
    assert wrong_offset.status == 409 and wrong_offset.headers["Upload-Offset"] == "0"
    assert wrong_offset.headers["Tus-Resumable"] == "1.0.0"
    assert "detail" in await wrong_offset.json()
    wrong_type = await client.patch(
        path, data=b"abc", headers={**V, "Upload-Offset": "0", "Content-Type": "text/plain"}
    )
    assert wrong_type.status == 415
    old = await client.patch(
        path, data=b"abc", headers={"Tus-Resumable": "0.2.2", **OCTETS, "Upload-Offset": "0"}
    )
    assert old.status == 412 and old.headers["Tus-Version"] == "1.0.0"
    assert (await client.post("/tus/", headers=V)).status == 400  # no length at all
    too_long = await patch(client, path, 0, b"x" * 11)
    assert too_long.status == 413
    assert (await head(client, "/tus/nosuchupload")).status == 404
    assert (await patch(client, "/tus/nosuchupload", 0, b"x")).status == 404
    assert (await head(client, "/tus/bad.id")).status == 400
    no_offset = await client.patch(path, data=b"abc", headers={**V, **OCTETS})
    assert no_offset.status == 400
    # nothing of the refused requests was kept
    assert (await head(client, path)).headers["Upload-Offset"] == "0"


async def test_limits_apply(make_client: ClientFactory) -> None:
    client = await make_client(max_file_bytes=1000)
    resp = await client.post("/tus/", headers={**V, "Upload-Length": "1001"})
    assert resp.status == 413
    huge = await client.post("/tus/", headers={**V, "Upload-Length": str(10**29)})
    assert huge.status == 413  # over Tus-Max-Size, however many digits
    _, path = await create(client, None)
    assert (await patch(client, path, 0, b"x" * 1001)).status == 413


async def test_a_413_names_the_limit_passed(make_client: ClientFactory) -> None:
    """What tus-java-client and tus-android do: every PATCH chunked (no Content-Length). A
    body running past the upload's length is told as that length, not as max_chunk_bytes
    or max_file_bytes; past max_file_bytes (a deferred length) as max_file_bytes."""

    async def chunked(data: bytes):
        yield data

    client = await make_client(max_file_bytes=1000, max_chunk_bytes=4)
    _, path = await create(client, 100)
    resp = await client.patch(
        path, data=chunked(b"x" * 150), headers={**V, **OCTETS, "Upload-Offset": "0"}
    )
    assert resp.status == 413
    detail = (await resp.json())["detail"]
    assert "upload's length (100 bytes)" in detail, detail
    assert (await head(client, path)).headers["Upload-Offset"] == "0"
    _, deferred = await create(client, None)
    resp = await client.patch(
        deferred, data=chunked(b"x" * 1001), headers={**V, **OCTETS, "Upload-Offset": "0"}
    )
    assert resp.status == 413
    assert "max_file_bytes (1000 bytes)" in (await resp.json())["detail"]
    # The seed's chunks name max_chunk_bytes.
    resp = await client.post("/upload-chunk", data=chunk_form("limits", 0, 2, b"y" * 5))
    assert resp.status == 413
    assert "max_chunk_bytes (4 bytes)" in (await resp.json())["detail"]


async def expect_continue(client, head: str) -> bytes:
    """Send a request's head with `Expect: 100-continue` and no body; the first thing the
    server answers (within 5 s): a `100 Continue`, or a final answer."""
    url = client.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    try:
        writer.write(head.replace("\n", "\r\n").encode() + b"Expect: 100-continue\r\n\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    finally:
        writer.close()


async def test_100_continue_only_to_a_request_that_will_be_read(client) -> None:
    """A request refused from its headers alone gets its final answer without a 100 first
    (its client then never sends the body); one that will be read gets the 100."""
    _, path = await create(client, 10)
    patch_head = (
        "PATCH {path} HTTP/1.1\nHost: x\nTus-Resumable: {version}\n"
        "Content-Type: {type}\nUpload-Offset: {offset}\nContent-Length: {length}\n"
    )
    good = dict(path=path, version="1.0.0", type=OCTETS["Content-Type"], offset=0, length=4)
    refused = {
        "404": dict(good, path="/tus/nosuchupload"),
        "409": dict(good, offset=3),
        "412": dict(good, version="0.2.2"),
        "415": dict(good, type="text/plain"),
        "413": dict(good, length=11),
    }
    for status, fields in refused.items():
        first = await expect_continue(client, patch_head.format(**fields))
        assert first.startswith(f"HTTP/1.1 {status} ".encode()), (status, first)
    first = await expect_continue(client, patch_head.format(**good))
    assert first.startswith(b"HTTP/1.1 100 Continue"), first
    # The seed route: a chunk over max_chunk_bytes by its Content-Length, or not multipart.
    too_big = await expect_continue(
        client,
        "POST /upload-chunk HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; "
        "boundary=b\nContent-Length: 999999999999\n",
    )
    assert too_big.startswith(b"HTTP/1.1 413 "), too_big
    chunk = await expect_continue(
        client,
        "POST /upload-chunk HTTP/1.1\nHost: x\nContent-Type: multipart/form-data; "
        "boundary=b\nContent-Length: 100\n",
    )
    assert chunk.startswith(b"HTTP/1.1 100 Continue"), chunk


async def test_bad_metadata_and_filenames(client) -> None:
    bad = await client.post(
        "/tus/", headers={**V, "Upload-Length": "1", "Upload-Metadata": "filename !!!"}
    )
    assert bad.status == 400
    slash = await client.post(
        "/tus/", headers={**V, "Upload-Length": "1", "Upload-Metadata": "filename " + b64("a/b")}
    )
    assert slash.status == 400
    _, path = await create(client, 3, "flag")  # a key with no value
    status = await status_of(client, path)
    assert status["filename"] == path.rsplit("/", 1)[1]  # no filename given: the file_id
    assert status["metadata"] == {"flag": ""}


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [
        ("sha1", lambda d: hashlib.sha1(d).digest()),
        ("md5", lambda d: hashlib.md5(d).digest()),
        ("crc32", lambda d: zlib.crc32(d).to_bytes(4, "big")),
    ],
)
async def test_checksums(client, algorithm: str, digest) -> None:
    data = os.urandom(100_000)
    _, path = await create(client, len(data))
    good = base64.b64encode(digest(data[:60_000])).decode()
    bad = base64.b64encode(digest(b"something else")).decode()
    refused = await patch(
        client, path, 0, data[:60_000], **{"Upload-Checksum": f"{algorithm} {bad}"}
    )
    assert refused.status == 460
    assert (await head(client, path)).headers["Upload-Offset"] == "0"
    ok = await patch(client, path, 0, data[:60_000], **{"Upload-Checksum": f"{algorithm} {good}"})
    assert ok.status == 204 and ok.headers["Upload-Offset"] == "60000"
    assert (await patch(client, path, 60_000, data[60_000:])).status == 204
    assert await downloaded(client, path.rsplit("/", 1)[1]) == data


async def test_unknown_checksum_algorithm(client) -> None:
    _, path = await create(client, 3)
    resp = await patch(client, path, 0, b"abc", **{"Upload-Checksum": "sha256 AAAA"})
    assert resp.status == 400


async def test_x_http_method_override(client) -> None:
    """A client behind a proxy that passes only GET and POST (tus-js-client's
    overridePatchMethod) sends PATCH and DELETE as POST with X-HTTP-Method-Override."""
    _, path = await create(client, 6)
    patched = await client.post(
        path,
        data=b"abcdef",
        headers={**V, **OCTETS, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"},
    )
    assert patched.status == 204 and patched.headers["Upload-Offset"] == "6"
    assert await downloaded(client, path.rsplit("/", 1)[1]) == b"abcdef"
    bare = await client.post(path, headers=V)
    assert bare.status == 405 and "PATCH" in bare.headers["Allow"]
    # The header wins over any method (tus: MUST), GET and PUT included.
    for method in ("GET", "PUT"):
        probe = await client.request(method, path, headers={**V, "X-HTTP-Method-Override": "HEAD"})
        assert probe.status == 200 and probe.headers["Upload-Offset"] == "6", method
    deleted = await client.post(path, headers={**V, "X-HTTP-Method-Override": "DELETE"})
    assert deleted.status == 204
    assert (await head(client, path)).status == 404


async def test_termination(client) -> None:
    _, path = await create(client, 100)
    assert (await patch(client, path, 0, b"x" * 40)).status == 204
    assert (await client.delete(path, headers=V)).status == 204
    assert (await head(client, path)).status == 404
    assert (await status_of(client, path))["status"] == "not_found"
    assert (await client.delete(path, headers=V)).status == 404


async def test_concatenation(client) -> None:
    parts = [os.urandom(6 * MiB), os.urandom(300_000), os.urandom(5 * MiB + 1)]
    paths = []
    for data in parts:
        _, path = await create(client, len(data), None, **{"Upload-Concat": "partial"})
        assert (await head(client, path)).headers["Upload-Concat"] == "partial"
        assert (await patch(client, path, 0, data)).status == 204
        paths.append(path)
    resp = await client.post(
        "/tus/",
        headers={
            **V,
            "Upload-Concat": "final;" + " ".join(paths),
            "Upload-Metadata": f"filename {b64('joined.bin')}",
        },
    )
    assert resp.status == 201, await resp.text()
    final = "/tus/" + resp.headers["Location"].rsplit("/tus/", 1)[1]
    whole = b"".join(parts)
    probe = await head(client, final)
    assert probe.headers["Upload-Offset"] == probe.headers["Upload-Length"] == str(len(whole))
    assert probe.headers["Upload-Concat"] == "final;" + " ".join(paths)
    done = await status_of(client, final)
    assert done["status"] == "completed" and done["filename"] == "joined.bin"
    assert done["crc64nvme"] == crc64(whole)
    assert await downloaded(client, final.rsplit("/", 1)[1]) == whole


async def test_concatenation_urls_are_echoed_as_received(client) -> None:
    """tus: the final upload's Upload-Concat is answered as the client sent it (MUST), with
    absolute URLs or relative references of any form."""
    paths = []
    for data in (b"abc", b"def", b"ghi"):
        _, path = await create(client, 3, None, **{"Upload-Concat": "partial"})
        assert (await patch(client, path, 0, data)).status == 204
        paths.append(path)
    base = str(client.make_url("")).rstrip("/")
    forms = [
        base + paths[0],
        paths[1].removeprefix("/tus/"),
        "../tus/" + paths[2].removeprefix("/tus/"),
    ]
    header = "final;" + " ".join(forms)
    resp = await client.post("/tus/", headers={**V, "Upload-Concat": header})
    assert resp.status == 201, await resp.text()
    final = "/tus/" + resp.headers["Location"].rsplit("/tus/", 1)[1]
    assert (await head(client, final)).headers["Upload-Concat"] == header
    assert await downloaded(client, final.rsplit("/", 1)[1]) == b"abcdefghi"
    elsewhere = await client.post(
        "/tus/", headers={**V, "Upload-Concat": "final;http://elsewhere.example/tus/abc"}
    )
    assert elsewhere.status == 400


async def test_concatenation_refuses_incomplete_partials(client) -> None:
    _, path = await create(client, 10, None, **{"Upload-Concat": "partial"})
    resp = await client.post("/tus/", headers={**V, "Upload-Concat": "final;" + path})
    assert resp.status == 400
    missing = await client.post("/tus/", headers={**V, "Upload-Concat": "final;/tus/nosuch"})
    assert missing.status == 400


async def test_upload_chunk_refuses_a_tus_upload(client) -> None:
    _, path = await create(client, 6)
    file_id = path.rsplit("/", 1)[1]
    # Other bytes than the tus upload's own: a write-through would show in the file.
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, 0, 1, b"XXXXXX"))
    assert resp.status == 409
    assert (await head(client, path)).headers["Upload-Offset"] == "0"
    assert (await patch(client, path, 0, b"abcdef")).status == 204
    resp = await client.post("/upload-chunk", data=chunk_form(file_id, 0, 1, b"YYYYYY"))
    assert resp.status == 409
    assert await downloaded(client, file_id) == b"abcdef"


async def test_a_seed_upload_reads_as_complete_over_tus(client) -> None:
    resp = await client.post("/upload-chunk", data=chunk_form("seedfile", 0, 1, b"hello"))
    assert resp.status == 200
    probe = await head(client, "/tus/seedfile")
    assert probe.status == 200 and probe.headers["Upload-Offset"] == "5"


async def test_small_patches_make_parts(client) -> None:
    """1 MiB PATCHes: on S3 they are staged as tail pieces and joined into 5 MiB parts."""
    data = os.urandom(12 * MiB + 5)
    _, path = await create(client, len(data), f"filename {b64('big.bin')}")
    for offset in range(0, len(data), MiB):
        resp = await patch(client, path, offset, data[offset : offset + MiB])
        assert resp.status == 204, await resp.text()
    done = await status_of(client, path)
    assert done["status"] == "completed" and done["crc64nvme"] == crc64(data)
    assert await downloaded(client, path.rsplit("/", 1)[1]) == data


async def test_one_writer_at_a_time(client) -> None:
    """A second PATCH while the first is being received answers 423 (tus clients retry)."""
    _, path = await create(client, 2 * MiB)
    release = asyncio.Event()

    async def slow_body():
        yield b"a" * 1000
        await release.wait()
        yield b"b" * 1000

    first = asyncio.create_task(
        client.patch(
            path,
            data=slow_body(),
            headers={**V, **OCTETS, "Upload-Offset": "0", "Content-Length": "2000"},
        )
    )
    await asyncio.sleep(0.5)
    second = await patch(client, path, 0, b"c" * 10)
    assert second.status == 423
    release.set()
    answer = await first
    assert answer.status == 204 and answer.headers["Upload-Offset"] == "2000"


async def test_forwarded_location_only_from_trusted_proxies(make_client: ClientFactory) -> None:
    forwarded = {"X-Forwarded-Host": "uploads.example.com", "X-Forwarded-Proto": "https"}
    trusting = await make_client(trusted_proxies=("127.0.0.1",))
    resp = await trusting.post("/tus/", headers={**V, "Upload-Length": "1", **forwarded})
    assert resp.headers["Location"].startswith("https://uploads.example.com/tus/")
    plain = await make_client()
    resp = await plain.post("/tus/", headers={**V, "Upload-Length": "1", **forwarded})
    assert resp.headers["Location"].startswith("http://127.0.0.1:")


async def test_auth_and_cors(make_client: ClientFactory) -> None:
    client = await make_client(auth_tokens=("secret",), cors_origins=("*",))
    assert (await client.options("/tus/")).status == 204  # no token needed
    assert (await client.post("/tus/", headers={**V, "Upload-Length": "1"})).status == 401
    preflight = await client.options(
        "/tus/abc",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "PATCH",
            "Access-Control-Request-Headers": "tus-resumable,upload-offset,content-type",
        },
    )
    assert "PATCH" in preflight.headers["Access-Control-Allow-Methods"]
    auth = {"Authorization": "Bearer secret", "Origin": "http://app.example"}
    resp = await client.post("/tus/", headers={**V, "Upload-Length": "1", **auth})
    assert resp.status == 201
    exposed = resp.headers["Access-Control-Expose-Headers"]
    assert "Location" in exposed and "Upload-Offset" in exposed


def serve_args(backend: str, tmp_path: Path, request) -> list[str]:
    """`chunkserver serve` arguments for the backend under test."""
    if backend == "local":
        return []
    config = tmp_path / "s3.toml"
    config.write_text("\n".join(s3_flags(request.getfixturevalue("s3_settings"))) + "\n")
    return ["--config", str(config)]


def test_a_cut_patch_keeps_what_arrived(
    servers: Callable[..., ServerProcess], backend: str, tmp_path: Path, request
) -> None:
    """The client goes away mid-PATCH: the bytes received count (on S3, its whole parts),
    and the upload resumes from there. A real server process, as deployed (aiohttp's test
    server cancels the handler of a lost client, which a deployed server does not)."""
    server = servers(*serve_args(backend, tmp_path, request))
    data = os.urandom(12 * MiB)
    created = requests.post(f"{server.url}/tus/", headers={**V, "Upload-Length": str(len(data))})
    url = created.headers["Location"]
    path = "/tus/" + url.rsplit("/tus/", 1)[1]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            f"PATCH {path} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        raw.sendall(data[: 7 * MiB + 4321])
        time.sleep(1.0)
    expected = 7 * MiB + 4321 if backend == "local" else 5 * MiB
    for _ in range(100):
        offset = int(requests.head(url, headers=V, timeout=10).headers["Upload-Offset"])
        if offset == expected:
            break
        time.sleep(0.1)
    assert offset == expected
    resumed = requests.patch(
        url, data=data[offset:], headers={**V, **OCTETS, "Upload-Offset": str(offset)}
    )
    assert resumed.status_code == 204
    file_id = path.rsplit("/", 1)[1]
    done = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert done["status"] == "completed" and done["crc64nvme"] == crc64(data)
    assert requests.get(f"{server.url}/files/{file_id}", timeout=30).content == data


@pytest.mark.slow
def some_of_the_patch_stored(
    backend: str, data_dir: Path, file_id: str, data: bytes, request: pytest.FixtureRequest
) -> bool:
    """Whether the second PATCH is being stored: its first MiB read back from the data file;
    on S3, its writer lease taken in the upload's row."""
    if backend == "local":
        path = data_dir / "chunks" / file_id / ".data"
        with path.open("rb") as f:
            f.seek(5 * MiB)
            return f.read(MiB) == data[5 * MiB : 6 * MiB]
    database_url = request.getfixturevalue("s3_settings")["database_url"]
    return asyncio.run(holds_the_writer_lease(database_url, file_id))


async def run_out_the_writer_lease(database_url: str, file_id: str) -> None:
    """What 20 s would do to a dead writer's lease: its end in the past."""
    await realstack.fetchval(
        database_url,
        "UPDATE chunkserver_uploads SET stream_writer_until = 0 WHERE file_id = $1",
        file_id,
    )


async def holds_the_writer_lease(database_url: str, file_id: str) -> bool:
    """On S3 a PATCH being received holds its upload's writer lease (its row says so)."""
    sql = "SELECT stream_writer FROM chunkserver_uploads WHERE file_id = $1"
    return await realstack.fetchval(database_url, sql, file_id) is not None


def test_a_server_killed_mid_patch_loses_only_that_patch(
    servers: Callable[..., ServerProcess], backend: str, tmp_path: Path, request
) -> None:
    """SIGKILL while a PATCH streams: after a restart the offset is the last one committed
    (never a partial count), and the upload resumes and completes. On S3 the dead host's
    writer lease holds the upload a while: 423, which the client retries, as tus clients do."""
    args = serve_args(backend, tmp_path, request)
    data_dir = tmp_path / "data"
    server = servers(*args, data_dir=data_dir)
    data = os.urandom(12 * MiB)
    created = requests.post(f"{server.url}/tus/", headers={**V, "Upload-Length": str(len(data))})
    file_id = created.headers["Location"].rsplit("/", 1)[1]
    first = requests.patch(
        f"{server.url}/tus/{file_id}",
        data=data[: 5 * MiB],
        headers={**V, **OCTETS, "Upload-Offset": "0"},
        timeout=30,
    )
    assert first.status_code == 204
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(
            f"PATCH /tus/{file_id} HTTP/1.1\r\nHost: {host}\r\nTus-Resumable: 1.0.0\r\n"
            f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {5 * MiB}\r\n"
            f"Content-Length: {len(data) - 5 * MiB}\r\n\r\n".encode()
        )
        raw.sendall(data[5 * MiB : 11 * MiB])
        # The kill lands mid-PATCH: it is being stored (some of its bytes in the data file;
        # on S3 its writer lease taken), nothing of it committed.
        deadline = time.monotonic() + 20
        while not some_of_the_patch_stored(backend, data_dir, file_id, data, request):
            assert time.monotonic() < deadline, "the PATCH's bytes should be arriving"
            time.sleep(0.05)
        server.kill()
    again = servers(*args, data_dir=data_dir)
    url = f"{again.url}/tus/{file_id}"
    assert requests.head(url, headers=V, timeout=10).headers["Upload-Offset"] == str(5 * MiB)
    rest = requests.patch(
        url, data=data[5 * MiB :], headers={**V, **OCTETS, "Upload-Offset": str(5 * MiB)}
    )
    if backend == "s3":
        # The dead host's lease holds the upload until it runs out (20 s): the client is
        # told to retry later; the lease is then run out here rather than waited for.
        assert rest.status_code == 423, rest.text
        database_url = request.getfixturevalue("s3_settings")["database_url"]
        asyncio.run(run_out_the_writer_lease(database_url, file_id))
        rest = requests.patch(
            url, data=data[5 * MiB :], headers={**V, **OCTETS, "Upload-Offset": str(5 * MiB)}
        )
    assert rest.status_code == 204, rest.text
    done = requests.get(f"{again.url}/upload-status/{file_id}", timeout=10).json()
    assert done["status"] == "completed" and done["crc64nvme"] == crc64(data)
    assert requests.get(f"{again.url}/files/{file_id}", timeout=30).content == data


@pytest.mark.local_only
def test_workers_share_a_tus_upload(servers: Callable[..., ServerProcess], tmp_path: Path) -> None:
    """`--workers 2`: the PATCHes of one upload land on either process (a new connection
    each), which share the data folder; the writer lock and .offset.json are on disk."""
    server = servers("--workers", "2")
    data = os.urandom(8 * MiB + 3)
    created = requests.post(f"{server.url}/tus/", headers={**V, "Upload-Length": str(len(data))})
    url = created.headers["Location"]
    for offset in range(0, len(data), 256 * 1024):
        piece = data[offset : offset + 256 * 1024]
        with requests.Session() as fresh:  # a new connection: either worker may take it
            resp = fresh.patch(
                url, data=piece, headers={**V, **OCTETS, "Upload-Offset": str(offset)}
            )
        assert resp.status_code == 204, resp.text
    file_id = url.rsplit("/", 1)[1]
    done = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert done["status"] == "completed" and done["crc64nvme"] == crc64(data)

    # "<date> <time> <pid> INFO chunkserver.access: ... PATCH ...": both workers took some
    def pids() -> set[str]:
        return {line.split()[2] for line in server.output if '"PATCH /tus/' in line}

    wait_until(lambda: len(pids()) == 2, "PATCHes in both workers' access logs")
    assert len(pids()) == 2, pids()


@pytest.mark.local_only
def test_an_upload_ended_by_another_process_is_seen_at_the_next_patch(
    servers: Callable[..., ServerProcess], tmp_path: Path
) -> None:
    """A process that knows an upload (its manifest) sees its removal or completion by
    another process of the same data folder at the next PATCH."""
    data_dir = tmp_path / "shared"
    a, b = servers(data_dir=data_dir), servers(data_dir=data_dir)
    for ending in ("delete", "complete"):
        created = requests.post(f"{a.url}/tus/", headers={**V, "Upload-Length": "6"})
        file_id = created.headers["Location"].rsplit("/", 1)[1]
        first = requests.patch(
            f"{a.url}/tus/{file_id}", data=b"abc", headers={**V, **OCTETS, "Upload-Offset": "0"}
        )
        assert first.status_code == 204  # a now holds the upload in its manifest
        if ending == "delete":
            assert requests.delete(f"{b.url}/tus/{file_id}", headers=V).status_code == 204
        else:
            done = requests.patch(
                f"{b.url}/tus/{file_id}", data=b"def", headers={**V, **OCTETS, "Upload-Offset": "3"}
            )
            assert done.status_code == 204
        again = requests.patch(
            f"{a.url}/tus/{file_id}", data=b"def", headers={**V, **OCTETS, "Upload-Offset": "3"}
        )
        assert again.status_code == (404 if ending == "delete" else 409)
        if ending == "complete":
            assert again.headers["Upload-Offset"] == "6"


@pytest.mark.local_only
def test_a_concatenation_is_typed_in_memory_and_text_in_records() -> None:
    """UploadMeta.concat is a Concatenation (a part, or a final and its parts in order),
    kept as the text records held before it was typed, and read back from either form."""
    from chunkserver.errors import BadRequest
    from chunkserver.model import PARTIAL, Concatenation, UploadMeta

    final = Concatenation.parse("final;/tus/a http://h/tus/b")
    assert final.final and final.parts == ("/tus/a", "http://h/tus/b") and not final.by_id
    assert str(final) == "final;/tus/a http://h/tus/b"
    older = Concatenation.parse("final o1~a o1~b")  # a record of an earlier version: ids
    assert older.by_id and older.parts == ("o1~a", "o1~b") and str(older) == "final o1~a o1~b"
    assert Concatenation.parse("partial") is PARTIAL and str(PARTIAL) == "partial"
    with pytest.raises(BadRequest):
        Concatenation.parse("both")
    meta = UploadMeta.new_stream("f", "f.bin", None, None, final)
    record = json.loads(json.dumps(meta.stored()))
    assert record["concat"] == "final;/tus/a http://h/tus/b" and record["protocol"] == "tus"
    again = UploadMeta(**record)
    assert again == meta and again.is_final and not again.is_partial
