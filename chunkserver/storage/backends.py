"""The store a configuration asks for: the local disk, or S3 with PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import Config
from .local import LocalStore
from .store import Store


def build_store(config: Config) -> Store[Any, Any]:
    """The configured backend, not connected yet (`Backend.open`)."""
    sha256 = "sha256" in config.checksums
    if config.storage != "s3":
        return LocalStore(Path(config.data_dir), fsync=config.fsync, sha256=sha256)
    # Imported here: botocore's models cost the local backend ~20 MiB of memory.
    from .s3 import S3Store
    from .s3.layout import S3Layout
    from .s3.objects import Settings

    layout = S3Layout(
        Settings(
            bucket=config.s3_bucket,
            endpoint_url=config.s3_endpoint_url or None,
            region=config.s3_region or None,
            access_key_id=config.s3_access_key_id or None,
            secret_access_key=config.s3_secret_access_key or None,
        ),
        config.database_url,
        prefix=config.s3_prefix,
        scratch=Path(config.data_dir) / "scratch",
        sha256=sha256,
        max_parts=config.s3_max_parts,
        max_file_bytes=config.max_file_bytes,
    )
    return S3Store(layout)
