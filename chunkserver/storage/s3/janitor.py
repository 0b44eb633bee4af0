"""The S3 backend's sweep: expiry, completions left undone, orphaned objects."""

from __future__ import annotations

import time
from datetime import UTC, datetime

from ...errors import (
    StorageFailure,
    UploadGone,
)
from ...model import (
    SweepReport,
)
from .assembly import S3Assembler
from .layout import S3Layout
from .pieces import ORPHAN_GRACE_SECONDS, log


class S3Janitor:
    """The sweep: idle uploads expired, completions a crash cut short finished, orphaned
    multipart uploads and staged objects removed."""

    def __init__(self, layout: S3Layout, assembler: S3Assembler) -> None:
        self.layout = layout
        self.state = layout.state
        self.objects = layout.objects
        self.assembler = assembler

    async def sweep(self, *, ttl_seconds: float, finish: bool = True) -> SweepReport:
        report = SweepReport()
        now = time.time()
        for row in await self.state.uploads.remove_expired(now - ttl_seconds):
            await self.layout.clean(row)
            report.expired.append(row.meta.file_id)
            report.expired_uploads.append(row.meta)
        ready = (
            await self.state.uploads.ready_to_finish(now - self.layout.lease_seconds)
            if finish
            else []
        )
        for row in ready:
            try:
                finished = await self.assembler.complete(row.meta)
            except (UploadGone, StorageFailure) as e:
                log.warning("Sweep could not complete %s: %s", row.meta.file_id, e)
                continue
            if finished is not None and finished[1]:
                report.completed.append(finished[0])
        report.removed_temp_files = await self._remove_orphans(
            min(ttl_seconds, ORPHAN_GRACE_SECONDS)
        )
        return report

    async def _remove_orphans(self, grace_seconds: float) -> int:
        """Abort multipart uploads and delete staging objects and staged rows that no upload
        owns: left by a host killed between creating them and recording them, or while
        cleaning up."""
        upload_ids, live = await self.state.uploads.live_uploads()
        cutoff = datetime.now(UTC).timestamp() - grace_seconds
        removed = 0
        for upload in await self.objects.list_multipart_uploads(f"{self.layout.prefix}uploads/"):
            if upload.upload_id not in upload_ids and upload.initiated.timestamp() < cutoff:
                await self.objects.abort(upload.key, upload.upload_id)
                removed += 1
        staging = f"{self.layout.prefix}staging/"
        stale = []
        for listed in await self.objects.list_objects(staging):
            file_id, _, rest = listed.key[len(staging) :].partition("/")
            token = rest.partition("/")[0]
            if (file_id, token) not in live and listed.last_modified.timestamp() < cutoff:
                stale.append(listed.key)
        await self.objects.delete(stale)
        staged = await self.state.staged.delete_orphans(cutoff)
        return removed + len(stale) + staged
