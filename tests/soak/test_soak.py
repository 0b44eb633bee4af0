"""The soak: many clients, many files, faults of every kind, two server processes restarted
under them, and at the end nothing lost.

    pytest tests/soak                        # 60 s of load (CI)
    pytest tests/soak --soak-seconds 600 -s  # the long soak, with its summary printed

See tests/soak/README.md for what is injected and checked, and the last long run's summary.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import pytest

from ..conftest import ServerProcess, crc64, start_server, temp_files

pytestmark = pytest.mark.slow
MiB = 2**20
KiB = 2**10


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
    """Two `chunkserver serve` processes on one data folder, restarted by the test."""

    data_dir: Path
    servers: list[ServerProcess] = field(default_factory=list)
    baselines: dict[int, tuple[int, int]] = field(default_factory=dict)  # pid -> (fds, rss)
    replaced: list[ServerProcess] = field(default_factory=list)

    def start(self, slot: int | None = None) -> None:
        server = start_server(self.data_dir)
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
            for marker in ("Unexpected error", "Storage failure"):
                found += [marker + part[:3000] for part in text.split(marker)[1:]]
        return found

    def urls(self) -> list[str]:
        return [s.url for s in self.servers if s.process.poll() is None]

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


async def restarter(cluster: Cluster, tally: Tally, deadline: float, rng: random.Random) -> None:
    while time.monotonic() < deadline - 5:
        await asyncio.sleep(rng.uniform(4, 8))
        slot = rng.randrange(len(cluster.servers))
        server = cluster.servers[slot]
        how = rng.choice([signal.SIGKILL, signal.SIGTERM])
        tally.faults["SIGKILL" if how == signal.SIGKILL else "SIGTERM"] += 1
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


def test_soak(tmp_path: Path, pytestconfig: pytest.Config) -> None:
    seconds = pytestconfig.getoption("--soak-seconds")
    data_dir = tmp_path / "data"
    cluster = Cluster(data_dir)
    cluster.start()
    cluster.start()
    rng = random.Random(int(os.environ.get("SOAK_SEED", "1234")))
    uploads: list[Upload] = []
    tally = Tally()

    async def run() -> None:
        await asyncio.sleep(0.5)
        cluster.measure_baselines()
        deadline = time.monotonic() + seconds
        clients = [client_loop(cluster, uploads, tally, deadline, random.Random(rng.random()))
                   for _ in range(6)]  # fmt: skip
        await asyncio.gather(
            restarter(cluster, tally, deadline, random.Random(rng.random())), *clients
        )

    started = time.monotonic()
    try:
        asyncio.run(run())
        time.sleep(1.0)  # let the last answers' cleanups land
        report = verify(cluster, uploads, data_dir)
    finally:
        for server in cluster.servers:
            server.close()
    states = Counter(u.state for u in uploads)
    print(
        f"\nsoak: {time.monotonic() - started:.0f} s, {len(uploads)} uploads "
        f"({states['completed']} completed, {states['aborted']} aborted, {states['open']} left open), "
        f"{tally.bytes_sent / MiB:.0f} MiB acknowledged\n"
        f"faults injected: {dict(tally.faults)}; all survived\n"
        f"retried by the clients: {dict(tally.retried)}\n"
        f"restarts (signal, seconds to stop, seconds to start): {tally.restarts}\n"
        f"servers at the end: {report['servers']}\n"
        f"lost: {report['lost']}"
    )
    for error in cluster.unexpected_errors():  # answered 500, which the clients retried
        print(f"\nserver error:\n{error}")
    assert report["lost"] == 0


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
            assert not list((data_dir / "chunks" / upload.file_id).glob("chunk_*"))
    open_ids = {u.file_id for u in uploads if u.state == "open"}
    for folder in (data_dir / "chunks").iterdir():
        if folder.name not in (".incoming", ".trash") and folder.name not in open_ids:
            assert not list(folder.glob("chunk_*")), f"chunks left for {folder.name}"
    # Finished chunk folders wait in .trash only while a live process unlinks them; a
    # killed process's are removed by the sweep that starts its successor.
    live = {str(server.process.pid) for server in cluster.servers}
    for folder in (data_dir / "chunks" / ".trash").iterdir():
        assert folder.name.split(".")[-3] in live, f"trash left by a dead process: {folder}"
    assert temp_files(data_dir) == []
    servers = []
    for server in cluster.servers:
        process = psutil.Process(server.process.pid)
        fds, rss = process.num_fds(), process.memory_info().rss
        idle_fds, idle_rss = cluster.baselines[server.process.pid]
        servers.append(f"pid {server.process.pid}: fds {idle_fds}->{fds}, "
                       f"RSS {idle_rss / MiB:.0f}->{rss / MiB:.0f} MiB")  # fmt: skip
        assert fds <= idle_fds + 2, servers[-1]
        assert rss - idle_rss < 64 * MiB, servers[-1]
    return {"lost": lost, "servers": servers}
