"""`S3Store`: every role of the S3 backend (see the package's docstring) in one store."""

from __future__ import annotations

from .catalog import S3Catalog
from .janitor import S3Janitor
from .receive import S3ChunkReceiver
from .streams import S3StreamWriter


class S3Store(S3Catalog, S3ChunkReceiver, S3StreamWriter, S3Janitor):
    """Uploads as S3 multipart uploads, their state in PostgreSQL; any number of hosts."""
