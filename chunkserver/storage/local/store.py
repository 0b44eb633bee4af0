"""`LocalStore`: the local disk's roles (see the package's docstring), each an object built
with the layout and the roles it calls."""

from __future__ import annotations

from pathlib import Path

from .assembly import LocalAssembler
from .backend import LocalBackend
from .catalog import LocalCatalog
from .commit import LocalChunkWriter
from .janitor import LocalJanitor
from .layout import LocalLayout
from .receive import LocalChunkReceiver
from .streams import LocalStreamWriter


class LocalStore:
    """Uploads on a local filesystem; safe for several processes sharing `root`."""

    def __init__(
        self, root: Path, *, fsync: bool = False, sha256: bool = False, threads: int = 8
    ) -> None:
        self.layout = LocalLayout(root, fsync=fsync, sha256=sha256, threads=threads)
        receiver = LocalChunkReceiver(self.layout)
        self.assembler = LocalAssembler(self.layout)
        self.catalog = LocalCatalog(self.layout, self.assembler)
        self.chunks = LocalChunkWriter(self.layout, receiver, self.assembler)
        self.streams = LocalStreamWriter(self.layout, receiver)
        self.janitor = LocalJanitor(self.layout, self.assembler)
        self.backend = LocalBackend(self.layout)
