"""Resumable Uploads for HTTP (the IETF draft) under /resumable/, over raw HTTP, following the
draft's own examples: creation with and without content, offset retrieval, append,
completion, cancellation, each error, with the current revision's interop version (9, draft
-12), with -11's (8), with none, and with the older ones that clients send (3, 5, 6)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import socket
from urllib.parse import urlsplit

import pytest

BOTH_BACKENDS = True
PARTIAL = "application/partial-upload"
V8 = {"Upload-Draft-Interop-Version": "8"}
V9 = {"Upload-Draft-Interop-Version": "9"}
PROBLEMS = "https://iana.org/assignments/http-problem-types#"


def sha256_field(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


async def create(client, body: bytes = b"", **headers: str):
    return await client.post("/resumable/", data=body, headers=headers)


def path_of(resp) -> str:
    return urlsplit(resp.headers["Location"]).path


async def append(
    client, path: str, body: bytes | io.BytesIO, offset: int, complete: bool, **headers: str
):
    sent = {
        "Content-Type": PARTIAL,
        "Upload-Offset": str(offset),
        "Upload-Complete": "?1" if complete else "?0",
        **headers,
    }
    return await client.patch(path, data=body, headers=sent)


async def downloaded(client, path: str) -> bytes:
    resp = await client.get("/files/" + path.rsplit("/", 1)[1])
    assert resp.status == 200
    return await resp.read()


@pytest.mark.parametrize(
    "interop", [V9, V8, {}], ids=["interop-9", "interop-8", "no-interop-version"]
)
async def test_example_2_upload_as_a_series_of_parts(client, interop) -> None:
    created = await create(client, b"hello ", **{"Upload-Complete": "?0"}, **interop)
    assert created.status == 201
    assert created.headers["Upload-Complete"] == "?0"
    assert created.headers["Upload-Offset"] == "6"
    assert "max-size=" in created.headers["Upload-Limit"]
    path = path_of(created)
    assert path.startswith("/resumable/")
    middle = await append(client, path, b"resumable ", 6, False, **interop)
    assert middle.status == 204 and middle.headers["Upload-Complete"] == "?0"
    assert middle.headers["Upload-Offset"] == "16"
    probe = await client.head(path, headers=interop)
    assert probe.status == 204
    assert probe.headers["Upload-Offset"] == "16"
    assert probe.headers["Upload-Complete"] == "?0"
    assert probe.headers["Cache-Control"] == "no-store"
    assert "Upload-Length" not in probe.headers  # not told yet
    assert "max-age=" in probe.headers["Upload-Limit"]
    last = await append(client, path, b"world", 16, True, **interop)
    assert last.status == 200 and last.headers["Upload-Complete"] == "?1"
    answer = await last.json()
    assert answer["status"] == "completed" and answer["size"] == 21
    done = await client.head(path, headers=interop)
    assert done.headers["Upload-Complete"] == "?1"
    assert done.headers["Upload-Length"] == "21"
    assert await downloaded(client, path) == b"hello resumable world"
    status = await (await client.get("/upload-status/" + path.rsplit("/", 1)[1])).json()
    assert status["status"] == "completed"


async def test_example_1_the_whole_file_in_the_creation(client) -> None:
    body = b"x" * 100_000
    resp = await create(
        client, body, **{"Upload-Complete": "?1", "Upload-Length": str(len(body))}, **V8
    )
    assert resp.status == 200
    assert resp.headers["Upload-Complete"] == "?1"
    assert resp.headers["Content-Type"] == "application/json"
    assert (await resp.json())["size"] == len(body)
    assert await downloaded(client, path_of(resp)) == body


async def test_creation_without_content_then_appends_with_a_known_length(client) -> None:
    created = await create(client, **{"Upload-Complete": "?0", "Upload-Length": "8"}, **V8)
    assert created.status == 201 and created.headers["Upload-Offset"] == "0"
    path = path_of(created)
    probe = await client.head(path)
    assert probe.headers["Upload-Length"] == "8" and probe.headers["Upload-Offset"] == "0"
    # Every byte sent, yet not said complete: the upload stays incomplete until it is.
    await append(client, path, b"12345678", 0, False)
    probe = await client.head(path)
    assert probe.headers["Upload-Offset"] == "8" and probe.headers["Upload-Complete"] == "?0"
    done = await append(client, path, b"", 8, True)
    assert done.status == 200 and done.headers["Upload-Complete"] == "?1"
    assert await downloaded(client, path) == b"12345678"


async def test_status_says_the_protocol(client) -> None:
    created = await create(client, b"ab", **{"Upload-Complete": "?0", "Upload-Length": "4"})
    file_id = path_of(created).rsplit("/", 1)[1]
    status = await (await client.get(f"/upload-status/{file_id}")).json()
    assert status == {
        "status": "uploading", "file_exists": False, "file_id": file_id, "protocol": "ietf",
        "offset": 2, "size": 4, "filename": file_id,
    }  # fmt: skip


async def test_a_mismatching_offset_is_409_with_the_right_one(client) -> None:
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0"}))
    resp = await append(client, path, b"zz", 7, False)
    assert resp.status == 409
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert resp.headers["Upload-Offset"] == "3" and resp.headers["Upload-Complete"] == "?0"
    problem = await resp.json()
    assert problem["type"] == PROBLEMS + "mismatching-upload-offset"
    assert problem["expected-offset"] == 3 and problem["provided-offset"] == 7
    assert (await client.head(path)).headers["Upload-Offset"] == "3"


async def test_a_mismatching_offset_is_told_before_an_inconsistent_length(client) -> None:
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0", "Upload-Length": "9"}))
    resp = await append(client, path, b"zz", 1, True)  # ends at 3, not 9, and at a wrong offset
    assert resp.status == 409


async def test_inconsistent_lengths_are_400_problems(client) -> None:
    resp = await create(client, b"abcd", **{"Upload-Complete": "?1", "Upload-Length": "9"})
    assert resp.status == 400
    assert (await resp.json())["type"] == PROBLEMS + "inconsistent-upload-length"
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0", "Upload-Length": "9"}))
    resp = await append(client, path, b"zz", 3, False, **{"Upload-Length": "10"})
    assert resp.status == 400
    assert (await resp.json())["type"] == PROBLEMS + "inconsistent-upload-length"
    resp = await append(client, path, b"zz", 3, True)  # completes at 5, the length is 9
    assert resp.status == 400
    assert (await resp.json())["type"] == PROBLEMS + "inconsistent-upload-length"
    assert (await client.head(path)).headers["Upload-Offset"] == "3"  # nothing of it kept


async def test_bytes_past_the_length_are_refused(client) -> None:
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0", "Upload-Length": "4"}))
    resp = await append(client, path, b"zz", 3, False)
    assert resp.status == 413
    assert resp.headers["Upload-Limit"].startswith("max-size=")
    assert (await client.head(path)).headers["Upload-Offset"] == "3"


async def test_appending_to_a_completed_upload(client) -> None:
    resp = await create(client, b"done", **{"Upload-Complete": "?1"})
    path = path_of(resp)
    more = await append(client, path, b"more", 4, True)
    assert more.status == 400
    assert (await more.json())["type"] == PROBLEMS + "completed-upload"
    # The final answer lost and asked again (nothing added): replayed.
    again = await append(client, path, b"", 4, True)
    assert again.status == 200 and again.headers["Upload-Complete"] == "?1"
    assert await downloaded(client, path) == b"done"


async def test_cancellation(client) -> None:
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0"}))
    assert (await client.delete(path)).status == 204
    gone = await client.head(path)
    assert gone.status == 404
    resp = await append(client, path, b"d", 3, False)
    assert resp.status == 404
    assert resp.headers["Content-Type"] == "application/problem+json"
    assert (await client.delete(path)).status == 404


async def test_requests_the_draft_requires_fields_of(client) -> None:
    missing_complete = await client.post("/resumable/", data=b"x")
    assert missing_complete.status == 400
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0"}))
    no_type = await client.patch(
        path, data=b"d", headers={"Upload-Offset": "3", "Upload-Complete": "?0", **V8}
    )
    assert no_type.status == 415
    no_offset = await client.patch(
        path, data=b"d", headers={"Content-Type": PARTIAL, "Upload-Complete": "?0"}
    )
    assert no_offset.status == 400
    no_flag = await client.patch(
        path, data=b"d", headers={"Content-Type": PARTIAL, "Upload-Offset": "3"}
    )
    assert no_flag.status == 400
    # A version not served (2 is draft -00's) is answered by the current rules, unechoed.
    unserved = await create(client, **{"Upload-Complete": "?0"}, **{
        "Upload-Draft-Interop-Version": "2"})  # fmt: skip
    assert unserved.status == 201
    assert "Upload-Draft-Interop-Version" not in unserved.headers
    assert (await client.head("/resumable/not*an*id")).status == 400
    assert (await client.head(path)).headers["Upload-Offset"] == "3"


async def test_a_repr_digest_from_any_request_is_checked_at_completion(client) -> None:
    """The digest given on the creating request (or on a middle append) is kept with the
    upload and checked when a later request completes it without repeating it."""
    given = {"Repr-Digest": sha256_field(b"hello WORLD")}
    path = path_of(await create(client, b"hello ", **{"Upload-Complete": "?0"}, **given))
    done = await append(client, path, b"world", 6, True)
    assert done.status == 400 and "Repr-Digest" in (await done.json())["detail"]
    assert (await client.head(path)).status == 404  # removed: resuming cannot mend it
    right = {"Repr-Digest": sha256_field(b"hello world")}
    path = path_of(await create(client, b"hello ", **{"Upload-Complete": "?0"}, **right))
    done = await append(client, path, b"world", 6, True)
    assert done.status == 200 and await downloaded(client, path) == b"hello world"
    # Given on a middle append; another digest later is refused before its bytes count.
    path = path_of(await create(client, b"ab", **{"Upload-Complete": "?0"}))
    assert (await append(client, path, b"cd", 2, False, **given)).status == 204
    other = await append(client, path, b"ef", 4, False, **right)
    assert other.status == 400
    assert (await client.head(path)).headers["Upload-Offset"] == "4"
    assert (await append(client, path, b"ef", 4, True)).status == 400


async def test_options_announces_the_limits(client) -> None:
    resp = await client.options("/resumable/")
    assert resp.status == 204
    assert resp.headers["Upload-Limit"].startswith("max-size=")
    assert resp.headers["Accept-Patch"] == PARTIAL


async def test_digests_are_checked_and_a_mismatch_keeps_nothing(client) -> None:
    path = path_of(await create(client, b"abc", **{"Upload-Complete": "?0"}))
    good = await append(client, path, b"def", 3, False, **{"Content-Digest": sha256_field(b"def")})
    assert good.status == 204
    bad = await append(client, path, b"ghi", 6, False, **{"Content-Digest": sha256_field(b"xyz")})
    assert bad.status == 400
    assert "Content-Digest" in (await bad.json())["detail"]
    assert (await client.head(path)).headers["Upload-Offset"] == "6"
    # Repr-Digest on the request that carries the whole representation.
    whole = b"the whole file"
    refused = await create(client, whole, **{"Upload-Complete": "?1",
                                             "Repr-Digest": sha256_field(b"another file")})  # fmt: skip
    assert refused.status == 400
    accepted = await create(
        client, whole, **{"Upload-Complete": "?1", "Repr-Digest": sha256_field(whole)}
    )
    assert accepted.status == 200
    # Repr-Digest with the append that completes an upload begun earlier: read back.
    last = await append(
        client, path, b"ghi", 6, True, **{"Repr-Digest": sha256_field(b"abcdefghi")}
    )
    assert last.status == 200
    other = path_of(await create(client, b"abc", **{"Upload-Complete": "?0"}))
    wrong = await append(client, other, b"def", 3, True, **{"Repr-Digest": sha256_field(b"x")})
    assert wrong.status == 400
    assert (await client.head(other)).status == 404  # removed: resuming cannot mend it
    # Algorithms the server does not compute are ignored, as RFC 9530 allows.
    sha512 = f"sha-512=:{base64.b64encode(hashlib.sha512(b'j').digest()).decode()}:"
    fine = await create(client, b"j", **{"Upload-Complete": "?1", "Content-Digest": sha512})
    assert fine.status == 200


async def test_filename_from_content_disposition_and_upload_metadata(client) -> None:
    resp = await create(client, b"a", **{
        "Upload-Complete": "?1",
        "Content-Disposition": "inline; filename=\"file name.jpg\"; filename*=UTF-8''f%C3%BC.jpg",
    })  # fmt: skip
    assert (await resp.json())["filename"] == "fü.jpg"
    meta = base64.b64encode(b"movie.bin").decode()
    resp = await create(
        client, b"a", **{"Upload-Complete": "?1", "Upload-Metadata": f"filename {meta}"}
    )
    answer = await resp.json()
    assert answer["filename"] == "movie.bin" and answer["metadata"] == {"filename": "movie.bin"}


@pytest.mark.parametrize("version", ["5", "6"])
async def test_interop_versions_of_tus_js_client(client, version: str) -> None:
    headers = {"Upload-Draft-Interop-Version": version}
    created = await create(
        client, b"ab", **{"Upload-Complete": "?0", "Upload-Length": "4"}, **headers
    )
    assert created.headers["Upload-Draft-Interop-Version"] == version
    path = path_of(created)
    if version == "5":  # -03: an append has no media type of its own
        resp = await client.patch(path, data=b"cd", headers={
            "Upload-Offset": "2", "Upload-Complete": "?1", **headers})  # fmt: skip
    else:
        resp = await append(client, path, b"cd", 2, True, **headers)
    assert resp.status == 200 and resp.headers["Upload-Complete"] == "?1"
    assert await downloaded(client, path) == b"abcd"


async def test_structured_field_parameters_are_ignored(client) -> None:
    """RFC 9651: an Item may carry parameters, which a recipient ignores; the same for
    Upload-Offset, Upload-Complete and Upload-Length."""
    created = await create(
        client, b"ab", **{"Upload-Complete": "?0;a", "Upload-Length": "4;x", **V8}
    )
    assert created.status == 201 and created.headers["Upload-Length"] == "4"
    path = path_of(created)
    resp = await client.patch(path, data=b"cd", headers={
        "Content-Type": PARTIAL, "Upload-Offset": "2;x=1", "Upload-Complete": '?1;note="z"',
        **V8})  # fmt: skip
    assert resp.status == 200, await resp.text()
    assert await downloaded(client, path) == b"abcd"


async def test_errors_name_what_the_client_sent(client) -> None:
    """A creation's content past its length is told as such, not as a PATCH; an unknown id is
    "no upload", not "no tus upload"."""
    resp = await create(client, b"abcdef", **{"Upload-Complete": "?0", "Upload-Length": "4"})
    assert resp.status == 413
    detail = (await resp.json())["detail"]
    assert "PATCH" not in detail and "length (4 bytes)" in detail, detail
    resp = await append(client, "/resumable/nosuchupload", b"x", 0, False)
    assert resp.status == 404
    assert "tus" not in (await resp.json())["detail"]


async def test_interop_version_3_speaks_upload_incomplete(client) -> None:
    """What iOS 17's URLSession sends: Upload-Incomplete, the opposite of Upload-Complete."""
    v3 = {"Upload-Draft-Interop-Version": "3"}
    created = await create(client, b"ab", **{"Upload-Incomplete": "?1"}, **v3)
    assert created.status == 201 and created.headers["Upload-Incomplete"] == "?1"
    path = path_of(created)
    probe = await client.head(path, headers=v3)
    assert probe.headers["Upload-Incomplete"] == "?1" and probe.headers["Upload-Offset"] == "2"
    done = await client.patch(path, data=b"cd", headers={
        "Upload-Offset": "2", "Upload-Incomplete": "?0", **v3})  # fmt: skip
    assert done.status == 200 and done.headers["Upload-Incomplete"] == "?0"
    assert await downloaded(client, path) == b"abcd"


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send one request on a socket of its own; everything the server answers until it
    closes (Connection: close)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(request)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return received


