"""The tus clients people use, unchanged, against a real chunkserver process on both backends:
tus-js-client in Node, tuspy, and Uppy (its ready-made bundle, Dashboard and Tus) in Chromium.

The JavaScript packages come from npm (tests/js/package.json; `.ci/run` runs `npm ci`)."""

from __future__ import annotations

import functools
import gc
import http.server
import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from .conftest import ServerProcess, crc64, s3_flags

BOTH_BACKENDS = True

MiB = 1024 * 1024
JS = Path(__file__).resolve().parent / "js"
NODE = shutil.which("node")
HAS_NODE_MODULES = (JS / "node_modules" / "tus-js-client").is_dir()
needs_node = pytest.mark.skipif(
    NODE is None or not HAS_NODE_MODULES,
    reason="needs Node.js and npm (the first test run installs tests/js from npm)",
)

try:
    from tusclient import client as tusclient
    from tusclient.storage.filestorage import FileStorage
except ImportError:  # pragma: no cover - tuspy is in the test extra
    tusclient = None


@pytest.fixture
def server(
    servers: Callable[..., ServerProcess], backend: str, tmp_path: Path, request
) -> ServerProcess:
    lines = ['cors_origins = ["*"]']
    if backend == "s3":
        lines += s3_flags(request.getfixturevalue("s3_settings"))
    config = tmp_path / "chunkserver.toml"
    config.write_text("\n".join(lines) + "\n")
    return servers("--config", str(config))


def make_file(tmp_path: Path, size: int, name: str = "movie.bin") -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return path, data


