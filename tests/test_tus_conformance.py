"""tus 1.0.0's MUSTs that real clients rely on, on both backends: bodies without
Content-Length (tus-java-client's chunked PATCH), refused requests that change nothing,
concatenation's headers and parts, the method override on every route."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from pathlib import Path

import pytest

from chunkserver import Config

from .conftest import ClientFactory, crc64, downloaded
from .reference import metric_value
from .test_tus import OCTETS, V, create, head, patch, status_of

BOTH_BACKENDS = True
MiB = 1024 * 1024


async def raw_request(client, head_lines: list[str], chunks: list[bytes]) -> tuple[int, str]:
    """An HTTP/1.1 request with a chunked body, as Java's HttpURLConnection sends it in
    chunked streaming mode with `Expect: 100-continue`: the headers, then (after the 100
    Continue) the body in chunks. Returns the final status and the answer's head."""
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    head = "\r\n".join(
        [*head_lines, f"Host: {client.server.host}", "Transfer-Encoding: chunked",
         "Expect: 100-continue", "Connection: close"]
    )  # fmt: skip
    writer.write(head.encode() + b"\r\n\r\n")
    await writer.drain()
    interim = await reader.readuntil(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 100"), interim
    for chunk in chunks:
        writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
    writer.write(b"0\r\n\r\n")
    await writer.drain()
    answer = (await reader.readuntil(b"\r\n\r\n")).decode()
    writer.close()
    return int(answer.split()[1]), answer


def tus_lines(method: str, path: str, **headers: str) -> list[str]:
    sent = {**V, **headers}
    return [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in sent.items())]


async def test_a_patch_without_content_length_as_tus_java_client_sends_it(client) -> None:
    data = os.urandom(3 * MiB + 5)
    _, path = await create(client, len(data))
    pieces = [data[i : i + 65536] for i in range(0, 2 * MiB, 65536)]
    status, answer = await raw_request(
        client,
        tus_lines("PATCH", path, **OCTETS, **{"Upload-Offset": "0"}),
        pieces,
    )
    assert status == 204 and f"Upload-Offset: {2 * MiB}" in answer, answer
    status, answer = await raw_request(
        client,
        tus_lines("PATCH", path, **OCTETS, **{"Upload-Offset": str(2 * MiB)}),
        [data[2 * MiB :]],
    )
    assert status == 204, answer
    done = await status_of(client, path)
    assert done["status"] == "completed" and done["crc64nvme"] == crc64(data)
    assert await downloaded(client, path.rsplit("/", 1)[1]) == data


async def test_creation_with_upload_without_content_length(client) -> None:
    data = os.urandom(100_000)
    status, answer = await raw_request(
        client,
        tus_lines("POST", "/tus/", **OCTETS, **{"Upload-Length": str(len(data))}),
        [data[:50_000], data[50_000:]],
    )
    assert status == 201 and "Upload-Offset: 100000" in answer, answer
    location = next(line for line in answer.split("\r\n") if line.startswith("Location:"))
    file_id = location.rsplit("/", 1)[1]
    assert await downloaded(client, file_id) == data


async def test_a_chunked_body_past_the_length_is_413_and_changes_nothing(client) -> None:
    _, path = await create(client, 1000)
    status, _ = await raw_request(
        client, tus_lines("PATCH", path, **OCTETS, **{"Upload-Offset": "0"}), [b"x" * 1500]
    )
    assert status == 413
    assert (await head(client, path)).headers["Upload-Offset"] == "0"
    assert (await patch(client, path, 0, b"y" * 1000)).status == 204


async def test_a_seed_chunk_without_content_length(client) -> None:
    boundary = "javaBoundary"
    fields = {"file_id": "chunked", "chunk_index": "0", "total_chunks": "1", "filename": "c.bin"}
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    )
    data = os.urandom(200_000)
    body += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="c"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    lines = [
        "POST /upload-chunk HTTP/1.1",
        f"Content-Type: multipart/form-data; boundary={boundary}",
    ]
    status, _ = await raw_request(
        client, lines, [body[i : i + 8192] for i in range(0, len(body), 8192)]
    )
    assert status == 200
    assert await downloaded(client, "chunked") == data


