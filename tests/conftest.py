"""Shared fixtures: a config on a temporary data folder, a real server through aiohttp's
test client, helpers to build chunk requests, and real `chunkserver serve` processes."""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from awscrt import checksums

from chunkserver import Config, create_app
from chunkserver.http.app import PARSER_FIELD_BYTES
from chunkserver.storage.local import recordlog

from . import realstack

ClientFactory = Callable[..., Awaitable[TestClient]]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=12.0,
        help="how long tests/soak runs its load (12 s in CI: one fault; 600 for the long soak)",
    )


JS_PACKAGES = Path(__file__).resolve().parent / "js"


def pytest_configure(config: pytest.Config) -> None:
    """The JavaScript clients the tests drive (tus-js-client, Uppy, @tus/server) come from
    npm at tests/js/package-lock.json's versions: installed on the first run where Node and
    npm exist, so that the README's one test command skips nothing that CI runs."""
    if (JS_PACKAGES / "node_modules").is_dir() or shutil.which("npm") is None:
        return
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=JS_PACKAGES,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:  # the tests that need them then skip, saying why
        print(f"npm ci in tests/js failed: {done.stderr.strip()[-500:]}", file=sys.stderr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The soak's own time limit follows --soak-seconds (the default limit is 120 s): the load,
    then reading back every file it completed (tens of GiB in a long soak)."""
    seconds = config.getoption("--soak-seconds")
    for item in items:
        if item.nodeid.startswith("tests/soak/"):
            item.add_marker(pytest.mark.timeout(2 * seconds + 240))


# With CI=true a skip fails the run, but for the tests named here, each with why it may skip
# in CI. A test that skips elsewhere (no Node, no apt-get, no `mount`) says why; in CI the
# components are installed (.ci/run), so a skip there means a test that did not run.
ALLOWED_SKIPS_IN_CI: dict[str, str] = {}


def unlisted_skips(config: pytest.Config) -> list[str]:
    """The tests that skipped and are not in ALLOWED_SKIPS_IN_CI (as the terminal counts)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    reports = reporter.stats.get("skipped", []) if reporter is not None else []
    return [r.nodeid for r in reports if r.nodeid not in ALLOWED_SKIPS_IN_CI]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With CI=true, a skip not listed fails the run."""
    if os.environ.get("CI") == "true" and exitstatus == 0 and unlisted_skips(session.config):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    skipped = unlisted_skips(config) if os.environ.get("CI") == "true" else []
    if skipped:
        terminalreporter.write_line(
            f"CI=true: {len(skipped)} test(s) skipped that are not in ALLOWED_SKIPS_IN_CI "
            "(tests/conftest.py); a skip is not a pass, so the run fails:",
            red=True,
        )
        for nodeid in skipped:
            terminalreporter.write_line(f"  {nodeid}", red=True)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A module that sets `BOTH_BACKENDS = True` runs each test on the local disk and on S3
    (Swift and PostgreSQL), unless the test is marked `local_only`."""
    if (
        "backend" in metafunc.fixturenames
        and getattr(metafunc.module, "BOTH_BACKENDS", False)
        and metafunc.definition.get_closest_marker("local_only") is None
    ):
        metafunc.parametrize("backend", ["local", "s3"], indirect=True)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    return str(getattr(request, "param", "local"))


@pytest.fixture
def config(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> Config:
    base = Config(data_dir=str(tmp_path / "data"), min_free_bytes=0, access_log=False)
    if backend == "s3":
        base = base.replace(**request.getfixturevalue("s3_settings"))
    return base


@pytest.fixture
async def make_client(aiohttp_client: Any, config: Config) -> ClientFactory:
    """Start a real server (aiohttp's test server on a real socket) with config overrides."""

    async def make(**overrides: Any) -> TestClient:
        server = TestServer(create_app(config.replace(**overrides)))
        # The parser's room for header lines as `chunkserver serve` gives it (server.py).
        await server.start_server(max_field_size=PARSER_FIELD_BYTES)
        return await aiohttp_client(server)

    return make


@pytest.fixture
async def client(make_client: ClientFactory) -> TestClient:
    return await make_client()


def chunk_form(
    file_id: str,
    index: int,
    total: int,
    data: bytes,
    filename: str = "file.bin",
    *,
    chunk_first: bool = False,
    **extra: str,
) -> aiohttp.FormData:
    """A multipart form as the seed's clients send it (or with the chunk part first)."""
    form = aiohttp.FormData()
    fields = {
        "file_id": file_id,
        "chunk_index": str(index),
        "total_chunks": str(total),
        "filename": filename,
        **extra,
    }
    # BytesIO: aiohttp warns (an error here) about large raw bytes bodies.
    body = io.BytesIO(data)
    if chunk_first:
        form.add_field("chunk", body, filename="blob", content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(name, value)
    if not chunk_first:
        form.add_field("chunk", body, filename="blob", content_type="application/octet-stream")
    return form


async def downloaded(client: TestClient, file_id: str) -> bytes:
    """A completed file's bytes, read through GET /files/{file_id} (either backend)."""
    resp = await client.get(f"/files/{file_id}")
    assert resp.status == 200, await resp.text()
    return await resp.read()


def split(data: bytes, chunk_size: int) -> list[bytes]:
    return [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] or [b""]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def crc64_value(data: bytes) -> int:
    """CRC-64/NVME, computed apart from the server's code (awscrt, for speed on large inputs;
    checked against tests/reference.py's bit-by-bit reference in test_checksums.py)."""
    return int(checksums.crc64nvme(data))


def crc64(data: bytes) -> str:
    """CRC-64/NVME in S3's form (base64 of the 8 big-endian bytes)."""
    return base64.b64encode(crc64_value(data).to_bytes(8, "big")).decode()


def dead_pid() -> int:
    """The pid of a process that has just exited."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def stored_chunks(folder: Path) -> dict[int, recordlog.Entry]:
    """The chunks an upload's folder records as stored (its record log), by index."""
    log = folder / recordlog.LOG_NAME
    entries, _ = recordlog.decode(log.read_bytes()) if log.exists() else ([], 0)
    return {e.chunk_index: e for e in entries if e.kind == recordlog.CHUNK}


def temp_files(data_dir: Path) -> list[Path]:
    """Temporary files left in the data folder.

    Skipped: the trash (emptied after the answer) and `.metrics`, where each process rewrites
    its figures through a temporary file every few seconds, whatever the test is doing.
    """
    found = []
    for folder, _, names in os.walk(data_dir):
        parts = Path(folder).relative_to(data_dir).parts
        if parts[:2] != ("chunks", ".trash") and parts[:1] != (".metrics",):
            found += [Path(folder, n) for n in names if n.endswith((".part", ".merging", ".tmp"))]
    return found


# -- real processes ------------------------------------------------------------------------

LISTENING = re.compile(r"listening on (http://\S+|unix:\S+)")


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def close(self) -> None:
        """Kill the process if it still runs and release its output pipe."""
        self.kill()
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


def start_server(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    """Run `chunkserver serve` for real on a free port; wait until it says where it listens."""
    command = [
        sys.executable, "-m", "chunkserver", "serve",
        "--port", "0", "--data-dir", str(data_dir), *args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 20
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = LISTENING.search(line)
        if match:
            server = ServerProcess(process, match.group(1), lines)
            # Keep reading its output, or a full pipe would block the server.
            server.reader = threading.Thread(target=_drain, args=(server,), daemon=True)
            server.reader.start()
            return server
    process.kill()
    process.wait()
    process.stdout.close()
    raise RuntimeError("server did not start:\n" + "".join(lines))


def _drain(server: ServerProcess) -> None:
    assert server.process.stdout is not None
    for line in server.process.stdout:
        server.output.append(line)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start real server processes; all are killed at the end of the test."""
    started: list[ServerProcess] = []

    def start(
        *args: str, data_dir: Path | None = None, env: dict[str, str] | None = None
    ) -> ServerProcess:
        server = start_server(data_dir or tmp_path / "data", *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        try:
            os.killpg(server.process.pid, signal.SIGKILL)  # with its workers, if any
        except ProcessLookupError:
            pass
        server.close()


# -- the S3 backend's real components (tests/realstack.py) ---------------------------------


@pytest.fixture(scope="session")
def swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[realstack.Swift]:
    """A real one-node OpenStack Swift with its S3 API, for the whole session."""
    reason = realstack.why_missing_swift()
    if reason is not None:
        pytest.skip(reason)
    handle = realstack.start_swift(tmp_path_factory.mktemp("swift"), unsynced=True)
    yield handle
    handle.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[realstack.Postgres]:
    """A real PostgreSQL server, run as the postgres user, for the whole session."""
    reason = realstack.why_missing_postgres()
    if reason is not None:
        pytest.skip(reason)
    handle = realstack.start_postgres()
    yield handle
    handle.stop()


_s3_counter = itertools.count()


@pytest.fixture
def s3_settings(swift: realstack.Swift, postgres: realstack.Postgres) -> dict[str, Any]:
    """Config keys for storage = "s3" on a new bucket and a new database of their own."""
    n = next(_s3_counter)
    name = f"t{os.getpid()}x{n}"
    realstack.create_bucket(swift, name)
    database_url = realstack.create_database(postgres, name)
    return {
        "storage": "s3",
        "s3_endpoint_url": swift.endpoint_url,
        "s3_bucket": name,
        "s3_region": realstack.SWIFT_REGION,
        "s3_access_key_id": realstack.SWIFT_ACCESS_KEY,
        "s3_secret_access_key": realstack.SWIFT_SECRET_KEY,
        "s3_max_parts": realstack.SWIFT_MAX_PARTS,
        "database_url": database_url,
    }


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 15.0) -> None:
    """Poll `condition` until it holds: an event waited for with a deadline (a loaded
    machine may take long), never a bare sleep; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def s3_leftovers(request: pytest.FixtureRequest, config: Config, file_id: str) -> list[str]:
    """What the bucket holds of `file_id`: objects (the file, staging objects) and open
    multipart uploads whose key names it."""
    s3: Any = realstack.s3_client(request.getfixturevalue("swift"))
    bucket = config.s3_bucket
    objects = s3.list_objects_v2(Bucket=bucket).get("Contents", [])
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [item["Key"] for item in [*objects, *uploads] if file_id in item["Key"]]


def s3_flags(settings: dict[str, Any]) -> list[str]:
    """The same settings as a config file's lines, for real `chunkserver serve` processes."""
    return [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
