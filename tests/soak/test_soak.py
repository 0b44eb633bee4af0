"""The soak: many clients, many files, faults of every kind, two server processes restarted
under them, and at the end nothing lost.

    pytest tests/soak                        # 12 s of load (CI: one fault)
    pytest tests/soak --soak-seconds 600 -s  # the long soak, with its summary printed

See tests/soak/README.md for what is injected and checked, and the last long run's summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from chunkserver.storage.local.openuploads import MAX_OPEN_UPLOADS

from .. import realstack
from ..conftest import ServerProcess, crc64, s3_flags, start_server, stored_chunks, temp_files
from ..test_multihost import ROOT, render
from ..test_nginx import free_port, run_nginx, stop_nginx

pytestmark = pytest.mark.slow
MiB = 2**20
KiB = 2**10
RECOVERY_SECONDS = 10.0  # a part of the S3 mode back: every host healthy again within this


@dataclass
class Upload:
    file_id: str
    data: bytes
    chunk_size: int
    state: str = "open"  # open, completed, aborted
    answered_crc64nvme: str | None = None
    size: int = 0
    sha256: str = ""
    crc64nvme: str = ""

    def __post_init__(self) -> None:
        self.size = len(self.data)

    @property
    def total(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def seal(self) -> None:
        """Keep the digests and drop the bytes once sent: a long soak makes tens of
        thousands of uploads, more than this machine's memory holds."""
        self.sha256 = hashlib.sha256(self.data).hexdigest()
        self.crc64nvme = crc64(self.data)
        self.data = b""

    def chunk(self, index: int) -> bytes:
        return self.data[index * self.chunk_size : (index + 1) * self.chunk_size]


@dataclass
class Cluster:
    """The servers under test, restarted by the test. On the local disk: two `chunkserver
    serve` processes on one data folder, each sent to directly. On S3: three hosts with data
    folders of their own behind nginx (deploy/nginx-multihost.conf), sent to through it, on
    a Swift and a PostgreSQL of the soak's own, which the soak also stops and starts."""

    tmp: Path
    args: tuple[str, ...] = ()
    shared_folder: bool = True
    servers: list[ServerProcess] = field(default_factory=list)
    baselines: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (fds, rss)
    replaced: list[ServerProcess] = field(default_factory=list)
    front_url: str | None = None  # nginx, when the clients go through it

    def data_dir(self, slot: int) -> Path:
        return self.tmp / ("data" if self.shared_folder else f"host{slot}")

    def start(self, slot: int | None = None) -> None:
        index = len(self.servers) if slot is None else slot
        args = self.args
        if slot is not None and self.front_url is not None:
            # nginx's upstream names each host's port: a host restarted keeps its own.
            args = (*args, "--port", self.servers[slot].url.rsplit(":", 1)[1])
        server = start_server(self.data_dir(index), *args)
        if slot is None:
            self.servers.append(server)
        else:
            self.servers[slot].close()
            self.replaced.append(self.servers[slot])
            self.servers[slot] = server

    def unexpected_errors(self) -> list[str]:
        """Every error a server logged with its traceback (an answer of 500), all processes."""
        found = []
        for server in self.replaced + self.servers:
            text = "".join(server.output)
            for marker in ("Unexpected error", "Storage failure", "Traceback"):
                found += [marker + part[:3000] for part in text.split(marker)[1:]]
        return found

    def host_urls(self) -> list[str]:
        return [s.url for s in self.servers if s.process.poll() is None]

    def urls(self) -> list[str]:
        """Where the clients send: nginx, or each live server."""
        return [self.front_url] if self.front_url else self.host_urls()

    def measure_baselines(self) -> None:
        for server in self.servers:
            if server.process.pid not in self.baselines:
                process = psutil.Process(server.process.pid)
                self.baselines[server.process.pid] = (process.num_fds(), process.memory_info().rss)