async def test_concatenation_headers_and_parts(make_client: ClientFactory) -> None:
    client = await make_client()
    parts = [os.urandom(300_000), os.urandom(200_000)]
    paths = []
    for data in parts:
        _, path = await create(client, len(data), None, **{"Upload-Concat": "partial"})
        assert (await patch(client, path, 0, data)).status == 204
        assert (await head(client, path)).headers["Upload-Concat"] == "partial"  # complete
        assert (await client.get("/files/" + path.rsplit("/", 1)[1])).status == 404
        paths.append(path)
    final_headers = {**V, "Upload-Concat": "final;" + " ".join(paths)}
    with_length = await client.post("/tus/", headers={**final_headers, "Upload-Length": "9"})
    assert with_length.status == 400
    other_host = "final;http://elsewhere.example/tus/" + paths[0].rsplit("/", 1)[1]
    assert (await client.post("/tus/", headers={**V, "Upload-Concat": other_host})).status == 400
    resp = await client.post("/tus/", headers=final_headers)
    assert resp.status == 201, await resp.text()
    final = "/tus/" + resp.headers["Location"].rsplit("/tus/", 1)[1]
    probe = await head(client, final)
    assert probe.headers["Upload-Concat"] == "final;" + " ".join(paths)
    assert (await patch(client, final, 500_000, b"")).status == 403
    assert (await patch(client, final, 500_000, b"more")).status == 403
    assert await downloaded(client, final.rsplit("/", 1)[1]) == b"".join(parts)
    metrics = await (await client.get("/metrics")).text()
    # the final, not its parts
    assert metric_value(metrics, "chunkserver_uploads_completed_total") == 1
    # neither a final nor a whole (non-partial) upload can be a part
    _, whole = await create(client, 3)
    assert (await patch(client, whole, 0, b"abc")).status == 204
    for part in (final, whole):
        again = await client.post("/tus/", headers={**V, "Upload-Concat": f"final;{part}"})
        assert again.status == 400, await again.text()


async def test_refused_patches_change_nothing(client) -> None:
    _, path = await create(client, None)
    assert (await patch(client, path, 0, b"a" * 100)).status == 204
    wrong_offset = await patch(client, path, 50, b"b" * 10, **{"Upload-Length": "200"})
    assert wrong_offset.status == 409 and wrong_offset.headers["Upload-Offset"] == "100"
    digest = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    mismatch = await patch(
        client,
        path,
        100,
        b"b" * 10,
        **{"Upload-Length": "200", "Upload-Checksum": f"sha1 {digest}"},
    )
    assert mismatch.status == 460 and mismatch.reason == "Checksum Mismatch"
    below = await patch(client, path, 100, b"", **{"Upload-Length": "50"})
    assert below.status == 413
    probe = await head(client, path)
    assert probe.headers["Upload-Defer-Length"] == "1" and probe.headers["Upload-Offset"] == "100"
    last = await patch(client, path, 100, b"c" * 100, **{"Upload-Length": "200"})
    assert last.status == 204 and last.headers["Upload-Offset"] == "200"
    assert await downloaded(client, path.rsplit("/", 1)[1]) == b"a" * 100 + b"c" * 100


async def test_a_wrong_offset_is_told_before_a_body_past_the_length(client) -> None:
    _, path = await create(client, 100)
    assert (await patch(client, path, 0, b"a" * 40)).status == 204
    resp = await patch(client, path, 10, b"b" * 95)  # ends past 100, and the offset is wrong
    assert resp.status == 409 and resp.headers["Upload-Offset"] == "40"


async def test_an_empty_or_malformed_digest_is_400(client) -> None:
    _, path = await create(client, 3)
    for header in ("sha1 ", "sha1 YWJj"):  # empty; base64 of 3 bytes, not SHA-1's 20
        resp = await patch(client, path, 0, b"abc", **{"Upload-Checksum": header})
        assert resp.status == 400, (header, await resp.text())


async def test_the_method_override_wins_on_every_route(client) -> None:
    _, path = await create(client, 6)
    assert (await patch(client, path, 0, b"abc")).status == 204
    as_head = await client.post(path, headers={**V, "X-HTTP-Method-Override": "HEAD"})
    assert as_head.status == 200 and as_head.headers["Upload-Offset"] == "3"
    as_delete = await client.patch(path, headers={**V, "X-HTTP-Method-Override": "DELETE"})
    assert as_delete.status == 204
    assert (await head(client, path)).status == 404
    as_options = await client.post("/tus/", headers={"X-HTTP-Method-Override": "OPTIONS"})
    assert as_options.status == 204 and as_options.headers["Tus-Version"] == "1.0.0"


async def test_a_refused_creation_with_upload_leaves_nothing(
    make_client: ClientFactory, config: Config
) -> None:
    client = await make_client(max_file_bytes=10 * MiB)
    digest = base64.b64encode(hashlib.sha1(b"other").digest()).decode()
    refused = [
        (460, {"Upload-Length": str(8 * MiB), "Upload-Checksum": f"sha1 {digest}"}),
        (413, {"Upload-Length": "10"}),  # and a body of 20 bytes
    ]
    for status, headers in refused:
        resp = await client.post("/tus/", data=b"x" * 20, headers={**V, **OCTETS, **headers})
        assert resp.status == status, await resp.text()
        assert "Location" not in resp.headers
    metrics = await (await client.get("/metrics")).text()
    assert metric_value(metrics, "chunkserver_uploads_in_progress") == 0
    if config.storage == "local":
        chunks = Path(config.data_dir) / "chunks"
        assert sorted(p.name for p in chunks.iterdir()) == [".incoming", ".trash"]


@pytest.mark.local_only
async def test_a_creation_refused_for_disk_space_says_so(make_client: ClientFactory) -> None:
    client = await make_client(min_free_bytes=2**62)
    resp = await client.post("/tus/", headers={**V, "Upload-Length": "10"})
    assert resp.status == 507 and resp.headers["Retry-After"]
    detail = (await resp.json())["detail"]
    assert "disk space" in detail and "Chunk" not in detail
