"""`LocalStore`: every role of the local disk (see the package's docstring) in one store."""

from __future__ import annotations

from .catalog import LocalCatalog
from .commit import LocalChunkCommitter
from .janitor import LocalJanitor
from .streams import LocalStreamWriter


class LocalStore(LocalCatalog, LocalJanitor, LocalStreamWriter, LocalChunkCommitter):
    """Uploads on a local filesystem; safe for several processes sharing `root`."""
