"""The upload service: the store's verbs made async, with the manifest, locks and metrics.

Handlers call this and nothing below it. Every blocking store call runs in the service's
executor; the per-file asyncio lock keeps one commit per file in flight in this process, and
the store's flock does the same across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from .assembly import Assembly
from .config import Config
from .errors import ChecksumMismatch, DiskFull, PayloadTooLarge, ServerBusy, UploadConflict
from .forms import ChunkFields, check_total_size
from .locks import KeyedLocks
from .manifest import ChunkSet, Manifest
from .metrics import Metrics
from .store import (
    Committed,
    CompletedUpload,
    FileStore,
    Store,
    SweepReport,
    TempChunk,
    UploadMeta,
    UploadProgress,
)
from .streaming import receive_into, sha256_of_file

T = TypeVar("T")
log = logging.getLogger("chunkserver")

# How much one background assembly step copies and hashes before it lets a merge in.
ASSEMBLY_STEP_BYTES = 8 * 1024 * 1024

# How far the merged file built ahead may trail the stored prefix before answers wait for it,
# which is the most the last chunk's merge can inherit: what the background copy does in
# ASSEMBLY_LAG_SECONDS at its measured pace, within these bounds. A fixed 64 MiB took the
# merge 0.3 to 0.4 s when the kernel throttled writes (many dirty pages), 0.1 s otherwise.
ASSEMBLY_LAG_SECONDS = 0.08
MIN_ASSEMBLY_LAG_BYTES = 8 * 1024 * 1024
MAX_ASSEMBLY_LAG_BYTES = 64 * 1024 * 1024

# Room for the form fields and multipart framing around a chunk, when judging Content-Length.
MULTIPART_OVERHEAD_BYTES = 64 * 1024


class Uploads:
    def __init__(
        self,
        config: Config,
        store: Store,
        executor: ThreadPoolExecutor,
        commit_executor: ThreadPoolExecutor,
        assembly_executor: ThreadPoolExecutor,
    ) -> None:
        self.config = config
        self.store = store
        self.executor = executor
        # Commits wait on the cross-process lock and merges run for seconds: they get threads
        # of their own, so that they never hold up the writes of chunks being received.
        self.commit_executor = commit_executor
        # Building merged files ahead of their last chunk (assembly.py) is background work:
        # its own threads, so that it never delays a commit or a write.
        self.assembly_executor = assembly_executor
        self.assemblies: dict[str, Assembly] = {}
        self.assembling: dict[str, AssemblyRun] = {}
        self.assembly_pace = CopyPace()
        self.manifest = Manifest()
        self.locks = KeyedLocks()
        self.metrics = Metrics()
        self.inflight = 0  # chunk requests being handled now
        self.draining = False  # the process is stopping: answers close their connection

    @classmethod
    def open(cls, config: Config) -> Uploads:
        store = FileStore(Path(config.data_dir), fsync=config.fsync)
        return cls(
            config,
            store,
            ThreadPoolExecutor(max_workers=16, thread_name_prefix="chunkserver-io"),
            ThreadPoolExecutor(max_workers=8, thread_name_prefix="chunkserver-commit"),
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="chunkserver-assembly"),
        )

    async def stop_assembling(self) -> None:
        """Stop the background assembly (at shutdown); the chunks stay the truth."""
        tasks = [run.task for run in self.assembling.values() if run.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self.assembly_executor.shutdown(wait=True)
        self.executor.shutdown(wait=True)
        self.commit_executor.shutdown(wait=True)
        for assembly in self.assemblies.values():
            assembly.discard()
        self.assemblies.clear()

    async def _run(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a blocking store call in the I/O executor."""
        return await _in_executor(self.executor, fn, *args, **kwargs)

    async def _run_commit(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a commit, merge, delete or sweep: they may wait on the cross-process lock."""
        return await _in_executor(self.commit_executor, fn, *args, **kwargs)

    async def _run_assembly(self, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a step of building a merged file ahead (background work)."""
        return await _in_executor(self.assembly_executor, fn, *args, **kwargs)

    async def rebuild_manifest(self) -> None:
        """Fill the manifest from the disk (at start)."""
        for file_id in await self._run(self.store.uploads_in_progress):
            await self._known_state(file_id)

    async def _known_state(self, file_id: str) -> CompletedUpload | UploadMeta | None:
        """What the manifest knows of `file_id`, reading the disk when it knows nothing."""
        entry = self.manifest.get(file_id)
        if entry is not None:
            return entry.meta
        found = await self._run(self.store.lookup, file_id)
        if isinstance(found, UploadMeta):
            self.manifest.remember(found)
        return found

    # -- receiving a chunk --

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Count a chunk request in flight; refuse it (503) past `max_inflight_chunks`."""
        if self.inflight >= self.config.max_inflight_chunks:
            raise ServerBusy(self.config.max_inflight_chunks)
        self.inflight += 1
        try:
            yield
        finally:
            self.inflight -= 1

    async def check_before_chunk(
        self, fields: ChunkFields, content_length: int | None
    ) -> CompletedUpload | None:
        """Checks that can refuse a chunk before its bytes are read.

        Returns the completion record when the upload is already complete (the answer to a
        late retry), None when the chunk should be received.
        """
        limits = self.config
        if content_length is not None and (
            content_length > limits.max_chunk_bytes + MULTIPART_OVERHEAD_BYTES
        ):
            raise PayloadTooLarge(
                f"Chunk is larger than max_chunk_bytes ({limits.max_chunk_bytes} bytes)"
            )
        check_total_size(fields.total_size, max_file_bytes=limits.max_file_bytes)
        known = await self._known_state(fields.file_id)
        if isinstance(known, CompletedUpload):
            return known
        if known is not None:
            conflict = known.conflict_with(fields.filename, fields.total_chunks, fields.total_size)
            if conflict is not None:
                raise UploadConflict(conflict)
        needed = content_length or 0
        if known is None and fields.total_size is not None:
            needed = max(needed, fields.total_size)
        if self.store.free_bytes() - needed < limits.min_free_bytes:
            raise DiskFull()
        return None

    def new_temp(self, fields: ChunkFields | None) -> TempChunk:
        """The temporary file a chunk will be received into (created by its first write)."""
        if fields is None:  # the chunk came before its fields: it waits in .incoming
            return self.store.temp_chunk(None, None)
        return self.store.temp_chunk(fields.file_id, fields.chunk_index)

    async def receive(
        self, pieces: AsyncIterator[memoryview], temp: TempChunk, expected_sha256: str | None
    ) -> str | None:
        """Stream a chunk body into `temp`; return its sha256 when it was computed."""
        digest = hashlib.sha256() if expected_sha256 is not None else None
        try:
            await receive_into(
                pieces,
                temp,
                executor=self.executor,
                max_bytes=self.config.max_chunk_bytes,
                digest=digest,
            )
        finally:
            self.metrics.inc("bytes_received", temp.size)
        return digest.hexdigest() if digest is not None else None

    async def commit(
        self, fields: ChunkFields, temp: TempChunk, computed_sha256: str | None
    ) -> Committed:
        """Verify and store a received chunk; merge if it completes the upload.

        Takes ownership of `temp`: it is renamed into place or removed.
        """
        try:
            if fields.chunk_sha256 is not None:
                if computed_sha256 is None:  # the checksum field came after the chunk
                    computed_sha256 = await self._run(sha256_of_file, temp.path)
                if computed_sha256 != fields.chunk_sha256:
                    raise ChecksumMismatch()
            if self.store.free_bytes() < self.config.min_free_bytes:
                raise DiskFull()
        except BaseException:
            await self._run(temp.discard)
            raise
        assembly = self.assemblies.get(fields.file_id)
        async with self.locks.hold(fields.file_id):
            proposed, chunks = self._proposal(fields)
            # Shielded: once the commit has started, a cancelled request must not leave it
            # half done; the thread finishes it either way.
            result = await asyncio.shield(
                self._run_commit(
                    self.store.commit_chunk,
                    temp,
                    proposed,
                    fields.chunk_index,
                    chunks,
                    max_file_bytes=self.config.max_file_bytes,
                    assembly=assembly,
                )
            )
        if result.record is not None:
            self.manifest.forget(fields.file_id)
            self._empty_trash_soon()
            await self._drop_assembly(fields.file_id)
        elif result.meta is not None:
            self.manifest.remember(result.meta, result.chunks)
            self._assemble_ahead(result.meta, result.chunks)
        if result.record is None or result.merged_here:
            self.metrics.inc("chunks_stored")
        if result.merged_here:
            self.metrics.inc("uploads_completed")
        if result.record is None:
            await self._keep_pace_with_assembly(fields.file_id)
        return result

    def _proposal(self, fields: ChunkFields) -> tuple[UploadMeta, ChunkSet]:
        """The metadata this chunk asks for, and the chunks this process knows of."""
        entry = self.manifest.get(fields.file_id)
        if entry is not None and (
            entry.meta.conflict_with(fields.filename, fields.total_chunks, fields.total_size)
            is None
        ):
            return entry.meta, entry.chunks
        meta = UploadMeta.new(
            fields.file_id, fields.filename, fields.total_chunks, fields.total_size
        )
        return meta, ChunkSet(meta.token)

    # -- building the merged file ahead --

    def _assemble_ahead(self, meta: UploadMeta, chunks: ChunkSet) -> None:
        """Start copying the stored prefix into the upload's assembly, unless it is running."""
        if meta.file_id in self.assembling or self.draining:
            return
        assembly = self.assemblies.get(meta.file_id)
        copied = assembly.next_index if assembly is not None else 0
        if chunks.first_missing() > copied:
            run = AssemblyRun()
            self.assembling[meta.file_id] = run
            run.task = asyncio.create_task(self._assemble(meta, run))

    async def _assemble(self, meta: UploadMeta, run: AssemblyRun) -> None:
        file_id = meta.file_id
        try:
            assembly = self.assemblies.get(file_id)
            if assembly is None or assembly.finished or assembly.token != meta.token:
                await self._drop_assembly(file_id)
                assembly = await self._run_assembly(self.store.start_assembly, meta)
                if assembly is None:
                    return
                self.assemblies[file_id] = assembly
            while True:
                size_before, started = assembly.size, time.monotonic()
                more = await self._run_assembly(
                    self.store.advance_assembly,
                    assembly,
                    meta,
                    ASSEMBLY_STEP_BYTES,
                    keep_free=self._assembly_keep_free(),
                )
                self.assembly_pace.record(assembly.size - size_before, time.monotonic() - started)
                run.pulse()
                if assembly.finished:
                    break
                entry = self.manifest.get(file_id)
                known = entry.chunks.first_missing() if entry is not None else 0
                # Go on while chunks committed during the step extend the prefix.
                if not more and known <= assembly.next_index:
                    break
        except Exception:
            # Only a head start is lost: the merge reads whatever the assembly lacks.
            log.warning("Building the merged file of %s ahead failed", file_id, exc_info=True)
        finally:
            self.assembling.pop(file_id, None)
            run.pulse()

    async def _keep_pace_with_assembly(self, file_id: str) -> None:
        """Hold a chunk's answer while the assembly trails by more than the allowed lag.

        Without this, a fast client on a busy machine outruns the background copy, and the
        last chunk's merge inherits the whole backlog: seconds, not a fraction of one. The
        client's next chunk waits instead, and the work is the same.
        """
        while (run := self.assembling.get(file_id)) is not None:
            if self._assembly_lag(file_id) <= self.assembly_pace.allowed_lag():
                return
            await run.stepped.wait()

    def _assembly_lag(self, file_id: str) -> int:
        """Bytes of the stored prefix that the upload's assembly has not copied yet."""
        entry = self.manifest.get(file_id)
        assembly = self.assemblies.get(file_id)
        if entry is None or (assembly is not None and assembly.finished):
            return 0
        copied = assembly.next_index if assembly is not None else 0  # None: being created
        return entry.chunks.bytes_between(copied, entry.chunks.first_missing())

    def _assembly_keep_free(self) -> int:
        """Free space the head start must leave: room for a chunk to come, and the margin."""
        return self.config.min_free_bytes + self.config.max_chunk_bytes

    async def _drop_assembly(self, file_id: str) -> None:
        assembly = self.assemblies.pop(file_id, None)
        if assembly is not None:
            await self._run_assembly(assembly.discard)

    # -- the other verbs --

    async def status(self, file_id: str) -> CompletedUpload | UploadProgress | None:
        found = await self._run(self.store.status, file_id)
        if isinstance(found, UploadProgress):
            self.manifest.remember(found.meta)
        else:
            self.manifest.forget(file_id)
        return found

    async def completed_file(self, file_id: str) -> tuple[Path, CompletedUpload] | None:
        return await self._run(self.store.completed_file, file_id)

    async def delete(self, file_id: str) -> bool:
        async with self.locks.hold(file_id):
            existed = await self._run_commit(self.store.delete, file_id)
        self.manifest.forget(file_id)
        self._empty_trash_soon()
        await self._drop_assembly(file_id)
        if existed:
            self.metrics.inc("uploads_aborted")
        return existed

    async def sweep(self) -> SweepReport:
        report = await self._run_commit(
            self.store.sweep,
            ttl_seconds=self.config.upload_ttl_seconds,
            max_file_bytes=self.config.max_file_bytes,
        )
        # Forget what ended anywhere: expired, merged here or by another process, deleted.
        in_progress = await self._run(self.store.uploads_in_progress)
        self.manifest.retain(in_progress)
        for file_id in set(self.assemblies) - set(in_progress) - set(self.assembling):
            await self._drop_assembly(file_id)
        self.metrics.inc("uploads_failed", len(report.expired))
        self.metrics.inc("uploads_completed", len(report.merged))
        return report

    def _empty_trash_soon(self) -> None:
        """Remove finished chunk folders in the background, after the answer."""
        with contextlib.suppress(RuntimeError):  # stopping: the next start's sweep does it
            self.commit_executor.submit(self.store.empty_trash)

    @property
    def metrics_dir(self) -> Path:
        return Path(self.config.data_dir) / ".metrics"

    async def publish_metrics(self) -> None:
        await self._run(self.metrics.publish, self.metrics_dir)

    async def render_metrics(self) -> str:
        in_progress = len(await self._run(self.store.uploads_in_progress))
        gauges = {
            "uploads_in_progress": ("Uploads with chunks stored, not yet merged", in_progress),
            "free_disk_bytes": (
                "Free bytes on the data folder's filesystem",
                self.store.free_bytes(),
            ),
        }
        return await self._run(self.metrics.render, self.metrics_dir, gauges)

    async def is_healthy(self) -> bool:
        return await self._run(self.store.is_writable)


class AssemblyRun:
    """A background assembly in progress, and a signal pulsed after each of its steps."""

    def __init__(self) -> None:
        self.task: asyncio.Task[None] | None = None
        self.stepped = asyncio.Event()

    def pulse(self) -> None:
        """Wake whoever waits for a step; set and clear, so later waits wait for the next."""
        self.stepped.set()
        self.stepped.clear()


class CopyPace:
    """How fast the background assembly copies and hashes, over its recent steps.

    The disk's pace is shared by every upload of the process, so one estimate serves all.
    """

    DECAY = 0.7  # the weight of the past at each step

    def __init__(self) -> None:
        self.bytes = 0.0
        self.seconds = 0.0

    def record(self, copied: int, seconds: float) -> None:
        if copied > 0 and seconds > 0:
            self.bytes = self.bytes * self.DECAY + copied
            self.seconds = self.seconds * self.DECAY + seconds

    def allowed_lag(self) -> int:
        """The bytes the copy does in ASSEMBLY_LAG_SECONDS, within the configured bounds."""
        if self.seconds == 0:
            return MAX_ASSEMBLY_LAG_BYTES
        lag = int(self.bytes / self.seconds * ASSEMBLY_LAG_SECONDS)
        return max(MIN_ASSEMBLY_LAG_BYTES, min(MAX_ASSEMBLY_LAG_BYTES, lag))


async def _in_executor(
    executor: ThreadPoolExecutor, fn: Callable[..., T], *args: object, **kwargs: object
) -> T:
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, functools.partial(fn, *args, **kwargs))
