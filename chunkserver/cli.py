"""The `chunkserver` command line."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from tqdm import tqdm

from . import __version__
from .config import ConfigError, load_config
from .errors import StoreUnavailable

DEFAULT_CONFIG = Path("config.toml")
DEFAULT_URL = "http://127.0.0.1:8000"


def _serve(args: argparse.Namespace) -> int:

    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "unix_socket": args.unix_socket,
        "data_dir": args.data_dir,
        "workers": args.workers,
    }
    try:
        config = load_config(path, overrides)
    except ConfigError as e:
        print(f"chunkserver: configuration error: {e}", file=sys.stderr)
        return 2
    print(
        f"chunkserver: configuration {path or 'none (the defaults)'}, "
        f"data folder {Path(config.data_dir).resolve()}, storage {config.storage}",
        flush=True,
    )
    # prometheus-client's multiprocess mode, chosen before anything imports the library:
    # every process on this data folder counts into it, and /metrics sums them.
    # (metrics.MULTIPROCESS_ENV: that module imports prometheus-client, so not imported here)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(Path(config.data_dir).resolve() / ".metrics")
    from .server import serve

    try:
        serve(config)
    except OSError as e:
        where = config.unix_socket or f"{config.host}:{config.port}"
        print(f"chunkserver: cannot serve on {where}: {e.strerror or e}", file=sys.stderr)
        return 1
    except StoreUnavailable as e:  # storage = "s3": the bucket or the database, at start
        print(f"chunkserver: cannot serve: {e.detail}", file=sys.stderr)
        return 1
    return 0


class ProgressBar:
    """The upload's progress on a terminal, drawn by tqdm: bytes, percent, speed and ETA."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: tqdm[None] | None = None

    def __call__(self, progress: Any) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=progress.total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                file=self.stream,
                mininterval=0.1,
                dynamic_ncols=True,
            )
        self.bar.update(progress.bytes_done - self.bar.n)
        if progress.bytes_done >= progress.total_bytes:
            self.bar.close()


