"""Ownership on every route, both backends: an upload belongs to the identity that made it.
Another identity's request on it (seed chunks, status, download, delete, tus HEAD, PATCH,
DELETE and a final naming its partials, the draft's HEAD, PATCH and DELETE) is answered
exactly as for an id that does not exist, and changes nothing; two identities that choose
the same file_id make two uploads."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from chunkserver import Config

from .conftest import ClientFactory, chunk_form, s3_leftovers

BOTH_BACKENDS = True
ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}
V = {"Tus-Resumable": "1.0.0"}
OCTETS = {"Content-Type": "application/offset+octet-stream"}
PARTIAL = {"Content-Type": "application/partial-upload"}


async def answer_of(resp: Any) -> tuple[int, bytes]:
    """What a client sees of an answer: its status and body (headers that differ by nature,
    such as Date, left out)."""
    return resp.status, await resp.read()


async def alices_uploads(client: Any) -> dict[str, str]:
    """Alice's uploads: a seed upload in progress and one complete, a tus upload in progress
    and a complete partial one, an upload of the draft in progress."""
    for index in (0,):
        form = chunk_form("half", index, 2, b"alice-0")
        assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    form = chunk_form("done", 0, 1, b"alice's file")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    created = await client.post("/tus/", headers={**V, **ALICE, "Upload-Length": "6"})
    tus_id = created.headers["Location"].rsplit("/", 1)[1]
    resp = await client.patch(
        f"/tus/{tus_id}", data=b"abc", headers={**V, **ALICE, **OCTETS, "Upload-Offset": "0"}
    )
    assert resp.status == 204
    part = await client.post(
        "/tus/", headers={**V, **ALICE, "Upload-Length": "3", "Upload-Concat": "partial"}
    )
    part_id = part.headers["Location"].rsplit("/", 1)[1]
    resp = await client.patch(
        f"/tus/{part_id}", data=b"xyz", headers={**V, **ALICE, **OCTETS, "Upload-Offset": "0"}
    )
    assert resp.status == 204
    draft = await client.post(
        "/resumable/", data=b"abc", headers={**ALICE, "Upload-Complete": "?0"}
    )
    draft_id = draft.headers["Location"].rsplit("/", 1)[1]
    return {"tus": tus_id, "part": part_id, "draft": draft_id}


async def state_of(client: Any, ids: dict[str, str]) -> list[Any]:
    """Everything alice can see of her uploads."""
    seen = []
    for file_id in ("half", "done", *ids.values()):
        seen.append(await (await client.get(f"/upload-status/{file_id}", headers=ALICE)).json())
    seen.append(await (await client.get("/files/done", headers=ALICE)).read())
    return seen


def bobs_requests(ids: dict[str, str], file_ids: dict[str, str]) -> list[tuple[str, str, dict]]:
    """(method, path, options) of bob's requests on the uploads named by `file_ids` (alice's
    ids, or ids no one has, of the same shapes)."""
    tus, part, draft = file_ids["tus"], file_ids["part"], file_ids["draft"]
    return [
        ("GET", f"/upload-status/{file_ids['half']}", {}),
        ("GET", f"/upload-status/{file_ids['done']}", {}),
        ("GET", f"/files/{file_ids['done']}", {}),
        ("GET", f"/files/{file_ids['done']}", {"headers": {"Range": "bytes=0-3"}}),
        ("DELETE", f"/uploads/{file_ids['half']}", {}),
        ("DELETE", f"/uploads/{file_ids['done']}", {}),
        ("HEAD", f"/tus/{tus}", {"headers": V}),
        (
            "PATCH",
            f"/tus/{tus}",
            {"data": b"def", "headers": {**V, **OCTETS, "Upload-Offset": "3"}},
        ),
        ("POST", f"/tus/{tus}", {"headers": {**V, "X-HTTP-Method-Override": "DELETE"}}),
        ("DELETE", f"/tus/{tus}", {"headers": V}),
        ("HEAD", f"/tus/{part}", {"headers": V}),
        ("POST", "/tus/", {"headers": {**V, "Upload-Concat": f"final;/tus/{part}"}}),
        ("HEAD", f"/resumable/{draft}", {}),
        ("GET", f"/resumable/{draft}", {}),
        (
            "PATCH",
            f"/resumable/{draft}",
            {"data": b"def", "headers": {**PARTIAL, "Upload-Offset": "3", "Upload-Complete": "?1"}},
        ),
        ("DELETE", f"/resumable/{draft}", {}),
        ("DELETE", f"/uploads/{tus}", {}),
        ("DELETE", f"/uploads/{draft}", {}),
    ]


async def test_another_identity_sees_nothing_and_changes_nothing(
    make_client: ClientFactory,
) -> None:
    client = await make_client(auth_identities=(("alice", "tok-alice"), ("bob", "tok-bob")))
    ids = await alices_uploads(client)
    before = await state_of(client, ids)
    # alice sees hers: half, done, the tus upload, the complete part, the draft's upload
    statuses = [answer["status"] for answer in before[:5]]
    assert statuses == ["uploading", "completed", "uploading", "completed", "uploading"]
    assert before[5] == b"alice's file"
    mine = {"half": "half", "done": "done", **ids}
    nobodys = {
        "half": "nobody-1", "done": "nobody-2",
        **{k: f"nobody-{k}" for k in ("tus", "part", "draft")},
    }  # fmt: skip
    requests = 0
    for (method, path, options), (_, unknown_path, _) in zip(
        bobs_requests(ids, mine), bobs_requests(ids, nobodys), strict=True
    ):
        options = dict(options)
        headers = {**options.pop("headers", {}), **BOB}
        got = await answer_of(await client.request(method, path, headers=headers, **options))
        unknown = await answer_of(
            await client.request(method, unknown_path, headers=headers, **options)
        )
        requests += 2
        # the same answer as for an id nobody has (tus and draft errors name no id)
        assert got[0] == unknown[0], (method, path, got, unknown)
        assert got[0] in (400, 404), (method, path, got)
        assert got[1].replace(path.encode(), b"") == unknown[1].replace(
            unknown_path.encode(), b""
        ), (method, path)
    assert requests == 36
    assert await state_of(client, ids) == before  # nothing of alice's changed


async def test_the_same_file_id_makes_two_uploads(
    make_client: ClientFactory, config: Config, request: pytest.FixtureRequest
) -> None:
    client = await make_client(auth_identities=(("alice", "tok-alice"), ("bob", "tok-bob")))
    hers, his = os.urandom(5000), os.urandom(7000)
    for headers, data in ((ALICE, hers), (BOB, his)):
        form = chunk_form("shared", 0, 2, data[:1000])
        resp = await client.post("/upload-chunk", data=form, headers=headers)
        assert (await resp.json())["uploaded_chunks"] == 1
    for headers, data in ((BOB, his), (ALICE, hers)):
        form = chunk_form("shared", 1, 2, data[1000:])
        answer = await (await client.post("/upload-chunk", data=form, headers=headers)).json()
        assert answer["status"] == "completed" and answer["file_id"] == "shared"
        assert answer["size"] == len(data)
    assert await (await client.get("/files/shared", headers=ALICE)).read() == hers
    assert await (await client.get("/files/shared", headers=BOB)).read() == his
    # Stored apart, each under its identity's namespace: two folders, or two objects.
    if config.storage == "local":
        kept = sorted(p.name for p in (Path(config.data_dir) / "uploads").iterdir() if p.is_dir())
    else:
        objects = s3_leftovers(request, config, "shared")  # staging objects may linger
        kept = sorted(key.split("/")[1] for key in objects if key.startswith("uploads/"))
    assert len(kept) == 2 and all(name.endswith("~shared") for name in kept), kept
    assert (await client.delete("/uploads/shared", headers=BOB)).status == 204
    assert await (await client.get("/files/shared", headers=ALICE)).read() == hers


async def test_without_authentication_nothing_moves(
    make_client: ClientFactory, config: Config
) -> None:
    """The anonymous identity's uploads stay where an earlier version kept them."""
    client = await make_client()
    form = chunk_form("plain", 0, 1, b"as before")
    answer = await (await client.post("/upload-chunk", data=form)).json()
    assert answer["file_id"] == "plain"
    if config.storage == "local":
        assert (
            Path(config.data_dir) / "uploads" / "plain" / "file.bin"
        ).read_bytes() == b"as before"