async def test_104_comes_first_with_the_location(client) -> None:
    """Raw HTTP/1.1, as the draft's example A: the interim answer, then the final one with the
    same Location."""
    base = str(client.make_url("/"))
    body = b"0123456789"
    request = (
        b"POST /resumable/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Upload-Draft-Interop-Version: 8\r\nUpload-Complete: ?1\r\n"
        b"Content-Length: 10\r\n\r\n" + body
    )
    import asyncio

    answer = await asyncio.to_thread(raw_exchange, base, request)
    interim, _, final = answer.partition(b"\r\n\r\n")
    assert interim.startswith(b"HTTP/1.1 104 Upload Resumption Supported\r\n")
    interim_headers = dict(line.split(b": ", 1) for line in interim.split(b"\r\n")[1:])
    assert interim_headers[b"Upload-Draft-Interop-Version"] == b"8"
    assert final.startswith(b"HTTP/1.1 200 OK\r\n")
    location = interim_headers[b"Location"]
    assert b"Location: " + location in final
    assert json.loads(final.partition(b"\r\n\r\n")[2])["size"] == 10
    # The current revision's version (9, draft -12) is served and echoed.
    current = request.replace(b"Interop-Version: 8", b"Interop-Version: 9")
    answer = await asyncio.to_thread(raw_exchange, base, current)
    assert answer.startswith(b"HTTP/1.1 104 Upload Resumption Supported\r\n")
    assert answer.partition(b"\r\n\r\n")[0].endswith(b"Upload-Draft-Interop-Version: 9")
    # A version not served gets no 104 (the draft: MUST NOT) and the plain answer.
    for unserved in (b"4", b"7", b"10", b"99", b"x"):
        other = request.replace(b"Interop-Version: 8", b"Interop-Version: " + unserved)
        answer = await asyncio.to_thread(raw_exchange, base, other)
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), unserved
        assert b"Upload-Draft-Interop-Version" not in answer, unserved
    # Without an interop version the draft forbids the 104.
    plain = request.replace(b"Upload-Draft-Interop-Version: 8\r\n", b"")
    answer = await asyncio.to_thread(raw_exchange, base, plain)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_chunked_appends_and_a_chunked_completion(client) -> None:
    """Bodies without Content-Length (chunked transfer coding): the completing one fixes the
    length where its content ends."""

    async def pieces(*parts: bytes):
        for part in parts:
            yield part

    path = path_of(await create(client, **{"Upload-Complete": "?0"}))
    first = await client.patch(path, data=pieces(b"ab", b"cd"), headers={
        "Content-Type": PARTIAL, "Upload-Offset": "0", "Upload-Complete": "?0"})  # fmt: skip
    assert first.status == 204 and first.headers["Upload-Offset"] == "4"
    last = await client.patch(path, data=pieces(b"ef", b"g" * 70_000), headers={
        "Content-Type": PARTIAL, "Upload-Offset": "4", "Upload-Complete": "?1"})  # fmt: skip
    assert last.status == 200, await last.text()
    assert await downloaded(client, path) == b"abcdef" + b"g" * 70_000


