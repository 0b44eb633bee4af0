"""Real components for the S3 backend's tests: a one-node OpenStack Swift with its S3 API and
a PostgreSQL server, each started on a temporary folder and free ports, stopped at the end.

Both come from Debian's packages (`.ci/run` installs them). Swift runs under Debian's own
Python 3; PostgreSQL refuses to run as root, so it runs as the `postgres` user. Where either
is missing, `why_missing_*` says so and the tests that need it skip with that reason.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

SWIFT_SERVERS = ("account", "container", "object")
SWIFT_ACCESS_KEY = "test:tester"
SWIFT_SECRET_KEY = "testing"
SWIFT_REGION = "us-east-1"
SWIFT_MAX_PARTS = 1000  # Swift's s3api default max_upload_part_num
# Debian's eatmydata (.ci/run installs it): fsync and friends become no-ops in Swift.
EATMYDATA = Path("/usr/lib/x86_64-linux-gnu/libeatmydata.so")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(check: object, what: str, seconds: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode}")
        if check():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not become ready in {seconds:g} s")


# -- Swift -----------------------------------------------------------------------------------


def why_missing_swift() -> str | None:
    for program in ("swift-proxy-server", "swift-ring-builder", "memcached"):
        if shutil.which(program) is None:
            return (
                f"{program} not found: install Debian's swift swift-proxy swift-object "
                "swift-container swift-account memcached (.ci/run does)"
            )
    return None


@dataclass
class Swift:
    endpoint_url: str
    processes: list[subprocess.Popen[bytes]]
    folder: Path
    proxy_conf: Path | None = None
    env: dict[str, str] = field(default_factory=dict)

    def kill_proxy(self) -> None:
        """SIGKILL the proxy (the S3 API): the object store is gone until `start_proxy`."""
        proxy = self.processes[-1]
        proxy.kill()
        proxy.wait()

    def start_proxy(self) -> None:
        """Start the proxy again on its port; return once it answers."""
        assert self.proxy_conf is not None
        with open(self.folder / "swift.log", "ab") as log:
            proxy = _swift_server("swift-proxy-server", self.proxy_conf, self.env, log)
        self.processes[-1] = proxy
        url = f"{self.endpoint_url}/healthcheck"
        _wait_for(lambda: _answers_200(url), "swift-proxy-server", 30, proxy)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


_SWIFT_COMMON = """[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {port}
workers = 0
user = {user}
swift_dir = {etc}
devices = {devices}
mount_check = false
log_level = WARNING
log_address = /nonexistent
"""

_SWIFT_STORAGE = (
    _SWIFT_COMMON
    + """
[pipeline:main]
pipeline = {name}-server

[app:{name}-server]
use = egg:swift#{name}

[{name}-replicator]
[{name}-auditor]
[{name}-updater]
"""
)

_SWIFT_PROXY = (
    _SWIFT_COMMON
    + """
[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache s3api tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:{memcached_port}
[filter:s3api]
use = egg:swift#s3api
location = {region}
max_upload_part_num = {max_parts}
[filter:tempauth]
use = egg:swift#tempauth
user_test_tester = testing .admin
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
"""
)

_SWIFT_CONF = """[swift-hash]
swift_hash_path_prefix = chunkserver-tests
swift_hash_path_suffix = chunkserver-tests

[storage-policy:0]
name = Policy-0
default = yes
"""


def _system_python() -> str:
    """Debian's python3, which has Swift's modules (a virtual environment's does not)."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else "python3"


def start_swift(folder: Path, *, unsynced: bool = False) -> Swift:
    """A one-replica Swift with s3api on free ports; ready when /healthcheck answers 200.
    `unsynced`: its writes never synced to the disk, where eatmydata is installed."""
    etc, devices = folder / "etc", folder / "devices"
    (devices / "d0").mkdir(parents=True)
    etc.mkdir()
    (etc / "swift.conf").write_text(_SWIFT_CONF)
    # Swift reads the hash settings from the system-wide folder too.
    system_conf = Path("/etc/swift/swift.conf")
    with contextlib.suppress(OSError):
        system_conf.parent.mkdir(exist_ok=True)
        if not system_conf.exists() or "chunkserver-tests" not in system_conf.read_text():
            system_conf.write_text(_SWIFT_CONF)
    user = pwd.getpwuid(os.getuid()).pw_name
    ports = {name: free_port() for name in (*SWIFT_SERVERS, "proxy", "memcached")}
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = "/usr/bin:/bin:/usr/sbin:/sbin"
    if unsynced and EATMYDATA.exists():
        # Swift syncs every object and container write to the disk; a test's store need
        # not survive a power cut, as PostgreSQL runs with fsync=off. (The bench keeps
        # Swift as it is.)
        env["LD_PRELOAD"] = str(EATMYDATA)
    for name in SWIFT_SERVERS:
        builder = str(etc / f"{name}.builder")
        for args in (
            ["create", "6", "1", "1"],
            ["add", f"r1z1-127.0.0.1:{ports[name]}/d0", "1"],
            ["rebalance"],
        ):
            subprocess.run(
                [_system_python(), "/usr/bin/swift-ring-builder", builder, *args],
                check=False,  # rebalance exits 1 with a warning on a one-device ring
                capture_output=True,
                env=env,
            )
        if not (etc / f"{name}.ring.gz").exists():
            raise RuntimeError(f"swift-ring-builder made no {name} ring")
    common = {"user": user, "etc": etc, "devices": devices}
    processes: list[subprocess.Popen[bytes]] = []
    log = open(folder / "swift.log", "ab")  # noqa: SIM115 - kept open for the processes
    try:
        processes.append(
            subprocess.Popen(
                ["memcached", "-l", "127.0.0.1", "-p", str(ports["memcached"]), "-U", "0"]
                + (["-u", user] if os.getuid() == 0 else []),
                stdout=log,
                stderr=log,
            )
        )
        for name in SWIFT_SERVERS:
            conf = etc / f"{name}-server.conf"
            conf.write_text(_SWIFT_STORAGE.format(name=name, port=ports[name], **common))
            processes.append(_swift_server(f"swift-{name}-server", conf, env, log))
        proxy_conf = etc / "proxy-server.conf"
        proxy_conf.write_text(
            _SWIFT_PROXY.format(
                port=ports["proxy"],
                memcached_port=ports["memcached"],
                region=SWIFT_REGION,
                max_parts=SWIFT_MAX_PARTS,
                **common,
            )
        )
        proxy = _swift_server("swift-proxy-server", proxy_conf, env, log)
        processes.append(proxy)
        url = f"http://127.0.0.1:{ports['proxy']}"
        _wait_for(lambda: _answers_200(f"{url}/healthcheck"), "swift-proxy-server", 30, proxy)
    except BaseException:
        Swift("", processes, folder).stop()
        raise
    finally:
        log.close()
    return Swift(url, processes, folder, proxy_conf, env)


def _swift_server(
    program: str, conf: Path, env: dict[str, str], log: object
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [_system_python(), f"/usr/bin/{program}", str(conf)],
        stdout=log,  # type: ignore[arg-type]
        stderr=log,  # type: ignore[arg-type]
        env=env,
    )


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return bool(answer.status == 200)
    except (OSError, urllib.error.URLError):
        return False


# -- PostgreSQL ------------------------------------------------------------------------------


def postgres_bin() -> Path | None:
    """The folder of Debian's PostgreSQL binaries (not all on PATH), newest version first."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(folder, "postgres")):
            return Path(folder)
    return None


def why_missing_postgres() -> str | None:
    if postgres_bin() is None:
        return "PostgreSQL not found: install Debian's postgresql (.ci/run does)"
    if os.getuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "no postgres user to run PostgreSQL as (it refuses to run as root)"
    return None


@dataclass
class Postgres:
    url: str
    process: subprocess.Popen[bytes]
    folder: Path
    port: int = 0

    def shut_down(self) -> None:
        """A fast shutdown, as `pg_ctl stop -m fast` does: every client is cut off."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)

    def start_again(self) -> None:
        """Start the server again on its folder and port (with `shut_down`: a restart)."""
        binaries = postgres_bin()
        assert binaries is not None
        with open(self.folder / "postgres.log", "ab") as log:
            self.process = _start_postgres_server(
                binaries,
                self.folder / "pgdata",
                self.folder,
                self.port,
                log,
                _as_postgres_user(),
            )
        _wait_for(lambda: _accepts(self.port), "postgres", 30, self.process)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # fast shutdown: clients are cut off
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.folder, ignore_errors=True)


def _as_postgres_user() -> dict[str, object]:
    if os.getuid() != 0:
        return {}
    user = pwd.getpwnam("postgres")
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def start_postgres() -> Postgres:
    """initdb and postgres on a temporary folder and a free port, as the postgres user.

    The folder is made under the system's temporary folder, which the postgres user can
    reach (pytest's own folders are private to root)."""
    binaries = postgres_bin()
    assert binaries is not None
    folder = Path(tempfile.mkdtemp(prefix="chunkserver-postgres-"))
    data = folder / "pgdata"
    data.mkdir(parents=True)
    if os.getuid() == 0:
        user = pwd.getpwnam("postgres")
        for path in (folder, data):
            os.chown(path, user.pw_uid, user.pw_gid)
        folder.chmod(0o755)
    run_as = _as_postgres_user()
    made = subprocess.run(
        [str(binaries / "initdb"), "-D", str(data), "-U", "chunkserver", "--auth=trust"],
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
        **run_as,  # type: ignore[arg-type]
    )
    if made.returncode != 0:
        raise RuntimeError(f"initdb failed: {made.stderr.strip()}")
    port = free_port()
    with open(folder / "postgres.log", "ab") as log:
        process = _start_postgres_server(binaries, data, folder, port, log, run_as)
    _wait_for(lambda: _accepts(port), "postgres", 30, process)
    return Postgres(f"postgresql://chunkserver@127.0.0.1:{port}/postgres", process, folder, port)


def _start_postgres_server(
    binaries: Path,
    data: Path,
    folder: Path,
    port: int,
    log: object,
    run_as: dict[str, object],
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(binaries / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"unix_socket_directories={folder}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log,  # type: ignore[arg-type]
        cwd=tempfile.gettempdir(),
        **run_as,  # type: ignore[arg-type]
    )


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def create_bucket(swift: Swift, name: str) -> None:
    s3_client(swift).create_bucket(Bucket=name)  # type: ignore[attr-defined]


def s3_client(swift: Swift) -> object:
    """A plain boto3 client on the Swift, for tests that look at the bucket."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=swift.endpoint_url,
        aws_access_key_id=SWIFT_ACCESS_KEY,
        aws_secret_access_key=SWIFT_SECRET_KEY,
        region_name=SWIFT_REGION,
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


async def fetchval(database_url: str, sql: str, *args: object) -> object:
    """One statement on its own connection, as a test looks at or changes the state."""
    import asyncpg

    db = await asyncpg.connect(database_url)
    try:
        return await db.fetchval(sql, *args)
    finally:
        await db.close()


def create_database(postgres: Postgres, name: str) -> str:
    """A new empty database on the server; its URL."""
    binaries = postgres_bin()
    assert binaries is not None
    subprocess.run(
        [str(binaries / "psql"), postgres.url, "-q", "-c", f'CREATE DATABASE "{name}"'],
        check=True,
        capture_output=True,
    )
    return postgres.url.rsplit("/", 1)[0] + f"/{name}"


class CuttableProxy:
    """A TCP proxy on a free port in the test's event loop, to make a real server look
    unreachable: `cut()` drops every connection and refuses new ones; `restore()` undoes it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.cut_off = False
        self._server: object = None
        self._writers: set[object] = set()

    async def start(self) -> None:
        import asyncio

        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    async def _serve(self, reader: object, writer: object) -> None:
        import asyncio

        if self.cut_off:
            writer.close()  # type: ignore[attr-defined]
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()  # type: ignore[attr-defined]
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: object, sink: object) -> None:
            try:
                while data := await source.read(65536):  # type: ignore[attr-defined]
                    sink.write(data)  # type: ignore[attr-defined]
                    await sink.drain()  # type: ignore[attr-defined]
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                sink.close()  # type: ignore[attr-defined]

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}

    def cut(self) -> None:
        self.cut_off = True
        for writer in list(self._writers):
            writer.transport.abort()  # type: ignore[attr-defined]
        self._writers.clear()

    def restore(self) -> None:
        self.cut_off = False

    async def close(self) -> None:
        self.cut()
        self._server.close()  # type: ignore[attr-defined]