def file_id_of(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[1]


def assert_stored(server: ServerProcess, file_id: str, data: bytes, filename: str) -> None:
    """Seen through the seed's routes: completed, the right CRC, the same bytes."""
    status = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert status["status"] == "completed", status
    assert status["filename"] == filename and status["size"] == len(data)
    assert status["crc64nvme"] == crc64(data)
    assert requests.get(f"{server.url}/files/{file_id}", timeout=60).content == data


# -- tus-js-client in Node --


def run_node(options: dict[str, Any], *, kill_after_bytes: int | None = None) -> list[dict]:
    """Run tests/js/tus_upload.js; its JSON events. SIGKILLed once `kill_after_bytes` are
    reported sent, when given."""
    assert NODE is not None
    process = subprocess.Popen(
        [NODE, str(JS / "tus_upload.js"), json.dumps(options)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=JS,
    )
    events = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if not line.startswith("{"):
                continue
            event = json.loads(line)
            events.append(event)
            sent = event.get("sent", 0)
            if kill_after_bytes is not None and sent >= kill_after_bytes:
                process.send_signal(signal.SIGKILL)
                break
        process.wait(120)
    finally:
        process.kill()
        process.stdout.close()
    return events


@needs_node
@pytest.mark.slow
@pytest.mark.parametrize("parallel", [1, 3])
def test_tus_js_client(server: ServerProcess, tmp_path: Path, parallel: int) -> None:
    path, data = make_file(tmp_path, 9 * MiB + 17)
    events = run_node(
        {
            "endpoint": f"{server.url}/tus/",
            "path": str(path),
            "parallelUploads": parallel,
            "chunkSize": 2 * MiB,
            "metadata": {"filename": "movie.bin", "user": "42"},
        }
    )
    assert events[-1]["event"] == "success", events[-3:]
    file_id = file_id_of(events[-1]["url"])
    assert_stored(server, file_id, data, "movie.bin")
    status = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert status["metadata"] == {"filename": "movie.bin", "user": "42"}


@needs_node
@pytest.mark.slow
def test_tus_js_client_checksum(server: ServerProcess, tmp_path: Path) -> None:
    """Every PATCH carries Upload-Checksum (sha1), which the server checks."""
    path, data = make_file(tmp_path, 3 * MiB + 5)
    events = run_node(
        {
            "endpoint": f"{server.url}/tus/",
            "path": str(path),
            "chunkSize": MiB,
            "checksum": True,
            "metadata": {"filename": "movie.bin"},
        }
    )
    assert events[-1]["event"] == "success", events[-3:]
    assert_stored(server, file_id_of(events[-1]["url"]), data, "movie.bin")


@needs_node
@pytest.mark.slow
def test_tus_js_client_resumes_after_being_killed(server: ServerProcess, tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 24 * MiB)
    options = {
        "endpoint": f"{server.url}/tus/",
        "path": str(path),
        "chunkSize": 512 * 1024,
        "urlStorage": str(tmp_path / "tus-urls.json"),
        "metadata": {"filename": "movie.bin"},
    }
    first = run_node(options, kill_after_bytes=4 * MiB)
    assert first[-1]["event"] == "progress"  # killed mid-upload
    again = run_node(options)
    resuming = [e for e in again if e["event"] == "resuming"]
    assert len(resuming) == 1, again[:3]
    progress = [e["sent"] for e in again if e["event"] == "progress"]
    assert progress[0] >= 4 * MiB  # it went on from where the server was, not from 0
    assert again[-1]["event"] == "success"
    assert again[-1]["url"] == resuming[0]["from"]
    assert_stored(server, file_id_of(again[-1]["url"]), data, "movie.bin")


# -- tuspy --


# tuspy opens the file by its path and leaves it for the garbage collector to close (and it
# closes a stream it is given before reading it), so its ResourceWarning is not ours.
TUSPY_LEAKS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@TUSPY_LEAKS
@pytest.mark.skipif(tusclient is None, reason="tuspy is not installed (it is in the test extra)")
def test_tuspy_with_a_resume(server: ServerProcess, tmp_path: Path) -> None:
    path, data = make_file(tmp_path, 7 * MiB + 3, "report.pdf")
    storage = FileStorage(str(tmp_path / "tuspy-urls.json"))
    tus = tusclient.TusClient(f"{server.url}/tus/")
    first = tus.uploader(
        str(path),
        chunk_size=MiB,
        metadata={"filename": "report.pdf"},
        store_url=True,
        url_storage=storage,
    )
    first.upload(stop_at=3 * MiB)  # the program stops here, as if closed
    assert first.url is not None
    head = requests.head(first.url, headers={"Tus-Resumable": "1.0.0"}, timeout=10)
    assert int(head.headers["Upload-Offset"]) == 3 * MiB
    second = tus.uploader(
        str(path),
        chunk_size=MiB,
        metadata={"filename": "report.pdf"},
        store_url=True,
        url_storage=storage,
    )
    assert second.url == first.url and second.offset == 3 * MiB  # found and asked the server
    second.upload()
    assert_stored(server, file_id_of(first.url), data, "report.pdf")
    del first, second
    gc.collect()  # what tuspy left open is collected here, under this test's filter


# -- Uppy in Chromium --

UPPY_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><link rel="stylesheet" href="uppy.min.css"></head>
<body><div id="dashboard"></div>
<script src="uppy.min.js"></script>
<script>
  const { Uppy, Dashboard, Tus } = globalThis.Uppy
  const uppy = new Uppy({ autoProceed: true })
    .use(Dashboard, { inline: true, target: '#dashboard' })
    .use(Tus, { endpoint: ENDPOINT, chunkSize: CHUNK, retryDelays: [0, 300, 1000, 2000] })
  uppy.on('complete', (result) => { window.uploadResult = result })
  window.uppy = uppy
</script></body></html>
"""


@pytest.fixture
def page_site(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A second origin serving the Uppy test page (the bundle from npm), as an application's
    own site would: every request to chunkserver is cross-origin (CORS)."""
    site = tmp_path / "site"
    site.mkdir()
    for name in ("uppy.min.js", "uppy.min.css"):
        shutil.copy(JS / "node_modules" / "uppy" / "dist" / name, site / name)
    handler = functools.partial(QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def page(endpoint: str, chunk_size: int, data: bytes = b"") -> str:
        (site / "clip.bin").write_bytes(data)
        html = UPPY_PAGE.replace("ENDPOINT", json.dumps(endpoint))
        (site / "index.html").write_text(html.replace("CHUNK", str(chunk_size)))
        return f"http://127.0.0.1:{httpd.server_address[1]}/index.html"

    yield page
    httpd.shutdown()
    httpd.server_close()
    thread.join(10)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@needs_node
@pytest.mark.slow
def test_uppy_dashboard_drop_interrupt_resume(
    server: ServerProcess, page_site: Callable[..., str], tmp_path: Path
) -> None:
    from .test_browser import CHROMIUM, CHROMIUM_ARGS, sync_playwright

    if sync_playwright is None or not os.path.exists(CHROMIUM):
        pytest.skip("needs playwright and Debian's chromium (.ci/run installs it)")
    data = os.urandom(6 * MiB + 99)
    url = page_site(f"{server.url}/tus/", MiB, data)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        requests_seen: list[str] = []
        page.on("request", lambda r: requests_seen.append(r.method) if "/tus/" in r.url else None)
        cut = []

        def cut_third_patch(route) -> None:
            if (
                route.request.method == "PATCH"
                and len(cut) < 1
                and requests_seen.count("PATCH") >= 3
            ):
                cut.append(route.request.url)
                route.abort("connectionreset")  # the network drops mid-upload
                return
            route.continue_()

        page.route("**/tus/**", cut_third_patch)
        page.goto(url)
        page.wait_for_selector(".uppy-Dashboard-inner")
        # Drop the file on the Dashboard, as a user drags it from the desktop.
        drop = page.evaluate_handle(
            """async () => {
                const bytes = await (await fetch('clip.bin')).arrayBuffer()
                const transfer = new DataTransfer()
                transfer.items.add(new File([bytes], 'clip.mov'))
                return transfer
            }"""
        )
        page.dispatch_event(".uppy-Dashboard-inner", "dragover", {"dataTransfer": drop})
        page.dispatch_event(".uppy-Dashboard-inner", "drop", {"dataTransfer": drop})
        page.wait_for_function("() => window.uploadResult !== undefined", timeout=90_000)
        result = page.evaluate(
            "() => ({ ok: window.uploadResult.successful.map(f => f.response.uploadURL),"
            " failed: window.uploadResult.failed.length })"
        )
        browser.close()
    assert cut, "the upload was not interrupted"
    assert result["failed"] == 0 and len(result["ok"]) == 1
    after_cut = requests_seen[requests_seen.index("PATCH") :]
    assert "HEAD" in after_cut  # it asked the server where to resume
    assert_stored(server, file_id_of(result["ok"][0]), data, "clip.mov")


# -- tus-js-client speaking the IETF draft (its `protocol` option) to /resumable/ --

IETF_PROTOCOLS = pytest.mark.parametrize("protocol", ["ietf-draft-03", "ietf-draft-05"])


@needs_node
@pytest.mark.slow
@IETF_PROTOCOLS
@pytest.mark.parametrize("with_creation", [False, True], ids=["empty-creation", "data-in-creation"])
def test_tus_js_client_ietf_draft(
    server: ServerProcess, tmp_path: Path, protocol: str, with_creation: bool
) -> None:
    path, data = make_file(tmp_path, 5 * MiB + 11)
    events = run_node(
        {
            "endpoint": f"{server.url}/resumable/",
            "path": str(path),
            "protocol": protocol,
            "uploadDataDuringCreation": with_creation,
            "chunkSize": 2 * MiB,
            "metadata": {"filename": "movie.bin"},
        }
    )
    assert events[-1]["event"] == "success", events[-3:]
    file_id = file_id_of(events[-1]["url"])
    assert_stored(server, file_id, data, "movie.bin")


@needs_node
@pytest.mark.slow
@IETF_PROTOCOLS
def test_tus_js_client_ietf_draft_resumes_after_being_killed(
    server: ServerProcess, tmp_path: Path, protocol: str
) -> None:
    path, data = make_file(tmp_path, 16 * MiB)
    options = {
        "endpoint": f"{server.url}/resumable/",
        "path": str(path),
        "protocol": protocol,
        "chunkSize": 512 * 1024,
        "urlStorage": str(tmp_path / "urls.json"),
        "metadata": {"filename": "movie.bin"},
    }
    first = run_node(options, kill_after_bytes=4 * MiB)
    assert first[-1]["event"] == "progress"
    again = run_node(options)
    resuming = [e for e in again if e["event"] == "resuming"]
    assert len(resuming) == 1, again[:3]
    progress = [e["sent"] for e in again if e["event"] == "progress"]
    assert progress[0] >= 4 * MiB
    assert again[-1]["event"] == "success", again[-3:]
    assert_stored(server, file_id_of(again[-1]["url"]), data, "movie.bin")


@needs_node
@pytest.mark.slow
@IETF_PROTOCOLS
def test_tus_js_client_ietf_draft_goes_on_after_the_server_is_sigkilled(
    servers: Callable[..., ServerProcess], backend: str, tmp_path: Path, protocol: str, request
) -> None:
    """The server SIGKILLed mid-upload and started again on the same port: the client asks
    the offset (HEAD) and goes on from the last one committed."""
    lines = []
    if backend == "s3":
        lines += s3_flags(request.getfixturevalue("s3_settings"))
    config = tmp_path / "chunkserver.toml"
    config.write_text("\n".join(lines) + "\n")
    first = servers("--config", str(config))
    port = first.url.rsplit(":", 1)[1]
    path, data = make_file(tmp_path, 16 * MiB)
    options = {
        "endpoint": f"{first.url}/resumable/",
        "path": str(path),
        "protocol": protocol,
        "chunkSize": MiB,
        "metadata": {"filename": "movie.bin"},
        # On S3 the killed host's writer lease (20 s) holds the upload until it runs out:
        # the client's PATCHes get 423 and retry until then.
        "retryDelays": [200, 500, 1000, 2000, 3000, 5000, 8000, 10000, 10000],
    }
    process = subprocess.Popen(
        [NODE, str(JS / "tus_upload.js"), json.dumps(options)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=JS,
    )  # fmt: skip
    events = []
    assert process.stdout is not None
    try:
        for line in process.stdout:
            if line.startswith("{"):
                events.append(json.loads(line))
            if events and events[-1].get("sent", 0) >= 6 * MiB and first.process.poll() is None:
                os.killpg(first.process.pid, signal.SIGKILL)
                first.process.wait(10)
                servers("--config", str(config), "--port", port)
        process.wait(120)
    finally:
        process.kill()
        process.stdout.close()
    assert first.process.poll() is not None, "the server was not killed mid-upload"
    assert events[-1]["event"] == "success", events[-3:]
    assert_stored(first, file_id_of(events[-1]["url"]), data, "movie.bin")
