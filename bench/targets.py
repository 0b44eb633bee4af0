"""What the harness measures: a chunkserver it starts (or one at --url), a sink, and nginx."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

LISTENING = re.compile(r"listening on ((?:http://|unix:)\S+)")
# nginx in the foreground in its own prefix, as every nginx of the bench runs.
NGINX_MAIN = """\
{user}worker_processes {workers};
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/body;
"""
NGINX_CONF = (
    NGINX_MAIN
    + """\
    client_max_body_size 0;
    client_body_buffer_size 1m;
    server {{
        listen 127.0.0.1:{port};
        # The limit: nginx writes each request body to a file in C (the DAV module puts it
        # in a temporary file, then renames it into place). No merge, no checksum.
        location /sink/ {{
            root {prefix}/store;
            dav_methods PUT;
            create_full_put_path on;
            client_body_in_file_only clean;
        }}
        # The second reference: the same, its bodies' files kept (`on`), as chunkserver keeps
        # its uploads until the cell's end.
        location /keep/ {{
            root {prefix}/store;
            dav_methods PUT;
            create_full_put_path on;
            client_body_in_file_only on;
        }}
    }}
}}
"""
)


@dataclass
class Target:
    name: str
    url: str
    process: subprocess.Popen[str] | None = None
    cleanup_dirs: list[Path] = field(default_factory=list)
    peer: Any = None  # the S3 bench's plain client (s3peer.S3Direct), instead of a server
    token: str | None = None  # the bearer credential this target's requests carry
    # Processes in front of `process` whose CPU and memory count with it (nginx before
    # chunkserver in `chunkserver-nginx`).
    companions: list[subprocess.Popen[str]] = field(default_factory=list)

    def pids(self) -> list[int]:
        pids = []
        for process in [self.process, *self.companions]:
            if process is None:
                continue
            try:
                parent = psutil.Process(process.pid)
                pids += [parent.pid] + [c.pid for c in parent.children(recursive=True)]
            except psutil.Error:
                pass
        return pids

    def stop(self) -> None:
        for process in [*self.companions, self.process]:
            if process is not None:
                _stop(process)
        for folder in self.cleanup_dirs:
            shutil.rmtree(folder, ignore_errors=True)


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process.stdout is not None:
        process.stdout.close()


def _wait_for_url(process: subprocess.Popen[str], pattern: re.Pattern[str]) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = pattern.search(line)
        if match:
            # keep draining its output so that a full pipe never blocks it
            threading.Thread(target=lambda: [None for _ in process.stdout], daemon=True).start()  # type: ignore[union-attr]
            return match.group(1)
    process.kill()
    raise RuntimeError("did not start:\n" + "".join(lines))


def start_chunkserver(
    *,
    workers: int | str,
    fsync: bool,
    data_root: Path | None,
    checksums: str | None = None,
    extra_config: str = "",
    unix_socket: bool = False,
) -> Target:
    """chunkserver on a free port, or on a unix socket in its folder (`unix_socket`: the
    target's url is then `unix:<path>`)."""
    folder = Path(tempfile.mkdtemp(prefix="bench-data-", dir=data_root))
    config = folder / "bench.toml"
    names = ", ".join(f'"{n.strip()}"' for n in (checksums or "crc64nvme").split(","))
    config.write_text(
        f'fsync = {"true" if fsync else "false"}\naccess_log = false\nlog_level = "warning"\n'
        f"min_free_bytes = 0\nmax_chunk_bytes = 67108864\nchecksums = [{names}]\n" + extra_config
    )
    where = ["--unix-socket", str(folder / "chunkserver.sock")] if unix_socket else ["--port", "0"]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chunkserver",
            "serve",
            "--config",
            str(config),
            *where,
            "--data-dir",
            str(folder / "data"),
            "--workers",
            str(workers),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return Target("chunkserver", _wait_for_url(process, LISTENING), process, [folder])


DEPLOYED_MAIN_CONF = (
    NGINX_MAIN
    + """\
    proxy_temp_path {prefix}/proxy;
    include {prefix}/chunkserver.conf;
}}
"""
)


def deployed_site(text: str, socket_path: str, port: int, uploads: Path) -> str:
    """deploy/nginx.conf with one upstream, `socket_path`, listening on `port`, sending
    the files of `uploads`; nothing else changed."""
    upstreams = re.findall(r"^\s*server unix:\S+[^\n]*\n", text, re.MULTILINE)
    first = re.sub(r"unix:\S+", f"unix:{socket_path}", upstreams[0])
    text = text.replace(upstreams[0], first, 1)
    for line in upstreams[1:]:
        text = text.replace(line, "", 1)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{port};")
    return text.replace("/var/lib/chunkserver/data/uploads/", f"{uploads}/")


def start_behind_nginx(
    *, workers: int | str, fsync: bool, data_root: Path | None, site: Path | None = None
) -> Target:
    """`chunkserver-nginx`: chunkserver as deployed, behind deploy/nginx.conf with its upstream
    pointed at one unix socket (the started server's, with as many workers as
    `chunkserver`) and nothing else changed but its paths and port; nginx's CPU and memory
    count with chunkserver's. `site`: another file than deploy/nginx.conf (to compare)."""
    binary = _nginx_binary()
    if binary is None:
        raise SystemExit("--behind-nginx needs nginx (apt-get install nginx)")
    ours = start_chunkserver(
        workers=workers,
        fsync=fsync,
        data_root=data_root,
        extra_config='trusted_proxies = ["unix"]\naccel_redirect_prefix = "/_chunkserver_files/"\n',
        unix_socket=True,
    )
    socket_path = ours.url.removeprefix("unix:")
    data_dir = ours.cleanup_dirs[0] / "data"
    prefix = Path(tempfile.mkdtemp(prefix="bench-deployed-", dir=data_root))
    port = free_port()
    site_text = (site or ROOT / "deploy" / "nginx.conf").read_text()
    site_text = deployed_site(site_text, socket_path, port, data_dir / "uploads")
    (prefix / "chunkserver.conf").write_text(site_text)
    user = "user root;\n" if os.geteuid() == 0 else ""
    main_conf = DEPLOYED_MAIN_CONF.format(prefix=prefix, user=user, workers=workers)
    nginx = _run_nginx(binary, prefix, main_conf, port)
    url = f"http://127.0.0.1:{port}"
    return Target(
        "chunkserver-nginx", url, ours.process, [*ours.cleanup_dirs, prefix], companions=[nginx]
    )


def start_fastapi(data_root: Path | None, variant: str = "def") -> Target | None:
    """The seed's FastAPI endpoint (bench/fastapi_seed.py) on uvicorn, as a `def` or an
    `async def` endpoint; None without FastAPI."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        return None
    folder = Path(tempfile.mkdtemp(prefix="bench-fastapi-", dir=data_root))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.fastapi_seed",
            "--port",
            "0",
            "--data-dir",
            str(folder),
            "--variant",
            variant,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    name = "fastapi" if variant == "def" else "fastapi-async"
    return Target(name, _wait_for_url(process, LISTENING), process, [folder])


ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "tests" / "js" / "node_modules"  # npm ci in tests/js


def start_tus_server(data_root: Path | None, buffer: memoryview) -> Target | None:
    """@tus/server with its FileStore (bench/tus_server.js) in Node; None without them."""
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@tus" / "server").is_dir():
        return None
    from .tusload import TusLoad

    folder = Path(tempfile.mkdtemp(prefix="bench-tus-", dir=data_root))
    port = free_port()
    process = subprocess.Popen(
        [node, str(ROOT / "bench" / "tus_server.js"), str(folder), str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )
    url = _wait_for_url(process, LISTENING)
    return Target(
        "tus-server", url, process, [folder], peer=TusLoad(f"{url}/files/", buffer=buffer)
    )


def start_tus_s3_server(stack: S3Stack, buffer: memoryview) -> Target | None:
    """@tus/server with @tus/s3-store on the same Swift and bucket (bench/tus_s3_server.js);
    None without Node.js or the package."""
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "@tus" / "s3-store").is_dir():
        return None
    from .tusload import TusLoad

    port = free_port()
    settings = stack.settings
    process = subprocess.Popen(
        [node, str(ROOT / "bench" / "tus_s3_server.js"), str(port),
         settings["s3_endpoint_url"], settings["s3_bucket"], settings["s3_region"],
         settings["s3_access_key_id"], settings["s3_secret_access_key"]],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
    )  # fmt: skip
    url = _wait_for_url(process, LISTENING)
    return Target("tus-s3-store", url, process, peer=TusLoad(f"{url}/files/", buffer=buffer))


def start_sink() -> Target:
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.sink", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return Target("sink", _wait_for_url(process, LISTENING), process)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_nginx(data_root: Path | None, workers: int | str = 1) -> list[Target]:
    """nginx with as many worker processes as chunkserver has (`auto`: one per core), as two
    targets: `nginx` (its location /sink/) and `nginx-keep` (/keep/, bodies kept)."""
    binary = _nginx_binary()
    if binary is None:
        return []
    prefix = Path(tempfile.mkdtemp(prefix="bench-nginx-", dir=data_root))
    for location in NGINX_LOCATIONS:
        (prefix / "store" / location).mkdir(parents=True)
    port = free_port()
    # As root, nginx's workers would run as nobody, who cannot write to our temp folder.
    user = "user root;\n" if os.geteuid() == 0 else ""
    main_conf = NGINX_CONF.format(prefix=prefix, port=port, user=user, workers=workers)
    process = _run_nginx(binary, prefix, main_conf, port)
    url = f"http://127.0.0.1:{port}"
    return [Target("nginx", url, process, [prefix]), Target("nginx-keep", url, process, [prefix])]


def nginx_present() -> bool:
    return _nginx_binary() is not None


def _nginx_binary() -> str | None:
    return shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )


def _run_nginx(binary: str, prefix: Path, main_conf: str, port: int) -> subprocess.Popen[str]:
    """nginx in the foreground with `main_conf`, once it accepts connections on `port`."""
    (prefix / "nginx.conf").write_text(main_conf)
    process = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with __import__("socket").create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(
                    f"nginx did not start: {process.stdout.read() if process.stdout else ''}"
                ) from None
            time.sleep(0.05)
    return process


# nginx's targets, by the location each is sent to.
NGINX_LOCATIONS = {"nginx": "sink", "nginx-keep": "keep"}


def clear_nginx_store(target: Target) -> None:
    location = NGINX_LOCATIONS[target.name]
    for folder in target.cleanup_dirs:
        shutil.rmtree(folder / "store" / location, ignore_errors=True)
        (folder / "store" / location).mkdir(parents=True, exist_ok=True)


class ResourceSampler:
    """Samples the peak RSS (summed over the processes) and their CPU seconds."""

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.processes = [psutil.Process(p) for p in pids]
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._cpu_start = self._cpu()

    def _written(self) -> int:
        """Bytes the processes caused to be written to storage (/proc/PID/io write_bytes):
        page cache dirtied, whether or not it has reached the disk yet."""
        total = 0
        for process in self.processes:
            try:
                total += process.io_counters().write_bytes
            except (psutil.Error, AttributeError):
                pass
        return total

    def _cpu(self) -> float:
        total = 0.0
        for process in self.processes:
            try:
                times = process.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                pass
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = 0
            for process in self.processes:
                try:
                    rss += process.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            time.sleep(self.interval)

    def __enter__(self) -> ResourceSampler:
        self._cpu_start = self._cpu()
        self._written_start = self._written()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_seconds = self._cpu() - self._cpu_start
        self.written_bytes = self._written() - self._written_start


@dataclass
class S3Stack:
    """A real one-node Swift (S3 API) and PostgreSQL for `--storage s3`, from tests/realstack."""

    swift: Any
    postgres: Any
    settings: dict[str, Any]

    def pids(self) -> list[int]:
        """Swift's servers, memcached, and PostgreSQL with its backends."""
        pids = [p.pid for p in self.swift.processes]
        try:
            parent = psutil.Process(self.postgres.process.pid)
            pids += [parent.pid] + [c.pid for c in parent.children(recursive=True)]
        except psutil.Error:
            pass
        return pids

    def object_settings(self) -> Any:
        """The same bucket and keys, for the plain S3 client."""
        from chunkserver.storage.s3.objects import Settings

        return Settings(
            bucket=self.settings["s3_bucket"],
            endpoint_url=self.settings["s3_endpoint_url"],
            region=self.settings["s3_region"],
            access_key_id=self.settings["s3_access_key_id"],
            secret_access_key=self.settings["s3_secret_access_key"],
        )

    def config_lines(self) -> str:
        return "".join(f"{k} = {json.dumps(v)}\n" for k, v in self.settings.items())

    def stop(self) -> None:
        self.swift.stop()
        self.postgres.stop()
        shutil.rmtree(self.swift.folder, ignore_errors=True)


def start_s3_stack(data_root: Path | None) -> S3Stack:
    from tests import realstack

    for reason in (realstack.why_missing_swift(), realstack.why_missing_postgres()):
        if reason is not None:
            raise SystemExit(f"--storage s3: {reason}")
    folder = Path(tempfile.mkdtemp(prefix="bench-swift-", dir=data_root))
    swift = realstack.start_swift(folder)
    try:
        postgres = realstack.start_postgres()
    except BaseException:
        swift.stop()
        raise
    realstack.create_bucket(swift, "bench")
    settings = {
        "storage": "s3",
        "s3_endpoint_url": swift.endpoint_url,
        "s3_bucket": "bench",
        "s3_region": realstack.SWIFT_REGION,
        "s3_access_key_id": realstack.SWIFT_ACCESS_KEY,
        "s3_secret_access_key": realstack.SWIFT_SECRET_KEY,
        "s3_max_parts": realstack.SWIFT_MAX_PARTS,
        "database_url": realstack.create_database(postgres, "bench"),
    }
    return S3Stack(swift, postgres, settings)
