"""Quotas per identity, both backends: uploads in progress, bytes in progress (declared
lengths, bytes stored, a token's max_bytes claim), requests per second. Over a quota: 429
with Retry-After and nothing stored; other identities unaffected; the counts are the store's,
so they hold across two processes on one data folder and two hosts on one database."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests

from .conftest import ClientFactory, ServerProcess, chunk_form, s3_flags
from .test_app_hooks import ALICE, BOB, IDENTITIES, OCTETS, V

BOTH_BACKENDS = True


async def refused(resp: Any) -> bool:
    """A 429 with Retry-After and a detail naming the quota."""
    if resp.status != 429:
        return False
    assert int(resp.headers["Retry-After"]) >= 1
    assert "quota" in (await resp.json())["detail"]
    return True


async def tus_create(client: Any, headers: dict[str, str], **more: str) -> Any:
    return await client.post("/tus/", headers={**V, **headers, **more})


async def test_uploads_in_progress(make_client: ClientFactory) -> None:
    client = await make_client(quota_uploads_in_progress=2, **IDENTITIES)
    form = chunk_form("one", 0, 2, b"a")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    assert (await tus_create(client, ALICE, **{"Upload-Length": "5"})).status == 201
    # the third, on any protocol: refused, nothing stored
    form = chunk_form("three", 0, 2, b"a")
    assert await refused(await client.post("/upload-chunk", data=form, headers=ALICE))
    assert (await client.get("/upload-status/three", headers=ALICE)).status == 404
    assert await refused(await tus_create(client, ALICE, **{"Upload-Length": "5"}))
    draft = await client.post("/resumable/", data=b"x", headers={**ALICE, "Upload-Complete": "?0"})
    assert await refused(draft)
    # a chunk of an upload in progress is no new upload; another identity has its own count
    form = chunk_form("one", 1, 2, b"b")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    form = chunk_form("three", 0, 2, b"a")
    assert (await client.post("/upload-chunk", data=form, headers=BOB)).status == 200
    # "one" completed: room for another
    form = chunk_form("three", 0, 2, b"a")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200


async def test_bytes_in_progress(make_client: ClientFactory) -> None:
    """An upload of known length counts for all of it from its creation."""
    client = await make_client(quota_bytes_in_progress=10, **IDENTITIES)
    assert (await tus_create(client, ALICE, **{"Upload-Length": "8"})).status == 201
    assert await refused(await tus_create(client, ALICE, **{"Upload-Length": "3"}))
    assert (await tus_create(client, BOB, **{"Upload-Length": "10"})).status == 201
    assert (await tus_create(client, ALICE, **{"Upload-Length": "2"})).status == 201
    form = chunk_form("seed", 0, 2, b"a", total_size="2")
    assert await refused(await client.post("/upload-chunk", data=form, headers=ALICE))
    assert (await client.get("/upload-status/seed", headers=ALICE)).status == 404


async def test_bytes_of_uploads_of_unknown_length(make_client: ClientFactory) -> None:
    client = await make_client(quota_bytes_in_progress=10, **IDENTITIES)
    created = await tus_create(client, ALICE, **{"Upload-Defer-Length": "1"})
    tus_id = created.headers["Location"].rsplit("/", 1)[1]
    patch = {**V, **ALICE, **OCTETS}
    resp = await client.patch(
        f"/tus/{tus_id}", data=b"1234567", headers={**patch, "Upload-Offset": "0"}
    )
    assert resp.status == 204
    # seed chunks without total_size count for their bytes stored too
    form = chunk_form("seed", 0, 3, b"12")
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200
    resp = await client.patch(
        f"/tus/{tus_id}", data=b"123", headers={**patch, "Upload-Offset": "7"}
    )
    assert await refused(resp)
    head = await client.head(f"/tus/{tus_id}", headers={**V, **ALICE})
    assert head.headers["Upload-Offset"] == "7"  # nothing of the refused PATCH stored
    form = chunk_form("seed", 1, 3, b"123")
    assert await refused(await client.post("/upload-chunk", data=form, headers=ALICE))
    status = await (await client.get("/upload-status/seed", headers=ALICE)).json()
    assert status["uploaded_chunks"] == 1
    form = chunk_form("seed", 1, 3, b"1")  # what fits is taken
    assert (await client.post("/upload-chunk", data=form, headers=ALICE)).status == 200


@pytest.mark.local_only  # the counts are the same as for any identity
async def test_a_token_max_bytes_claim_lowers_the_bytes_quota(make_client: ClientFactory) -> None:
    client = await make_client(jwt_secret="s" * 32, quota_bytes_in_progress=100)
    now = int(time.time())

    def token(**claims: Any) -> dict[str, str]:
        payload = {"sub": "carol", "exp": now + 600, **claims}
        return {"Authorization": "Bearer " + jwt.encode(payload, "s" * 32, algorithm="HS256")}

    small = token(chunkserver={"max_bytes": 4})
    assert await refused(await tus_create(client, small, **{"Upload-Length": "5"}))
    assert (await tus_create(client, small, **{"Upload-Length": "4"})).status == 201
    # the same identity with a token of no claim: the configured quota
    assert (await tus_create(client, token(), **{"Upload-Length": "90"})).status == 201
    assert await refused(await tus_create(client, token(), **{"Upload-Length": "7"}))


async def test_requests_per_second(make_client: ClientFactory) -> None:
    client = await make_client(quota_requests_per_second=3, **IDENTITIES)
    answers = [(await client.get("/upload-status/x", headers=ALICE)).status for _ in range(4)]
    assert answers[:3] == [404, 404, 404]
    last = await client.get("/upload-status/x", headers=ALICE)
    assert await refused(last)
    assert (await client.get("/upload-status/x", headers=BOB)).status == 404  # bob's own bucket
    assert (await client.get("/healthz")).status == 200  # public routes are not counted
    form = chunk_form("late", 0, 1, b"a")
    assert await refused(await client.post("/upload-chunk", data=form, headers=ALICE))
    assert (await client.get("/upload-status/late", headers=BOB)).status == 404
    time.sleep(1.1)  # the bucket fills again
    assert (await client.get("/upload-status/x", headers=ALICE)).status == 404


@pytest.mark.local_only  # the counts are the same as for any identity
async def test_anonymous_uploads_have_quotas_too(make_client: ClientFactory) -> None:
    client = await make_client(quota_uploads_in_progress=1)
    assert (await client.post("/upload-chunk", data=chunk_form("a", 0, 2, b"a"))).status == 200
    assert await refused(await client.post("/upload-chunk", data=chunk_form("b", 0, 2, b"a")))


@pytest.mark.slow
def test_quotas_hold_across_processes_and_hosts(
    servers: Callable[..., ServerProcess],
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
) -> None:
    """Two processes on one data folder (local) or two hosts on one database (S3): the
    second sees what the first stored, for every quota."""
    config = tmp_path / "quotas.toml"
    lines = [
        'auth_identities = {alice = "tok-alice"}',
        "quota_uploads_in_progress = 2",
        "quota_bytes_in_progress = 100",
        "quota_requests_per_second = 5",
    ]
    if backend == "s3":
        lines += s3_flags(request.getfixturevalue("s3_settings"))
    config.write_text("\n".join(lines) + "\n")
    folders = ("data", "data") if backend == "local" else ("a", "b")
    a = servers("--config", str(config), data_dir=tmp_path / folders[0])
    b = servers("--config", str(config), data_dir=tmp_path / folders[1])

    def create(server: ServerProcess, length: int) -> tuple[int, str]:
        headers = {**V, **ALICE, "Upload-Length": str(length)}
        answer = requests.post(f"{server.url}/tus/", headers=headers, timeout=10)
        return answer.status_code, answer.text

    assert create(a, 60)[0] == 201
    status, detail = create(b, 50)  # 60 + 50 bytes in progress, counted by the other
    assert status == 429 and "bytes in progress" in detail
    assert create(b, 40)[0] == 201
    time.sleep(1.1)
    status, detail = create(a, 0)  # two uploads in progress already, one on each
    assert status == 429 and "2 uploads in progress" in detail
    time.sleep(1.1)  # the buckets full again: 5 a second between both servers
    statuses = [
        requests.get(f"{s.url}/upload-status/x", headers=ALICE, timeout=10).status_code
        for s in (a, b, a, b, a, b, a, b)
    ]
    assert statuses.count(404) <= 6 and statuses.count(429) >= 2, statuses
