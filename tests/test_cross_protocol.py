"""Every protocol's upload asked through the others' routes, on both backends: the seed's
chunks, tus and the IETF draft share one store, and each rule across them is checked with
the bytes and the state after the request (table-driven: kind x state x request)."""

from __future__ import annotations

from typing import Any

import pytest

from .conftest import chunk_form, downloaded

BOTH_BACKENDS = True
V = {"Tus-Resumable": "1.0.0"}
TUS_PATCH = {**V, "Content-Type": "application/offset+octet-stream", "Upload-Offset": "3"}
DRAFT_PATCH = {
    "Content-Type": "application/partial-upload",
    "Upload-Offset": "3",
    "Upload-Complete": "?0",
}


async def begin(client: Any, kind: str, complete: bool) -> str:
    """An upload of b"abcdef" (6 bytes) made with `kind`'s protocol: its first 3 bytes, or
    all of them."""
    if kind == "seed":
        file_id = f"seed-{'done' if complete else 'half'}"
        assert (
            await client.post("/upload-chunk", data=chunk_form(file_id, 0, 2, b"abc"))
        ).status == 200
        if complete:
            form = chunk_form(file_id, 1, 2, b"def")
            assert (await client.post("/upload-chunk", data=form)).status == 200
        return file_id
    if kind == "tus":
        created = await client.post("/tus/", headers={**V, "Upload-Length": "6"})
        file_id = created.headers["Location"].rsplit("/", 1)[1]
        first = {**TUS_PATCH, "Upload-Offset": "0"}
        assert (await client.patch(f"/tus/{file_id}", data=b"abc", headers=first)).status == 204
        if complete:
            resp = await client.patch(f"/tus/{file_id}", data=b"def", headers=TUS_PATCH)
            assert resp.status == 204
        return file_id
    created = await client.post(
        "/resumable/", data=b"abc", headers={"Upload-Complete": "?0", "Upload-Length": "6"}
    )
    file_id = created.headers["Location"].rsplit("/", 1)[1]
    if complete:
        done = {**DRAFT_PATCH, "Upload-Complete": "?1"}
        assert (
            await client.patch(f"/resumable/{file_id}", data=b"def", headers=done)
        ).status == 200
    return file_id


async def ask(client: Any, request: str, file_id: str) -> Any:
    """One request of another protocol's routes, with bytes other than the upload's own."""
    if request == "seed chunk":
        return await client.post("/upload-chunk", data=chunk_form(file_id, 1, 2, b"XYZ"))
    if request == "tus HEAD":
        return await client.head(f"/tus/{file_id}", headers=V)
    if request == "tus PATCH":
        return await client.patch(f"/tus/{file_id}", data=b"XYZ", headers=TUS_PATCH)
    if request == "draft HEAD":
        return await client.head(f"/resumable/{file_id}")
    assert request == "draft PATCH"
    return await client.patch(f"/resumable/{file_id}", data=b"XYZ", headers=DRAFT_PATCH)


# (kind, complete, request) -> (status, what the upload is after it: "half" = unchanged
# with its 3 bytes, "done" = complete with b"abcdef", "abcXYZ" = complete with those, or
# "offset 6" = in progress with 6 bytes).
CASES = {
    # An upload in chunks is no byte stream: the stream routes do not know it until complete.
    ("seed", False, "tus HEAD"): (404, "half"),
    ("seed", False, "tus PATCH"): (404, "half"),
    ("seed", False, "draft HEAD"): (404, "half"),
    ("seed", False, "draft PATCH"): (404, "half"),
    # Complete, it reads as a complete stream; bytes at its end are refused (409 offset).
    ("seed", True, "tus HEAD"): (200, "done"),
    ("seed", True, "tus PATCH"): (409, "done"),
    ("seed", True, "draft HEAD"): (204, "done"),
    ("seed", True, "draft PATCH"): (409, "done"),
    # A stream takes no seed chunk, in progress or complete.
    ("tus", False, "seed chunk"): (409, "half"),
    ("tus", True, "seed chunk"): (409, "done"),
    ("ietf", False, "seed chunk"): (409, "half"),
    ("ietf", True, "seed chunk"): (409, "done"),
    # tus and the draft are two sets of headers over one byte stream: each appends to the
    # other's upload by its own rules (tus completes at the length, the draft when told).
    ("tus", False, "draft HEAD"): (204, "half"),
    ("tus", False, "draft PATCH"): (204, "offset 6"),
    ("ietf", False, "tus HEAD"): (200, "half"),
    ("ietf", False, "tus PATCH"): (204, "abcXYZ"),
    ("tus", True, "draft HEAD"): (204, "done"),
    ("tus", True, "draft PATCH"): (409, "done"),
    ("ietf", True, "tus HEAD"): (200, "done"),
    ("ietf", True, "tus PATCH"): (409, "done"),
}


