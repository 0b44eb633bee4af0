"""The S3 backend as a service of its own: the object store and the database connected and
checked, their health, the outbox and ledger in PostgreSQL, background work waited for."""

from __future__ import annotations

import asyncio
import shutil

from ...errors import StoreUnavailable
from .layout import S3Layout
from .ledger import PostgresLedger
from .outbox import PostgresOutbox


class S3Backend:
    """The Backend role of S3 with PostgreSQL."""

    keeps_bytes_locally = False

    def __init__(self, layout: S3Layout) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects

    async def open(self) -> None:
        self.layout.scratch.mkdir(parents=True, exist_ok=True)
        objects = self.objects
        try:
            await objects.open()
            if not await objects.bucket_is_reachable():
                raise StoreUnavailable(
                    f"the bucket {objects.bucket!r} cannot be reached at "
                    f"{objects.settings.endpoint_url or 'AWS S3'}"
                )
            await self.state.open()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        await self.layout.finish_background()
        self.layout.copies.clear()
        await self.state.close()
        await self.objects.close()

    def outbox(self) -> PostgresOutbox:
        return PostgresOutbox(self.state)

    def ledger(self) -> PostgresLedger:
        return PostgresLedger(self.state)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.layout.scratch).free

    async def health(self) -> dict[str, bool]:
        bucket, database = await asyncio.gather(
            self.objects.bucket_is_reachable(), self.state.is_reachable()
        )
        return {"object_store": bucket, "database": database}
