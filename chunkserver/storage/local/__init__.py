"""The local-disk backend: the only code that builds paths, and the truth about every upload.

Layout under the data folder:

    chunks/<file_id>/.meta.json         filename, total_chunks, total_size, chunk_size, token
    chunks/<file_id>/.data              the upload's one data file: chunk N at N x chunk_size
    chunks/<file_id>/.records           the record log: an entry per stored chunk (length, CRC,
                                        place) and per tus PATCH (offset, CRC); recordlog.py
    chunks/<file_id>/.lock              the cross-process lock (flock) of the upload's state
    chunks/<file_id>/.chunk_000003.<pid>.<rand>.part   a chunk kept aside, being received
    chunks/<file_id>/.chunk_000003.<rand>.aside        a chunk kept aside, stored
    chunks/<file_id>/.merge.<pid>.<rand>.merging       uneven chunks being joined (rare)
    chunks/.incoming/<pid>.<rand>.part  a chunk received before its form fields
    chunks/.trash/...                   finished or removed upload folders, being unlinked
    uploads/<file_id>/<filename>        the completed file: the data file, renamed
    uploads/<file_id>.json              the completion record: size, crc64nvme, sha256

Invariants:
- A chunk's bytes are written once. They stream from the socket to offset N x chunk_size of
  the data file, under a byte-range lock on that region (`locks.lock_range`), so two requests
  writing the same chunk never mix their bytes, in one process or several. A chunk whose
  place is not known yet (chunk_size not fixed), whose region is busy, or that was stored
  before (a resend) is kept aside in a file of its own and copied into place at completion;
  its writer holds a shared lock on the data file's GUARD_OFFSET byte meanwhile.
- Every chunk in flight thus holds a lock on the data file, so completing, abandoning,
  expiring or deleting an upload, which lock the whole file, never happens under a chunk
  still being received.
- A chunk counts exactly when its entry is in the upload's record log (the last entry of an
  index wins). The entry is appended after its bytes are written; a chunk cut off at any
  instant has no entry and is simply sent again. A region that an entry points to is never
  written again. A chunk written in place whose region is known appends its entry with no
  other lock than its region's: nothing can end the upload under it. The others (the chunk
  that fixes chunk_size, chunks kept aside) commit under the upload's flock. No file is
  created on the path of a chunk written in place.
- An upload is completed exactly when its completion record exists. Completion joins nothing
  in the common case: it reads the log once, copies the chunks kept aside into place,
  truncates, renames the data file into `uploads/`, then writes the record. A crash between
  the rename and the record is finished by the next sweep from the renamed file.
- `meta.json` exists only once the data file does, and meta's chunk_size, once set, never
  changes.
- A tus upload is one chunk written at offsets: each PATCH streams at the recorded offset
  under an exclusive lock on the data file's WRITER_OFFSET byte (one writer across
  processes), then an entry with the new offset is appended to the log. When the offset
  reaches the length, chunk 0's entry goes with it and the completion is a seed upload's.

The hot path (receive, commit) runs on the event loop: writes to the page cache and a few
small syscalls cost less than handing each chunk to a thread (bench/README.md). Everything
that may wait (the flock held by another process, fsync, completion, sweep) runs in the
store's own threads.
"""

from .disk import DATA_NAME
from .store import LocalStore

__all__ = ["DATA_NAME", "LocalStore"]
