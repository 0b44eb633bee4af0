"""Running the app: one process on uvloop, or a supervisor of N worker processes.

With `workers > 1` the supervisor binds first (so `port = 0` and unix sockets work alike),
then forks the workers. On TCP each worker opens its own SO_REUSEPORT socket on that port and
the kernel spreads connections over them; on a unix socket they share the supervisor's.
SIGINT and SIGTERM stop everything cleanly: the sites close, requests in flight get
`SHUTDOWN_TIMEOUT` seconds to finish, then the rest are cut (their temp files are removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from aiohttp import web

from .config import Config
from .http.app import PARSER_FIELD_BYTES, access_logger_for, create_app
from .http.keys import UPLOADS
from .logs import MalformedRequests, ThrottledLog
from .service.uploads import UploadService

SHUTDOWN_TIMEOUT = 30.0
# aiohttp's own shutdown comes after our drain of the chunks in flight. It can wait out its
# whole timeout on a keep-alive connection that went idle as it began, so keep it short;
# what it still cuts is a download in progress, which the client resumes with Range.
AIOHTTP_SHUTDOWN_TIMEOUT = 2.0
PR_SET_PDEATHSIG = 1  # prctl(2)
READ_BUFSIZE = 256 * 1024
log = logging.getLogger("chunkserver")


def configure_logging(config: Config) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s",
    )
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequests) for f in server_log.filters):
        server_log.addFilter(MalformedRequests(ThrottledLog(logging.getLogger("chunkserver"))))


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
HEAP_KEPT_BYTES = 32 * 1024 * 1024
HEAP_MMAP_ABOVE_BYTES = 4 * 1024 * 1024


def keep_freed_heap() -> None:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the kernel.

    Every socket read is a fresh buffer of up to 256 KiB. By default glibc gives the top of
    the heap back as soon as those buffers are freed, and the next ones fault their pages in
    again, zeroed by the kernel: about a fifth of the CPU per 1 MiB chunk (bench/README.md).
    Peak memory is unchanged; the heap just stays at its peak. No-op without glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, HEAP_MMAP_ABOVE_BYTES)
    mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT_BYTES)


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we run
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def address_of(config: Config, sock: socket.socket | None = None) -> str:
    if config.unix_socket:
        return f"unix:{config.unix_socket}"
    port = sock.getsockname()[1] if sock is not None else config.port
    host = f"[{config.host}]" if ":" in config.host else config.host
    return f"http://{host}:{port}"


def _tcp_socket(host: str, port: int, *, reuse_port: bool, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(1024)
    sock.setblocking(False)
    return sock


def _unix_socket(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if Path(path).is_socket():
            os.unlink(path)  # a leftover from a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, 0o660)
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def _serve_async(config: Config, sock: socket.socket, ready: Callable[[], None]) -> None:
    app = create_app(config)
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log_class=access_logger_for(config),
        access_log=logging.getLogger("chunkserver.access") if config.access_log else None,
        shutdown_timeout=AIOHTTP_SHUTDOWN_TIMEOUT,
        read_bufsize=READ_BUFSIZE,
        max_field_size=PARSER_FIELD_BYTES,  # a longer header line is a 431 in JSON (app.py)
    )
    await runner.setup()
    site = web.SockSite(runner, sock)
    await site.start()
    ready()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("Stopping: finishing requests in flight")
        await _drain(app[UPLOADS], site)
        await runner.cleanup()


async def _drain(uploads: UploadService, site: web.BaseSite) -> None:
    """Stop accepting, then let the chunks in flight finish (up to SHUTDOWN_TIMEOUT).

    This comes before aiohttp's own shutdown because that one stops reading from every
    connection at once, so a chunk whose body is still arriving would never get its last
    bytes and would be cut only when the timeout ends. Meanwhile answers say
    `Connection: close`, so that clients take their next chunk elsewhere.
    """
    uploads.core.draining = True
    await site.stop()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SHUTDOWN_TIMEOUT
    while uploads.core.inflight and loop.time() < deadline:
        await asyncio.sleep(0.05)
    if uploads.core.inflight:
        log.warning("Cutting %d chunk requests still in flight", uploads.core.inflight)


def run_one(config: Config, sock: socket.socket, *, ready: Callable[[], None]) -> None:
    """Serve on `sock` until SIGINT or SIGTERM, in this process; `ready()` once it serves."""
    keep_freed_heap()
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        runner.run(_serve_async(config, sock, ready))


def _worker_main(
    config: Config, sock: socket.socket | None, supervisor: int, serving: EventType
) -> None:
    _die_with(supervisor)
    configure_logging(config)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if sock is None:  # TCP: a socket of our own in the port's SO_REUSEPORT group
        sock = _tcp_socket(config.host, config.port, reuse_port=True, listen=True)
    run_one(config, sock, ready=serving.set)


def _announce(config: Config, sock: socket.socket, extra: str = "") -> None:
    print(f"chunkserver listening on {address_of(config, sock)}{extra}", flush=True)


def _die_with(supervisor: int) -> None:
    """Have the kernel kill this worker when its supervisor dies, however it dies (a SIGKILL
    gives the supervisor no chance to stop its workers): an orphan would keep serving on
    the port beside the next start."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the supervisor's own stop still applies
        return
    if os.getppid() != supervisor:  # it died before the prctl
        os._exit(1)


def serve(config: Config) -> None:
    """Run the server as configured; returns after a clean stop."""
    configure_logging(config)
    Path(config.data_dir).mkdir(parents=True, exist_ok=True)
    if config.unix_socket:
        sock = _unix_socket(config.unix_socket)
    else:
        sock = _tcp_socket(
            config.host, config.port, reuse_port=config.workers > 1, listen=config.workers == 1
        )
    try:
        if config.workers == 1:
            run_one(config, sock, ready=lambda: _announce(config, sock))
        else:
            _supervise(config, sock)
    finally:
        sock.close()
        if config.unix_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(config.unix_socket)


def _supervise(config: Config, sock: socket.socket) -> None:
    """Start `config.workers` processes, restart any that dies, stop them all on a signal."""
    if not config.unix_socket:
        config = config.replace(port=sock.getsockname()[1])  # port 0 becomes the real one
    shared = sock if config.unix_socket else None
    context = multiprocessing.get_context("fork")
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    def start() -> tuple[multiprocessing.process.BaseProcess, EventType]:
        serving = context.Event()
        process = context.Process(
            target=_worker_main, args=(config, shared, os.getpid(), serving), daemon=False
        )
        process.start()
        return process, serving

    started = [start() for _ in range(config.workers)]
    workers = [process for process, _ in started]
    # Announced once every worker serves: on TCP each listens on a socket of its own, so
    # before that a connection to the port could be refused.
    for process, serving in started:
        while not serving.wait(0.1) and process.is_alive() and not stopping:
            pass
    _announce(config, sock, f" with {config.workers} workers")
    while not stopping:
        time.sleep(0.2)
        for i, process in enumerate(workers):
            if not process.is_alive() and not stopping:
                log.warning(
                    "Worker %s exited with %s; starting another", process.pid, process.exitcode
                )
                workers[i] = start()[0]
    for process in workers:
        if process.is_alive() and process.pid is not None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + SHUTDOWN_TIMEOUT + 5
    for process in workers:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    sys.stdout.flush()