def test_two_servers_serve_one_upload(servers, backend: str, tmp_path, request) -> None:
    """Created on one process (or host), appended on another, its offset asked of the first,
    completed on the second: one data folder, or one bucket and one database."""
    import requests

    lines = ['hook_url = ""']
    if backend == "s3":
        from .conftest import s3_flags

        lines = s3_flags(request.getfixturevalue("s3_settings"))
    config = tmp_path / "two.toml"
    config.write_text("\n".join(lines) + "\n")
    first = servers("--config", str(config))
    second = servers("--config", str(config))
    data = bytes(range(256)) * 40_000  # 10 MB: more than one S3 part
    created = requests.post(
        f"{first.url}/resumable/", data=data[:3_000_000],
        headers={"Upload-Complete": "?0", "Upload-Length": str(len(data)),
                 "Repr-Digest": sha256_field(data)}, timeout=30,
    )  # fmt: skip
    assert created.status_code == 201
    path = urlsplit(created.headers["Location"]).path
    headers = {"Content-Type": PARTIAL, "Upload-Complete": "?0", "Upload-Offset": "3000000"}
    middle = requests.patch(
        f"{second.url}{path}", data=data[3_000_000:7_000_000], headers=headers, timeout=30
    )
    assert middle.status_code == 204 and middle.headers["Upload-Offset"] == "7000000"
    probe = requests.head(f"{first.url}{path}", timeout=10)
    assert probe.headers["Upload-Offset"] == "7000000"
    stale = requests.patch(f"{first.url}{path}", data=b"x", headers=headers, timeout=10)
    assert stale.status_code == 409 and stale.headers["Upload-Offset"] == "7000000"
    last = requests.patch(
        f"{second.url}{path}", data=data[7_000_000:],
        headers={**headers, "Upload-Offset": "7000000", "Upload-Complete": "?1"}, timeout=30,
    )  # fmt: skip
    assert last.status_code == 200, last.text
    file_id = path.rsplit("/", 1)[1]
    assert requests.get(f"{first.url}/files/{file_id}", timeout=30).content == data
    # The digest kept by one host is checked by the other when it completes the upload.
    created = requests.post(
        f"{first.url}/resumable/", data=b"hello ", timeout=30,
        headers={"Upload-Complete": "?0", "Repr-Digest": sha256_field(b"hello WORLD")},
    )  # fmt: skip
    path = urlsplit(created.headers["Location"]).path
    last = requests.patch(
        f"{second.url}{path}", data=b"world", timeout=30,
        headers={"Content-Type": PARTIAL, "Upload-Offset": "6", "Upload-Complete": "?1"},
    )  # fmt: skip
    assert last.status_code == 400 and "Repr-Digest" in last.json()["detail"]


