"""The local disk as a service of its own: nothing to connect to, its health, its outbox and
ledger, its threads stopped."""

from __future__ import annotations

from .layout import LocalLayout
from .ledger import LocalLedger
from .outbox import FolderOutbox


class LocalBackend:
    """The Backend role of the local disk."""

    keeps_bytes_locally = True

    def __init__(self, layout: LocalLayout) -> None:
        self.layout = layout

    async def open(self) -> None:
        """Nothing to connect to: the folders are made with the layout."""

    async def health(self) -> dict[str, bool]:
        return {"data_folder": await self.layout.run(self._is_writable)}

    def _is_writable(self) -> bool:
        try:
            probe = self.layout.incoming_dir / self.layout.temp_name("healthz", ".tmp")
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError:
            return False
        return True

    def free_bytes(self) -> int:
        return self.layout.free_bytes()

    def outbox(self) -> FolderOutbox:
        return FolderOutbox(self.layout.root / "outbox", fsync=self.layout.fsync)

    def ledger(self) -> LocalLedger:
        return LocalLedger(self.layout)

    async def close(self) -> None:
        self.layout.executor.shutdown(wait=True)
        self.layout.open_uploads.close_all()
