"""The least CPU the protocol's own work costs per GiB, beyond what nginx does, on this machine.

    python bench/floor.py [--size 1GiB] [--chunk-sizes 1,5] [--dir /tmp]

nginx, as the bench's limit, receives each request body and writes it to a file. chunkserver
must do that too, and then, for every byte, what the protocol asks on top: copy it into the
merged file (`uploads/<file_id>/<filename>` is a file apart from the chunk files) and hash it
(the completed answer carries the sha256). This script times those steps alone, in one
thread, with the functions the server uses (`chunkserver.storage.local.fileio`), on
page-cache files:

- write:  the chunk files written from memory (the part nginx does as well);
- copy:   `copy_file_range` of every chunk into one merged file (what the assembly does);
- hash:   sha256 of every chunk through read-only maps (what the assembly does);
- unlink: the chunk files removed (nginx removes its body files too).

`copy + hash` is CPU no server keeping the protocol's layout on this filesystem can avoid:
the least chunkserver can spend per GiB is nginx's figure plus that sum.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chunkserver.client import parse_size
from chunkserver.storage.local.fileio import copy_range, hash_file

MiB = 1024 * 1024
GiB = 1024 * MiB


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(step: Callable[[], None]) -> float:
    """CPU seconds (user and system) that `step` takes."""
    before = cpu_seconds()
    step()
    return cpu_seconds() - before


def one_round(folder: Path, size: int, chunk: int) -> dict[str, float]:
    """CPU seconds per GiB of each step, for `size` bytes in chunks of `chunk` bytes."""
    payload = memoryview(os.urandom(chunk))
    count = size // chunk
    paths = [folder / f"chunk_{index:06d}" for index in range(count)]

    def each_chunk(use: Callable[[int], object], flags: int = os.O_RDONLY) -> None:
        for path in paths:
            fd = os.open(path, flags, 0o644)
            try:
                use(fd)
            finally:
                os.close(fd)

    def write() -> None:
        each_chunk(lambda fd: os.write(fd, payload), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)

    def copy() -> None:
        out = os.open(folder / "merged", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        positions = iter(range(0, size, chunk))
        try:
            each_chunk(lambda src: copy_range(src, 0, out, next(positions), chunk))
        finally:
            os.close(out)

    def hash_chunks() -> None:
        digest = hashlib.sha256()
        each_chunk(lambda src: hash_file(src, chunk, digest))

    def unlink() -> None:
        for path in paths:
            os.unlink(path)
        os.unlink(folder / "merged")

    scale = GiB / (count * chunk)
    return {
        name: timed(step) * scale
        for name, step in (("write", write), ("copy", copy), ("hash", hash_chunks),
                           ("unlink", unlink))
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1GiB", help="bytes per round (default 1GiB)")
    parser.add_argument("--chunk-sizes", default="1,5", help="MiB, comma separated")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is shown")
    parser.add_argument("--dir", type=Path, default=None, help="where the files go")
    args = parser.parse_args()
    size = parse_size(args.size)
    print(f"CPU seconds per GiB, median of {args.repeats} rounds of {args.size}, one thread\n")
    print("| chunk | write | copy | hash | unlink | copy + hash |")
    print("| --- | --- | --- | --- | --- | --- |")
    for chunk_mib in (int(text) for text in args.chunk_sizes.split(",")):
        rounds = []
        for _ in range(args.repeats):
            folder = Path(tempfile.mkdtemp(prefix="bench-floor-", dir=args.dir))
            try:
                rounds.append(one_round(folder, size, chunk_mib * MiB))
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            time.sleep(1)  # let writeback of the previous round start apart from this one
        median = {name: statistics.median(r[name] for r in rounds) for name in rounds[0]}
        print(
            f"| {chunk_mib} MiB | {median['write']:.2f} | {median['copy']:.2f} "
            f"| {median['hash']:.2f} | {median['unlink']:.2f} "
            f"| {median['copy'] + median['hash']:.2f} |"
        )


if __name__ == "__main__":
    main()