async def half_an_append(client, path: str, data: bytes):
    """A completing append of `data` from offset 0 on a socket of its own, of which only the
    first MiB is sent: (reader, writer) of that socket, left open."""
    import asyncio

    parts = urlsplit(str(client.make_url("/")))
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"PATCH {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {PARTIAL}\r\n"
        f"Upload-Offset: 0\r\nUpload-Complete: ?1\r\nContent-Length: {len(data)}\r\n\r\n".encode()
        + data[: 1024 * 1024]
    )
    await writer.drain()
    return reader, writer


async def test_an_append_cut_short_keeps_what_arrived(client, backend: str) -> None:
    """The client gone mid-append: what arrived is kept (the draft's SHOULD; on S3 the whole
    parts put, 5 MiB at least, so none here), HEAD says how much, and the upload goes on
    from there."""
    import asyncio

    data = bytes(range(256)) * 8192  # 2 MiB
    path = path_of(await create(client, **{"Upload-Complete": "?0"}))
    _, writer = await half_an_append(client, path, data)
    await asyncio.sleep(0.5)
    writer.close()
    for _ in range(20):  # until the server has seen the client go
        probe = await client.head(path)
        if probe.status == 204 and probe.headers["Upload-Offset"] != "0":
            break
        await asyncio.sleep(0.1)
    offset = int(probe.headers["Upload-Offset"])
    assert offset <= 1024 * 1024 and probe.headers["Upload-Complete"] == "?0"
    if backend == "local":
        assert offset > 0
    rest = await append(client, path, io.BytesIO(data[offset:]), offset, True)
    assert rest.status == 200, await rest.text()
    assert await downloaded(client, path) == data


