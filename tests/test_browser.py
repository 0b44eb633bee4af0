"""The upload page in a real headless Chromium (Debian's), driven by Playwright."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from .conftest import ServerProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-artifacts"
MiB = 1024 * 1024

try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:  # pragma: no cover - playwright is in the test extra
    sync_playwright = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None, reason="playwright is not installed"),
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM),
        reason="no chromium binary (apt-get install chromium); .ci/run installs it",
    ),
]

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    page = context.new_page()
    yield page
    context.close()


def make_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "movie.bin"
    path.write_bytes(data)
    return path, data


def test_page_uploads_a_multi_chunk_file(
    servers: Callable[..., ServerProcess], page: Page, tmp_path: Path
) -> None:
    server = servers()
    path, data = make_file(tmp_path, 12 * MiB)
    page.goto(f"{server.url}/?chunkSize={MiB}&concurrency=3")
    page.set_input_files("#picker", str(path))
    page.wait_for_selector(".file.done", timeout=60_000)
    assert page.inner_text(".file .percent") == "100.0%"
    assert page.get_attribute(".file .fill", "aria-valuenow") == "100.0"
    href = page.get_attribute(".file a.download", "href")
    assert href is not None and page.is_visible(".file a.download")
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "upload-page.png"), full_page=True)
    download = requests.get(f"{server.url}{href}", timeout=30)
    assert download.content == data
    stored = tmp_path / "data" / "uploads" / href.rsplit("/", 1)[-1] / "movie.bin"
    assert stored.read_bytes() == data


def test_reload_mid_upload_resumes(
    servers: Callable[..., ServerProcess], page: Page, tmp_path: Path
) -> None:
    server = servers()
    path, data = make_file(tmp_path, 12 * MiB)
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.url.endswith("/upload-chunk") else None)

    def slow(route) -> None:
        time.sleep(0.15)  # slow the upload down so that the reload lands in its middle
        route.continue_()

    page.route("**/upload-chunk", slow)
    page.goto(f"{server.url}/?chunkSize={MiB}&concurrency=1")
    page.set_input_files("#picker", str(path))
    page.wait_for_function(
        "() => parseFloat(document.querySelector('.file .percent')?.textContent) >= 25",
        timeout=30_000,
    )
    file_id = page.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith("
                            "'chunkserver:movie.bin')).map(k => localStorage.getItem(k))[0]")  # fmt: skip
    page.reload()
    status = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert status["status"] == "uploading" and 3 <= status["uploaded_chunks"] < 12
    page.unroute("**/upload-chunk")
    posts.clear()
    page.set_input_files("#picker", str(path))  # the user picks the same file again
    page.wait_for_selector(".file.done", timeout=60_000)
    assert len(posts) == len(status["missing_chunks"])  # only what the server lacked was sent
    final = requests.get(f"{server.url}/upload-status/{file_id}", timeout=10).json()
    assert final["status"] == "completed"
    assert requests.get(f"{server.url}/files/{file_id}", timeout=30).content == data


def test_seed_style_upload_file_call(servers: Callable[..., ServerProcess], page: Page) -> None:
    server = servers()
    page.goto(f"{server.url}/")
    result = page.evaluate(
        """async () => {
            const { ChunkedUploader } = await import('/static/chunked-uploader.js');
            const uploader = new ChunkedUploader('', { chunkSize: 1000 });
            const file = new File([new Uint8Array(2500).fill(7)], 'seed.bin');
            const calls = [];
            const fileId = await uploader.uploadFile(file, (done, total) => calls.push([done, total]));
            const status = await uploader.status(fileId);
            return { fileId, calls, status };
        }"""
    )
    assert isinstance(result["fileId"], str) and len(result["fileId"]) == 36
    assert result["calls"][-1] == [3, 3]
    assert result["status"]["status"] == "completed" and result["status"]["size"] == 2500


def test_the_uploader_sends_metadata(servers: Callable[..., ServerProcess], page: Page) -> None:
    server = servers()
    page.goto(f"{server.url}/")
    status = page.evaluate(
        """async () => {
            const { ChunkedUploader } = await import('/static/chunked-uploader.js');
            const uploader = new ChunkedUploader('', { chunkSize: 1000, metadata: { user: '42' } });
            const file = new File([new Uint8Array(2500).fill(1)], 'meta.bin');
            return uploader.status(await uploader.uploadFile(file));
        }"""
    )
    assert status["status"] == "completed" and status["metadata"] == {"user": "42"}


def test_pause_and_resume_buttons(
    servers: Callable[..., ServerProcess], page: Page, tmp_path: Path
) -> None:
    server = servers()
    path, data = make_file(tmp_path, 8 * MiB)

    def slow(route) -> None:
        time.sleep(0.1)
        route.continue_()

    page.route("**/upload-chunk", slow)
    page.goto(f"{server.url}/?chunkSize={MiB}&concurrency=1")
    page.set_input_files("#picker", str(path))
    page.wait_for_function(
        "() => parseFloat(document.querySelector('.file .percent')?.textContent) >= 25"
    )
    page.click(".file button.pause")
    page.wait_for_selector(".file .state:has-text('paused')")
    assert page.inner_text(".file button.pause") == "Resume"
    page.unroute("**/upload-chunk")
    page.click(".file button.pause")
    page.wait_for_selector(".file.done", timeout=60_000)
    href = page.get_attribute(".file a.download", "href")
    assert requests.get(f"{server.url}{href}", timeout=30).content == data
