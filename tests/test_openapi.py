"""GET /openapi.json: the document lists exactly the server's routes, real answers match it,
and schemathesis finds nothing against a live server (every check and phase, bounded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from chunkserver import Config, create_app
from chunkserver.http import tus

from .conftest import ServerProcess, chunk_form

HERE = Path(__file__).resolve().parent
BOTH_BACKENDS = True


def routes_of_the_server() -> set[tuple[str, str]]:
    """(method, path) of every route, the sub-applications' (/tus, /resumable) included, but
    the HEAD that aiohttp adds beside each GET."""
    app = create_app(Config(data_dir="/nonexistent-not-opened"))
    found: set[tuple[str, str]] = set()
    for resource in app.router.resources():
        info = resource.get_info()
        # a sub-application's routes (their paths carry its prefix once it is added)
        routes = list(info["app"].router.routes()) if "app" in info else list(resource)
        for route in routes:
            route_info = route.resource.get_info() if route.resource else {}
            path = route_info.get("formatter") or route_info.get("path")
            if route.method == "*":
                # tus's routes take every method (X-HTTP-Method-Override wins over any):
                # those its dispatcher serves, and POST, which a client overrides as PATCH
                # or DELETE.
                served = tus.COLLECTION_METHODS if path == tus.PREFIX else tus.UPLOAD_METHODS
                found.update((m.lower(), path) for m in (*served, "POST"))
            else:
                found.add((route.method.lower(), path))
    return {(m, p) for m, p in found if not (m == "head" and ("get", p) in found)}


def test_the_document_lists_exactly_the_servers_routes() -> None:
    from chunkserver.http.openapi import document

    doc = document(Config())
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops if m != "parameters"}
    # HEAD beside GET is aiohttp's (and /resumable/'s offset retrieval is both): compared
    # without it on both sides.
    documented = {(m, p) for m, p in documented if not (m == "head" and ("get", p) in documented)}
    assert documented == routes_of_the_server()
    assert doc["openapi"] == "3.1.0"


def test_every_route_that_needs_a_credential_documents_401_403_and_429() -> None:
    from chunkserver.http.openapi import document

    doc = document(Config())
    public = {"/healthz", "/openapi.json", "/", "/static/{path}"}
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            if path in public or method in ("parameters", "options"):
                continue
            assert {"401", "403", "429"} <= set(operation["responses"]), (method, path)


def check(doc: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    answer = doc["paths"][path][method]["responses"][str(status)]
    schema = answer["content"]["application/json"]["schema"]
    jsonschema.validate(body, {**schema, "components": doc["components"]})


async def test_real_answers_match_the_document(client) -> None:
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    doc = await resp.json()
    meta = json.dumps({"user": "42"})
    answers = [
        ("/upload-chunk", "post", await client.post(
            "/upload-chunk", data=chunk_form("doc", 0, 2, b"ab", metadata=meta))),
        ("/upload-status/{file_id}", "get", await client.get("/upload-status/doc")),
        ("/upload-chunk", "post", await client.post(
            "/upload-chunk", data=chunk_form("doc", 1, 2, b"c"))),
        ("/upload-status/{file_id}", "get", await client.get("/upload-status/doc")),
        ("/upload-status/{file_id}", "get", await client.get("/upload-status/nobody")),
        ("/upload-chunk", "post", await client.post(
            "/upload-chunk", data=chunk_form("doc2", 0, 3, b"a"))),
        ("/upload-chunk", "post", await client.post(
            "/upload-chunk", data=chunk_form("doc2", 1, 4, b"a"))),  # 409
        ("/upload-chunk", "post", await client.post("/upload-chunk", data={"x": "1"})),  # 400
        ("/files/{file_id}", "get", await client.get("/files/nobody")),
        ("/uploads/{file_id}", "delete", await client.delete("/uploads/nobody")),
        ("/healthz", "get", await client.get("/healthz")),
    ]  # fmt: skip
    created = await client.post(
        "/tus/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "10"})  # fmt: skip
    tus_id = created.headers["Location"].rsplit("/", 1)[-1]
    answers.append(
        ("/upload-status/{file_id}", "get", await client.get(f"/upload-status/{tus_id}"))
    )
    statuses = []
    for path, method, resp in answers:
        statuses.append(resp.status)
        check(doc, path, method, resp.status, await resp.json())
    assert statuses == [200, 200, 200, 200, 404, 200, 409, 400, 404, 404, 200, 200]


def test_every_answer_type_is_a_component_and_leaves_out_what_is_none() -> None:
    from chunkserver.http.answers import ANSWERS, ChunkUploading, StatusStreaming
    from chunkserver.http.openapi import document

    components = document(Config())["components"]["schemas"]
    assert {cls.__name__ for cls in ANSWERS} <= set(components)
    body = ChunkUploading(file_id="a", filename="b", uploaded_chunks=1, total_chunks=2).body()
    assert body == {"file_id": "a", "filename": "b", "type": "file", "status": "uploading",
                    "uploaded_chunks": 1, "total_chunks": 2}  # fmt: skip
    jsonschema.validate(body, components["ChunkUploading"])
    stream = StatusStreaming(file_id="a", protocol="ietf", offset=3, filename="b").body()
    assert "size" not in stream and "metadata" not in stream
    jsonschema.validate(stream, components["StatusStreaming"])
    assert "size" not in components["StatusStreaming"]["required"]


def test_the_chunk_form_is_the_fields_forms_py_reads() -> None:
    from chunkserver.http.forms import OPTIONAL_FIELDS, REQUIRED_FIELDS
    from chunkserver.http.openapi import document

    post = document(Config())["paths"]["/upload-chunk"]["post"]
    form = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(form["properties"]) == {*REQUIRED_FIELDS, *OPTIONAL_FIELDS, "chunk"}
    assert form["required"] == [*REQUIRED_FIELDS, "chunk"]


@pytest.mark.slow
def test_schemathesis_finds_nothing(
    servers: Callable[..., ServerProcess], backend: str, request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:  # fmt: skip
    st = shutil.which("st") or shutil.which("schemathesis")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[test]' installs it)")
    # Limits that fit any machine: under the default max_file_bytes (100 GiB) schemathesis
    # finds an Upload-Length over the free disk, and the right answer, 507, is a 5xx.
    lines = ["max_file_bytes = 1073741824"]
    if backend == "s3":
        from .conftest import s3_flags

        lines += s3_flags(request.getfixturevalue("s3_settings"))
    config = tmp_path / "fuzzed.toml"
    config.write_text("\n".join(lines) + "\n")
    server = servers("--config", str(config))
    seconds = os.environ.get("CHUNKSERVER_SCHEMATHESIS_SECONDS", "9" if backend == "local" else "8")
    done = subprocess.run(
        [st, "--config-file", str(HERE / "schemathesis.toml"), "run",
         f"{server.url}/openapi.json", "--max-time", seconds, "--workers", "2",
         "--seed", "1"],
        capture_output=True, text=True, timeout=int(seconds) + 120,
        cwd=tmp_path,  # its cache folder (.schemathesis) goes there, not into the tree
        env={**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(HERE)},
    )  # fmt: skip
    summary = done.stdout[-8000:]
    assert done.returncode == 0, summary
    assert "passed" in summary and "failures" not in summary.lower().split("summary")[-1]