async def test_a_new_request_cuts_a_stale_append(client, backend: str) -> None:
    """The draft's recommended concurrency: the client lost its connection mid-append but the
    server has not seen it go; its HEAD cuts the stale append at once (its bytes committed:
    all of them on the local disk, whole parts only on S3), answers the current offset, and
    the PATCH from there is accepted."""
    import asyncio

    from chunkserver.http.keys import CONFIG

    data = bytes(range(256)) * 8192  # 2 MiB
    path = path_of(await create(client, **{"Upload-Complete": "?0"}))
    reader, writer = await half_an_append(client, path, data)
    await asyncio.sleep(0.5)  # the stale append is being received; its socket stays open
    loop = asyncio.get_running_loop()
    started = loop.time()
    probe = await client.head(path)
    # answered at once, not after the stale append's idle timeout (60 s by default)
    idle = client.server.app[CONFIG].idle_timeout_seconds
    assert loop.time() - started < idle / 2
    offset = int(probe.headers["Upload-Offset"])
    assert offset <= 1024 * 1024 and probe.headers["Upload-Complete"] == "?0"
    if backend == "local":
        assert offset > 0
    assert await asyncio.wait_for(reader.read(), 5) == b""  # the stale connection was cut
    writer.close()
    rest = await append(client, path, io.BytesIO(data[offset:]), offset, True)
    assert rest.status == 200, await rest.text()
    assert await downloaded(client, path) == data
