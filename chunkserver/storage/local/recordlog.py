"""An upload's record log: what is stored of it, as fixed-size entries appended to one file.

Each stored chunk appends one entry (its index, length, CRC and, when it was kept aside, the
name of its file); each tus PATCH appends one with the upload's new offset and CRC. An entry
is appended after the bytes it describes are written, so a chunk counts exactly when its
entry is in the log, and no file is created on the path of a chunk.

Appends go through an O_APPEND descriptor in one write of ENTRY_BYTES: the kernel places
concurrent appends from several processes one after the other, never interleaved. Each entry
carries its own CRC-32; a reader skips what does not check (a torn entry of a machine that
lost power) and finds the next entry by its magic. The last entry of a chunk's index wins.
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from typing import NamedTuple

LOG_NAME = ".records"
MAGIC = b"cs"
CHUNK = b"C"  # a chunk stored: index, length, crc, aside
OFFSET = b"O"  # a tus upload's progress: length is the offset, crc the CRC of its bytes so far
_BODY = struct.Struct("<2scxIqQ12s")
_CHECK = struct.Struct("<I")
_WHOLE = struct.Struct("<2scxIqQ12sI")
ENTRY_BYTES = _WHOLE.size  # 40
NO_ASIDE = bytes(12)
READ_STEP = 64 * 1024


class Entry(NamedTuple):
    kind: bytes
    chunk_index: int
    length: int
    crc: int
    aside: str = ""  # the random part of a kept-aside chunk's file name; "" in place


def encode(entry: Entry) -> bytes:
    body = _BODY.pack(
        MAGIC, entry.kind, entry.chunk_index, entry.length, entry.crc, entry.aside.encode()
    )
    return body + _CHECK.pack(zlib.crc32(body))


def decode(buffer: bytes) -> tuple[list[Entry], int]:
    """The entries that check in `buffer`, and where the last of them ends."""
    entries, end = _decode_whole(buffer)
    if end + ENTRY_BYTES <= len(buffer):  # something that does not check: look past it
        more, more_end = _decode_scanning(buffer, end)
        entries += more
        end = max(end, more_end)
    return entries, end


def _decode_whole(buffer: bytes) -> tuple[list[Entry], int]:
    """The entries from the start while every one checks (the common case, at C speed)."""
    view = memoryview(buffer)
    whole = len(buffer) - len(buffer) % ENTRY_BYTES
    entries = []
    position = 0
    body = _BODY.size
    for magic, kind, index, length, crc, aside, check in _WHOLE.iter_unpack(view[:whole]):
        if magic != MAGIC or zlib.crc32(view[position : position + body]) != check:
            break
        name = "" if aside == NO_ASIDE else aside.rstrip(b"\0").decode()
        entries.append(Entry(kind, index, length, crc, name))
        position += ENTRY_BYTES
    return entries, position


def _decode_scanning(buffer: bytes, start: int) -> tuple[list[Entry], int]:
    entries: list[Entry] = []
    position = end = start
    limit = len(buffer) - ENTRY_BYTES
    while 0 <= position <= limit:
        body = buffer[position : position + _BODY.size]
        (check,) = _CHECK.unpack_from(buffer, position + _BODY.size)
        if body[:2] == MAGIC and zlib.crc32(body) == check:
            _, kind, index, length, crc, aside = _BODY.unpack(body)
            entries.append(Entry(kind, index, length, crc, aside.rstrip(b"\0").decode()))
            position = end = position + ENTRY_BYTES
        else:
            position = buffer.find(MAGIC, position + 1)
    return entries, end


def append(fd: int, *entries: Entry) -> None:
    """Append in one write (`fd` opened with O_APPEND), so the entries land together."""
    data = b"".join(encode(entry) for entry in entries)
    if os.write(fd, data) != len(data):  # a full disk; the reader skips the torn bytes
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def read_from(fd: int, position: int) -> tuple[list[Entry], int]:
    """The entries past `position`, and the position to read from next time."""
    chunks = []
    at = position
    while True:
        data = os.pread(fd, READ_STEP, at)
        chunks.append(data)
        at += len(data)
        if len(data) < READ_STEP:
            break
    entries, end = decode(b"".join(chunks))
    return entries, position + end


def last_of_kind(fd: int, kind: bytes) -> Entry | None:
    """The log's last entry of `kind`: from its tail, read whole only when the tail has none."""
    size = os.fstat(fd).st_size
    tail_start = max(0, size - 8 * ENTRY_BYTES)  # decode finds the first whole entry in it
    for start in (tail_start, 0) if tail_start else (0,):
        entries, _ = read_from(fd, start)
        found = [entry for entry in entries if entry.kind == kind]
        if found:
            return found[-1]
    return None
