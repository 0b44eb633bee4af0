"""The `chunkserver` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config

DEFAULT_CONFIG = Path("config.toml")


def _serve(args: argparse.Namespace) -> int:
    from .server import serve

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
    try:
        serve(config)
    except OSError as e:
        print(f"chunkserver: cannot serve: {e}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="chunkserver", description="A fast, crash-safe chunked upload server."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the upload server")
    serve.add_argument(
        "--config",
        type=Path,
        help="TOML configuration file (default: ./config.toml when it exists)",
    )
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--unix-socket", metavar="PATH", help="listen on a unix socket instead")
    serve.add_argument("--data-dir", metavar="DIR", help="data folder (default ./data)")
    serve.add_argument("--workers", type=int, metavar="N", help="server processes (default 1)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
