"""The local disk's sweep: expiry, completions a crash cut short, stray temporary files."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ...errors import (
    StorageFailure,
    UploadConflict,
)
from ...model import (
    CompletedUpload,
    SweepReport,
    UploadMeta,
)
from .assembly import LocalAssembler
from .disk import DATA_NAME, ORPHAN_GRACE_SECONDS, TEMP_SUFFIXES, writer_alive
from .layout import LocalLayout
from .locks import FolderGone


class LocalJanitor:
    """The sweep: idle uploads expired, completions a crash cut short finished, stray
    temporary files removed."""

    def __init__(self, layout: LocalLayout, assembler: LocalAssembler) -> None:
        self.layout = layout
        self.assembler = assembler

    async def sweep(self, *, ttl_seconds: float, finish: bool = True) -> SweepReport:
        return await self.layout.run(self._sweep, ttl_seconds, finish)

    def _sweep(self, ttl_seconds: float, finish: bool = True) -> SweepReport:
        """Expire idle uploads, finish completions a crash cut short, remove stray files."""
        now = time.time()
        report = SweepReport()
        report.removed_temp_files += self._remove_stray_temps(
            self.layout.incoming_dir, now, ttl_seconds
        )
        report.removed_temp_files += self._remove_stray_temps(
            self.layout.uploads_dir, now, ttl_seconds
        )
        for file_id in self.layout.uploads_in_progress():
            # Expiry first: removing a stray file touches the folder, which would count as
            # activity and put the expiry off by a whole TTL.
            with contextlib.suppress(FileNotFoundError):
                self._sweep_upload(file_id, now, ttl_seconds, report, finish)
            report.removed_temp_files += self._remove_stray_temps(
                self.layout.folder(file_id), now, ttl_seconds
            )
        self.layout.empty_trash()
        self.layout.open_uploads.close_idle()
        live = set(self.layout.uploads_in_progress())
        for file_id in [f for f in self.layout.known_logs if f not in live]:
            self.layout.known_logs.pop(file_id, None)
        return report

    def _sweep_upload(
        self,
        file_id: str,
        now: float,
        ttl_seconds: float,
        report: SweepReport,
        finish: bool = True,
    ) -> None:
        lock = self.layout.lock(file_id, blocking=False)
        try:
            if not lock.acquire():
                return  # busy: a commit or a completion is running
        except FolderGone:
            return  # ended since it was listed
        try:
            status = self.layout.status(file_id)
            if isinstance(status, CompletedUpload):
                self.layout.remove_folder(file_id)  # left over after its completion
            elif status is None:
                folder = self.layout.folder(file_id)
                has_temps = any(n.endswith(".part") for n in os.listdir(folder))
                if not has_temps and now - os.stat(folder).st_mtime > ORPHAN_GRACE_SECONDS:
                    self.layout.remove_folder(file_id)
            else:
                expired = now - status.last_activity > ttl_seconds
                ready = finish and len(status.stored) == status.meta.total_chunks
                if expired or ready:
                    self._expire_or_finish(status.meta, expired, report)
        finally:
            lock.release()

    def _expire_or_finish(self, meta: UploadMeta, expired: bool, report: SweepReport) -> None:
        """Expire an idle upload, or complete one a crash cut short (every chunk recorded, no
        completion record); only while no chunk is being received into it. Without waiting:
        the upload's flock is held, and writers take their range lock before it."""
        with self.assembler.whole_data_file(meta.file_id, wait=False) as data_fd:
            if data_fd is None and (self.layout.folder(meta.file_id) / DATA_NAME).exists():
                return  # a chunk is in flight: neither idle nor ready
            if expired:
                self.layout.remove_folder(meta.file_id)
                self.layout.known_logs.pop(meta.file_id, None)
                report.expired.append(meta.file_id)
                report.expired_uploads.append(meta)
                return
            with contextlib.suppress(UploadConflict, StorageFailure):
                completed = self.assembler.complete_held(meta, data_fd)
                if completed is not None:
                    report.completed.append(completed)

    def _remove_stray_temps(self, folder: Path, now: float, ttl_seconds: float) -> int:
        """Remove temp files whose writer died, or that nobody touched for the TTL."""
        removed = 0
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return 0
        for entry in entries:
            if not entry.name.endswith(TEMP_SUFFIXES) or not entry.is_file():
                continue
            try:
                idle = now - entry.stat().st_mtime
                if not writer_alive(entry.name) or idle > ttl_seconds:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed
