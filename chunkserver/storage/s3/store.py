"""`S3Store`: the S3 backend's roles (see the package's docstring), each an object built with
the layout and the roles it calls."""

from __future__ import annotations

from .assembly import S3Assembler
from .backend import S3Backend
from .catalog import S3Catalog
from .janitor import S3Janitor
from .layout import S3Layout
from .receive import S3ChunkWriter
from .streams import S3StreamWriter


class S3Store:
    """Uploads as S3 multipart uploads, their state in PostgreSQL; any number of hosts."""

    def __init__(self, layout: S3Layout) -> None:
        self.layout = layout
        self.assembler = S3Assembler(layout)
        self.catalog = S3Catalog(layout, self.assembler)
        self.chunks = S3ChunkWriter(layout, self.assembler)
        self.streams = S3StreamWriter(layout)
        self.janitor = S3Janitor(layout, self.assembler)
        self.backend = S3Backend(layout)