@dataclass
class Tally:
    faults: Counter[str] = field(default_factory=Counter)
    retried: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0
    restarts: list[tuple[str, float, float]] = field(
        default_factory=list
    )  # signal, stop s, start s
    # outage, seconds down, seconds from its return until every host is healthy again
    recoveries: list[tuple[str, float, float]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # broken promises, failed at the end


async def disconnect_mid_chunk(url: str, upload: Upload, index: int) -> None:
    """Send half a chunk on a raw connection, then hang up."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    boundary = "soak"
    fields = {"file_id": upload.file_id, "chunk_index": index, "total_chunks": upload.total,
              "filename": "soak.bin"}  # fmt: skip
    head = (
        "".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
            for k, v in fields.items()
        )
        + f'--{boundary}\r\nContent-Disposition: form-data; name="chunk"; filename="b"\r\n\r\n'
    )
    chunk = upload.chunk(index)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /upload-chunk HTTP/1.1\r\nHost: soak\r\n"
            + f"Content-Type: multipart/form-data; boundary={boundary}\r\n".encode()
            + f"Content-Length: {len(head) + len(chunk) + 100}\r\n\r\n".encode()
            + head.encode()
            + chunk[: len(chunk) // 2]
        )
        await writer.drain()
        writer.close()
    except OSError:
        pass


async def send_chunk(
    session: aiohttp.ClientSession, cluster: Cluster, upload: Upload, index: int, tally: Tally
) -> dict:
    """Send one chunk to either server, retrying through restarts."""
    for attempt in range(200):
        urls = cluster.urls()
        if not urls:
            await asyncio.sleep(0.1)
            continue
        form = aiohttp.FormData()
        for name, value in {"file_id": upload.file_id, "chunk_index": str(index),
                            "total_chunks": str(upload.total), "filename": "soak.bin"}.items():  # fmt: skip
            form.add_field(name, value)
        import io

        form.add_field("chunk", io.BytesIO(upload.chunk(index)), filename="blob")
        try:
            async with session.post(f"{random.choice(urls)}/upload-chunk", data=form) as response:
                body = await response.json(content_type=None)
                if response.status == 200:
                    tally.bytes_sent += len(upload.chunk(index))
                    return body
                assert response.status >= 500, (response.status, body)  # never a 4xx here
                tally.retried[f"http {response.status}"] += 1
                if response.status == 503 and "Retry-After" not in response.headers:
                    tally.problems.append(f"503 without Retry-After: {body}")
        except (TimeoutError, aiohttp.ClientError, ValueError) as e:
            tally.retried[type(e).__name__] += 1
        await asyncio.sleep(min(0.5, 0.05 * (attempt + 1)))
    raise AssertionError(f"chunk {index} of {upload.file_id} never got through")


async def delete_upload(session: aiohttp.ClientSession, cluster: Cluster, file_id: str) -> None:
    for _ in range(200):
        urls = cluster.urls()
        try:
            if urls:
                async with session.delete(f"{random.choice(urls)}/uploads/{file_id}") as response:
                    if response.status in (204, 404):
                        return
        except (TimeoutError, aiohttp.ClientError):
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"could not delete {file_id}")


async def client_loop(
    cluster: Cluster, uploads: list[Upload], tally: Tally, deadline: float, rng: random.Random
) -> None:
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while time.monotonic() < deadline:
            upload = Upload(uuid.uuid4().hex, os.urandom(rng.randint(1, 3 * MiB)),
                            rng.choice([64 * KiB, 256 * KiB, MiB]))  # fmt: skip
            uploads.append(upload)
            order = list(range(upload.total))
            parallel = rng.random() < 0.5
            if parallel:
                rng.shuffle(order)
            abort_at = rng.randrange(upload.total) if rng.random() < 0.1 else None
            leave_at = rng.randrange(upload.total) if rng.random() < 0.05 else None
            gate = asyncio.Semaphore(4 if parallel else 1)

            async def one(
                index: int, upload: Upload = upload, gate: asyncio.Semaphore = gate
            ) -> None:
                async with gate:
                    if rng.random() < 0.05 and cluster.urls():
                        tally.faults["disconnect mid-chunk"] += 1
                        await disconnect_mid_chunk(rng.choice(cluster.urls()), upload, index)
                    answer = await send_chunk(session, cluster, upload, index, tally)
                    if rng.random() < 0.1:
                        tally.faults["duplicate chunk"] += 1
                        answer = await send_chunk(session, cluster, upload, index, tally)
                    if answer.get("status") == "completed":
                        upload.state = "completed"
                        upload.answered_crc64nvme = answer["crc64nvme"]

            stop_at = min(x for x in (abort_at, leave_at, upload.total) if x is not None)
            await asyncio.gather(*(one(i) for i in order[:stop_at]))
            if abort_at is not None and stop_at == abort_at and upload.state != "completed":
                tally.faults["abort"] += 1
                await delete_upload(session, cluster, upload.file_id)
                upload.state = "aborted"
            upload.seal()


async def restart_a_server(
    cluster: Cluster, tally: Tally, rng: random.Random, how: signal.Signals
) -> None:
    slot = rng.randrange(len(cluster.servers))
    server = cluster.servers[slot]
    tally.faults[how.name] += 1
    stopping = time.monotonic()
    server.process.send_signal(how)
    while server.process.poll() is None and time.monotonic() - stopping < 60:
        await asyncio.sleep(0.05)
    stopped = time.monotonic()
    await asyncio.to_thread(cluster.start, slot)
    tally.restarts.append(
        (how.name, round(stopped - stopping, 2), round(time.monotonic() - stopped, 2))
    )
    await asyncio.sleep(0.5)
    cluster.measure_baselines()


async def health_of(session: aiohttp.ClientSession, url: str) -> tuple[int, dict]:
    try:
        async with session.get(f"{url}/healthz") as response:
            return response.status, await response.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError) as e:
        return 0, {"error": type(e).__name__}


async def outage(
    cluster: Cluster,
    tally: Tally,
    rng: random.Random,
    kind: str,
    part: str,
    stop: Callable[[], None],
    start: Callable[[], None],
) -> None:
    """Take a part of the S3 mode away for 1 to 4 s under load, then give it back: while it
    is away each host's /healthz must name it; once back, every host must be healthy again
    within RECOVERY_SECONDS."""
    tally.faults[kind] += 1
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        began = time.monotonic()
        await asyncio.to_thread(stop)
        await asyncio.sleep(0.3)
        for url in cluster.host_urls():
            status, body = await health_of(session, url)
            if status != 503 or body.get("checks", {}).get(part) != "failing":
                tally.problems.append(f"{kind}: /healthz of {url} answered {status} {body}")
        await asyncio.sleep(rng.uniform(1, 4))
        await asyncio.to_thread(start)
        back = time.monotonic()
        pending = set(cluster.host_urls())
        while pending and time.monotonic() - back < 60:
            for url in list(pending):
                if (await health_of(session, url))[0] == 200:
                    pending.discard(url)
            await asyncio.sleep(0.1)
        recovered = time.monotonic() - back
        tally.recoveries.append((kind, round(back - began, 1), round(recovered, 1)))
        if recovered > RECOVERY_SECONDS:
            tally.problems.append(f"{kind}: service back only after {recovered:.1f} s")


async def restarter(
    cluster: Cluster,
    tally: Tally,
    deadline: float,
    rng: random.Random,
    stack: S3Stack | None,
) -> None:
    """Every 4 to 8 s one fault: a server SIGKILLed or SIGTERMed and started again; with S3
    also PostgreSQL restarted (a fast shutdown, as `pg_ctl restart -m fast`) or the Swift
    proxy killed, each kept down 1 to 4 s."""
    faults = ["SIGKILL", "SIGTERM"] + (["postgres", "swift"] if stack is not None else [])
    while time.monotonic() < deadline - 8:
        await asyncio.sleep(rng.uniform(4, 8))
        fault = rng.choice(faults)
        if fault == "postgres" and stack is not None:
            await outage(cluster, tally, rng, "postgres restart", "database",
                         stack.postgres.shut_down, stack.postgres.start_again)  # fmt: skip
        elif fault == "swift" and stack is not None:
            await outage(cluster, tally, rng, "swift proxy killed", "object_store",
                         stack.swift.kill_proxy, stack.swift.start_proxy)  # fmt: skip
        else:
            await restart_a_server(cluster, tally, rng, signal.Signals[fault])


@dataclass
class S3Stack:
    """The soak's own Swift and PostgreSQL (it stops and starts them), a bucket and a
    database on them."""

    swift: realstack.Swift
    postgres: realstack.Postgres
    settings: dict[str, Any]

    def close(self) -> None:
        self.swift.stop()
        self.postgres.stop()


def start_s3_stack(tmp: Path) -> S3Stack:
    for reason in (realstack.why_missing_swift(), realstack.why_missing_postgres()):
        if reason is not None:
            pytest.skip(reason)
    swift = realstack.start_swift(tmp / "swift", unsynced=True)
    try:
        postgres = realstack.start_postgres()
    except BaseException:
        swift.stop()
        raise
    realstack.create_bucket(swift, "soak")
    settings = {
        "storage": "s3",
        "s3_endpoint_url": swift.endpoint_url,
        "s3_bucket": "soak",
        "s3_region": realstack.SWIFT_REGION,
        "s3_access_key_id": realstack.SWIFT_ACCESS_KEY,
        "s3_secret_access_key": realstack.SWIFT_SECRET_KEY,
        "s3_max_parts": realstack.SWIFT_MAX_PARTS,
        "database_url": realstack.create_database(postgres, "soak"),
    }
    return S3Stack(swift, postgres, settings)


def start_cluster(backend: str, tmp: Path, stack: S3Stack | None) -> tuple[Cluster, Any]:
    """The servers, and nginx in front of them on S3 (None on the local disk)."""
    if stack is None:
        cluster = Cluster(tmp)
        cluster.start()
        cluster.start()
        return cluster, None
    config = tmp / "host.toml"
    config.write_text("\n".join([*s3_flags(stack.settings), "min_free_bytes = 0"]) + "\n")
    cluster = Cluster(tmp, ("--config", str(config)), shared_folder=False)
    for _ in range(3):
        cluster.start()
    ports = [int(server.url.rsplit(":", 1)[1]) for server in cluster.servers]
    prefix = tmp / "nginx"
    prefix.mkdir()
    port = free_port()
    site = render((ROOT / "deploy" / "nginx-multihost.conf").read_text(), ports, port)
    nginx = run_nginx(prefix, site, port)
    cluster.front_url = f"http://127.0.0.1:{port}"
    return cluster, nginx


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_soak(tmp_path: Path, pytestconfig: pytest.Config, backend: str) -> None:
    seconds = pytestconfig.getoption("--soak-seconds")
    stack = start_s3_stack(tmp_path) if backend == "s3" else None
    cluster, nginx = None, None
    rng = random.Random(int(os.environ.get("SOAK_SEED", "1234")))
    uploads: list[Upload] = []
    tally = Tally()

    async def run() -> None:
        assert cluster is not None
        await asyncio.sleep(0.5)
        cluster.measure_baselines()
        deadline = time.monotonic() + seconds
        clients = [client_loop(cluster, uploads, tally, deadline, random.Random(rng.random()))
                   for _ in range(6)]  # fmt: skip
        await asyncio.gather(
            restarter(cluster, tally, deadline, random.Random(rng.random()), stack), *clients
        )

    started = time.monotonic()
    try:
        cluster, nginx = start_cluster(backend, tmp_path, stack)
        asyncio.run(run())
        time.sleep(1.0)  # let the last answers' cleanups land
        if stack is None:
            report = verify(cluster, uploads, tmp_path / "data")
        else:
            report = asyncio.run(verify_s3(cluster, uploads, stack))
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        for server in cluster.servers if cluster is not None else []:
            server.close()
        if stack is not None:
            stack.close()
    states = Counter(u.state for u in uploads)
    print(
        f"\nsoak ({backend}): {time.monotonic() - started:.0f} s, {len(uploads)} uploads "
        f"({states['completed']} completed, {states['aborted']} aborted, {states['open']} left open), "
        f"{tally.bytes_sent / MiB:.0f} MiB acknowledged\n"
        f"faults injected: {dict(tally.faults)}; all survived\n"
        f"retried by the clients: {dict(tally.retried)}\n"
        f"restarts (signal, seconds to stop, seconds to start): {tally.restarts}\n"
        f"outages (what, seconds down, seconds to recover): {tally.recoveries}\n"
        f"servers at the end: {report['servers']}\n"
        f"lost: {report['lost']}"
    )
    errors = cluster.unexpected_errors() if cluster is not None else []
    for error in errors:  # answered 500, which the clients retried
        print(f"\nserver error:\n{error}")
    assert report["lost"] == 0
    # No server error on either backend: a kill, a restart, a stalled or cut client is
    # answered as the contract says, never with a 500 or a traceback.
    assert tally.retried["http 500"] == 0 and errors == []
    if stack is not None:  # S3 mode's promises under faults: 503 only, one line per outage
        assert tally.problems == [], tally.problems


def verify(cluster: Cluster, uploads: list[Upload], data_dir: Path) -> dict:
    lost = 0
    for upload in uploads:
        if upload.state == "completed":
            path = data_dir / "uploads" / upload.file_id / "soak.bin"
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != upload.sha256:
                lost += 1
            assert upload.answered_crc64nvme == upload.crc64nvme
        elif upload.state == "aborted":
            assert not (data_dir / "uploads" / upload.file_id).exists()
            assert stored_chunks(data_dir / "chunks" / upload.file_id) == {}
    open_ids = {u.file_id for u in uploads if u.state == "open"}
    for folder in (data_dir / "chunks").iterdir():
        if folder.name not in (".incoming", ".trash") and folder.name not in open_ids:
            assert stored_chunks(folder) == {}, f"chunks left for {folder.name}"
    # Finished chunk folders wait in .trash only while a live process unlinks them; a
    # killed process's are removed by the sweep that starts its successor.
    live = {str(server.process.pid) for server in cluster.servers}
    for folder in (data_dir / "chunks" / ".trash").iterdir():
        assert folder.name.split(".")[-3] in live, f"trash left by a dead process: {folder}"
    assert temp_files(data_dir) == []
    servers = []
    for server in cluster.servers:
        process, fds, idle_fds, said = measured(cluster, server)
        # An upload's folder, data file and log stay open across its chunks, for at most
        # MAX_OPEN_UPLOADS uploads: those left open, or ended by another process.
        cached = upload_files_held(process, data_dir)
        said += f", {cached} held open for uploads"
        servers.append(said)
        assert cached <= 3 * MAX_OPEN_UPLOADS, said
        assert fds - cached <= idle_fds + 2, said
    return {"lost": lost, "servers": servers}


def upload_files_held(process: psutil.Process, data_dir: Path) -> int:
    """Descriptors on upload folders and files (chunkserver/openuploads.py's cache)."""
    roots = tuple(str(data_dir / name) for name in ("chunks", "uploads"))
    held = 0
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).startswith(roots):
                held += 1
    return held


def measured(cluster: Cluster, server: ServerProcess) -> tuple[psutil.Process, int, int, str]:
    """A server's process, its descriptors now and when idle, and a line saying both and its
    RSS; its RSS must not have grown by 64 MiB."""
    process = psutil.Process(server.process.pid)
    fds, rss = process.num_fds(), process.memory_info().rss
    idle_fds, idle_rss = cluster.baselines[server.process.pid]
    said = (
        f"pid {server.process.pid}: fds {idle_fds}->{fds}, "
        f"RSS {idle_rss / MiB:.0f}->{rss / MiB:.0f} MiB"
    )
    assert rss - idle_rss < 64 * MiB, said
    return process, fds, idle_fds, said


async def verify_s3(cluster: Cluster, uploads: list[Upload], stack: S3Stack) -> dict:
    """One sweep (every upload still open expires: its TTL taken as 0), then the bucket holds
    exactly the completed objects, byte for byte, and no staging object and no open
    multipart upload; the hosts are back near their idle descriptors and memory."""
    from chunkserver import Config
    from chunkserver.storage.backends import build_store
    from chunkserver.storage.s3 import S3Store
    from chunkserver.storage.s3.pieces import STAGED_COPIES_FILES

    config = Config(data_dir=str(cluster.tmp / "sweeper"), **stack.settings)
    store = build_store(config)
    assert isinstance(store, S3Store)
    await store.backend.open()
    try:
        await store.janitor.sweep(ttl_seconds=1e-9)
    finally:
        await store.backend.close()
    s3: Any = realstack.s3_client(stack.swift)
    listed = s3.get_paginator("list_objects_v2").paginate(Bucket="soak")
    keys = {o["Key"] for page in listed for o in page.get("Contents", [])}
    completed = {u.file_id: u for u in uploads if u.state == "completed"}
    expected = {f"uploads/{file_id}/soak.bin" for file_id in completed}
    lost = len(expected - keys)
    assert keys - expected == set(), f"objects left: {sorted(keys - expected)[:10]}"
    for file_id, upload in completed.items():
        key = f"uploads/{file_id}/soak.bin"
        if key in keys:
            data = await asyncio.to_thread(
                lambda k=key: s3.get_object(Bucket="soak", Key=k)["Body"].read()
            )
            if hashlib.sha256(data).hexdigest() != upload.sha256:
                lost += 1
        assert upload.answered_crc64nvme == upload.crc64nvme
    multipart = s3.list_multipart_uploads(Bucket="soak").get("Uploads", [])
    assert multipart == [], f"open multipart uploads: {multipart[:5]}"
    servers = []
    for server in cluster.servers:
        process, fds, idle_fds, said = measured(cluster, server)
        servers.append(said)
        # Connections stay open after the load: nginx's upstream keep-alive (up to 64 per
        # nginx worker) and the pools to the database (up to 20) and the object store.
        held = open_files_of(process, stack)
        servers[-1] += f" {dict(held)}"
        kept = sum(n for what, n in held.items() if what.startswith(("from nginx", "to the")))
        cached = held["copies of staged chunks (a cache)"]
        assert cached <= STAGED_COPIES_FILES, servers[-1]
        assert fds - kept - cached <= idle_fds + 2, servers[-1]
    return {"lost": lost, "servers": servers}


def open_files_of(process: psutil.Process, stack: S3Stack) -> Counter[str]:
    """What a host holds beyond its idle count: the copies of staged chunks it keeps for
    gathering (a cache of at most STAGED_COPIES_FILES), connections to the object store, to
    the database and from nginx (its upstream keep-alive), by state."""
    peers = {
        int(stack.swift.endpoint_url.rsplit(":", 1)[1]): "object store",
        stack.postgres.port: "database",
    }
    listening = {c.laddr.port for c in process.net_connections() if c.status == "LISTEN"}
    held: Counter[str] = Counter()
    for fd in Path(f"/proc/{process.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if "/scratch/" in target:
                held["copies of staged chunks (a cache)"] += 1
            elif not target.startswith("/"):
                held[target.split(":")[0]] += 1
    for c in process.net_connections():
        if c.status == "LISTEN":
            continue
        if c.laddr.port in listening:
            held[f"from nginx {c.status}"] += 1
        else:
            held[f"to the {peers.get(c.raddr.port if c.raddr else 0, 'other')} {c.status}"] += 1
    return held