def resumable_file_id(path: Path) -> str:
    """An id that a rerun of the same command on the same, unchanged file finds again."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return "cs-" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _mistake(command: str, message: str, code: int = 2) -> int:
    """A mistake of the command line's user, or a server that is not the one expected: one
    line on stderr."""
    print(f"chunkserver {command}: {message}", file=sys.stderr)
    return code


def _upload(args: argparse.Namespace) -> int:
    from .client.rules import UploadError, check_file_id, parse_size
    from .client.uploader import upload_file

    path = Path(args.path)
    if not path.is_file():
        return _mistake("upload", f"not a file: {path}")
    try:
        chunk_size = parse_size(args.chunk_size)
        file_id = check_file_id(args.file_id) if args.file_id else resumable_file_id(path)
    except ValueError as e:
        return _mistake("upload", str(e))
    metadata: dict[str, str] = {}
    for pair in args.metadata:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            return _mistake("upload", f"--metadata {pair!r}: use KEY=VALUE")
        metadata[key] = value
    show_progress = not args.quiet and sys.stderr.isatty()
    if not args.quiet:
        print(f"uploading {path} as {file_id} to {args.url}", file=sys.stderr)
    try:
        result = upload_file(
            path,
            args.url,
            chunk_size=chunk_size,
            concurrency=args.concurrency,
            file_id=file_id,
            retries=args.retries,
            token=args.token or os.environ.get("CHUNKSERVER_TOKEN"),
            progress=ProgressBar(sys.stderr) if show_progress else None,
            metadata=metadata or None,
        )
    except (UploadError, OSError) as e:
        # The reason on stderr; the result, failed, still on stdout's last line.
        print(json.dumps({"status": "failed", "file_id": file_id, "detail": str(e)}))
        return _mistake("upload", str(e), 1)
    print(json.dumps(result))
    return 0


def _status(args: argparse.Namespace) -> int:
    import aiohttp

    from .client.rules import UploadError, check_file_id
    from .client.uploader import get_status

    try:
        check_file_id(args.file_id)
    except ValueError as e:
        return _mistake("status", str(e))
    try:
        body = get_status(args.url, args.file_id, token=args.token)
    except (UploadError, OSError, aiohttp.ClientError) as e:
        return _mistake("status", f"{args.url}: {e}", 1)
    print(json.dumps(body))
    return 0 if body.get("status") in ("uploading", "completed") else 1


def _sign(args: argparse.Namespace) -> int:
    from .auth.signing import sign_url

    path = args.config
    if path is None and DEFAULT_CONFIG.is_file():
        path = DEFAULT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as e:
        return _mistake("sign", f"configuration error: {e}")
    if not config.signing_key:
        return _mistake("sign", f"no signing_key in {path or 'the configuration'}")
    try:
        url = sign_url(
            config.signing_key,
            method=args.method,
            path=args.path,
            identity=args.identity,
            expires_in=args.expires,
            base=args.url or "",
        )
    except ValueError as e:
        return _mistake("sign", str(e))
    print(url)
    return 0


def _checksum(args: argparse.Namespace) -> int:
    from .checksums import of_file

    try:
        print(of_file(args.file))
    except OSError as e:
        print(f"chunkserver checksum: {args.file}: {e.strerror or e}", file=sys.stderr)
        return 1
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (and exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of 1 or more, not {text!r}")
    return value


def worker_count(text: str) -> int | str:
    if text == "auto":
        return text
    value = int(text) if text.isdigit() else 0
    if value < 1:
        raise argparse.ArgumentTypeError(
            f'must be "auto" or a whole number of 1 or more, not {text!r}'
        )
    return value


def non_negative_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number of 0 or more, not {text!r}")
    return value


def server_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(
            f"must be a server's URL such as {DEFAULT_URL}, not {text!r}"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="chunkserver", description="A fast, crash-safe chunked upload server.")
    parser.add_argument("--version", action="version", version=f"chunkserver {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    serve = commands.add_parser("serve", help="run the upload server")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML configuration file (default: ./config.toml when it exists)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument(
        "--port", type=non_negative_int, help="TCP port (default 8000; 0 picks a free one)"
    )
    serve.add_argument("--unix-socket", metavar="PATH", help="listen on a unix socket instead")
    serve.add_argument("--data-dir", metavar="DIR", help="data folder (default ./data)")
    serve.add_argument(
        "--workers",
        type=worker_count,
        metavar="N",
        help='server processes, or "auto": one per core (default 1)',
    )
    serve.set_defaults(run=_serve)

    upload = commands.add_parser(
        "upload",
        help="upload a file in parallel chunks, resuming and verifying",
        description="Upload PATH; prints the result as JSON on its last line; exit 0 only "
        "when the server's crc64nvme (and sha256, when it gives one) matches the file's.",
    )
    upload.add_argument("path", metavar="PATH")
    upload.add_argument(
        "--url", type=server_url, default=DEFAULT_URL, help=f"server (default {DEFAULT_URL})"
    )
    upload.add_argument("--chunk-size", default="4MiB", help="e.g. 1MiB, 5MB, 1048576")
    upload.add_argument(
        "--concurrency", type=positive_int, default=4, help="chunks in flight (default 4)"
    )
    upload.add_argument(
        "--file-id",
        help="resume this upload (default: an id derived from the file's path, size and "
        "modification time, so that rerunning the command resumes)",
    )
    upload.add_argument(
        "--retries",
        type=non_negative_int,
        default=5,
        help="retries per request (chunk or status) before giving up (default 5)",
    )
    upload.add_argument("--token", help="bearer token (or CHUNKSERVER_TOKEN)")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    upload.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="stored with the upload and passed to hooks (repeatable)",
    )
    upload.set_defaults(run=_upload)

    status = commands.add_parser("status", help="print an upload's status as JSON")
    status.add_argument("file_id", metavar="FILE_ID")
    status.add_argument(
        "--url", type=server_url, default=DEFAULT_URL, help=f"server (default {DEFAULT_URL})"
    )
    status.add_argument(
        "--token",
        default=os.environ.get("CHUNKSERVER_TOKEN"),
        help="bearer token (or CHUNKSERVER_TOKEN)",
    )
    status.set_defaults(run=_status)

    sign = commands.add_parser(
        "sign",
        help="print a signed URL: one method on one path, for an identity, until it expires",
        description="Print a URL that authenticates METHOD on PATH as IDENTITY for SECONDS "
        "(HMAC-SHA256 with the configuration's signing_key), on its last line.",
    )
    sign.add_argument(
        "--config", type=Path, help="TOML configuration file (default: ./config.toml)"
    )
    sign.add_argument("--method", required=True, type=str.upper, help="e.g. GET or PATCH")
    sign.add_argument("--path", required=True, help="e.g. /files/ID")
    sign.add_argument("--identity", required=True, metavar="NAME", help="who the URL speaks for")
    sign.add_argument(
        "--expires", required=True, type=positive_int, metavar="SECONDS", help="valid for"
    )
    sign.add_argument("--url", type=server_url, metavar="BASE", help="e.g. https://host")
    sign.set_defaults(run=_sign)

    checksum = commands.add_parser(
        "checksum",
        help="print a file's CRC-64/NVME in S3's form",
        description="Print FILE's CRC-64/NVME in S3's form (base64 of the 8 big-endian bytes): "
        "the value of the server's crc64nvme answers and of S3's ChecksumCRC64NVME.",
    )
    checksum.add_argument("file", metavar="FILE")
    checksum.set_defaults(run=_checksum)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