KINDS = sorted({(kind, complete) for kind, complete, _ in CASES})


@pytest.mark.parametrize(("kind", "complete"), KINDS, ids=str)
async def test_requests_from_other_protocols(client: Any, kind: str, complete: bool) -> None:
    """Each request of the table on an upload of its own, made for it."""
    for (made_by, done, request_), (status, after) in CASES.items():
        if (made_by, done) == (kind, complete):
            await check_one(client, kind, complete, request_, status, after)


async def check_one(
    client: Any, kind: str, complete: bool, request_: str, status: int, after: str
) -> None:
    file_id = await begin(client, kind, complete)
    resp = await ask(client, request_, file_id)
    assert resp.status == status, (kind, complete, request_, await resp.text())
    state = await (await client.get(f"/upload-status/{file_id}")).json()
    if after in ("done", "abcXYZ"):
        assert state["status"] == "completed" and state["size"] == 6
        assert await downloaded(client, file_id) == (b"abcdef" if after == "done" else b"abcXYZ")
    elif after == "offset 6":
        assert state["status"] == "uploading" and state["offset"] == 6
        assert (await client.get(f"/files/{file_id}")).status == 404
    else:
        assert state["status"] == "uploading"
        if kind == "seed":
            assert state["uploaded_chunks"] == 1 and state["missing_chunks"] == [1]
        else:
            assert state["offset"] == 3
        assert (await client.get(f"/files/{file_id}")).status == 404
    if kind == "seed":  # its ids are the client's: free it for the next case
        assert (await client.delete(f"/uploads/{file_id}")).status == 204


@pytest.mark.parametrize("kind", ["tus", "ietf"])
@pytest.mark.parametrize("complete", [False, True])
async def test_delete_uploads_removes_a_stream_everywhere(
    client: Any, kind: str, complete: bool
) -> None:
    file_id = await begin(client, kind, complete)
    assert (await client.delete(f"/uploads/{file_id}")).status == 204
    assert (await client.get(f"/upload-status/{file_id}")).status == 404
    assert (await client.get(f"/files/{file_id}")).status == 404
    assert (await client.head(f"/tus/{file_id}", headers=V)).status == 404
    assert (await client.head(f"/resumable/{file_id}")).status == 404
    assert (await client.delete(f"/uploads/{file_id}")).status == 404


@pytest.mark.parametrize("kind", ["seed", "tus", "ietf"])
async def test_status_and_download_of_each_from_the_common_routes(client: Any, kind: str) -> None:
    half = await begin(client, kind, False)
    state = await (await client.get(f"/upload-status/{half}")).json()
    assert state["status"] == "uploading" and state["file_exists"] is False
    if kind != "seed":
        assert state["protocol"] == ("tus" if kind == "tus" else "ietf")
        assert state["offset"] == 3 and state["size"] == 6
    done = await begin(client, kind, True)
    state = await (await client.get(f"/upload-status/{done}")).json()
    assert state["status"] == "completed" and state["file_exists"] is True
    assert await downloaded(client, done) == b"abcdef"
