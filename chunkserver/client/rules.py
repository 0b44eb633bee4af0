"""What the client checks before it asks and after: its arguments (a size, a file_id) as
the server would take them, and an answer that is chunkserver's (or an `UploadError` naming
the URL and what came back)."""

from __future__ import annotations

import json
from typing import Any

from ..model import FILE_ID_PATTERN

# The `status` of every answer of /upload-chunk and /upload-status.
ANSWER_STATUSES = frozenset({"uploading", "completed", "not_found"})
SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "k": 2**10,
    "m": 2**20,
    "g": 2**30,
}


class UploadError(Exception):
    """The upload cannot go on: a refused chunk, retries exhausted, or a failed check."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def check_file_id(file_id: str) -> str:
    """The id as the server would take it; ValueError (saying the rule) otherwise."""
    if not FILE_ID_PATTERN.fullmatch(file_id):
        raise ValueError(
            f"not a file_id: {file_id[:140]!r} (1 to 128 characters from A-Z, a-z, 0-9, _ and -)"
        )
    return file_id


def answer_of(
    what: str, url: str, status: int, body: bytes, done: tuple[int, ...]
) -> dict[str, Any]:
    """A chunk's or a status's JSON answer when `status` is in `done`; UploadError otherwise:
    the server's `detail`, or, for an answer that is not chunkserver's, the URL and what
    came back."""
    text = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        if status in done and parsed.get("status") in ANSWER_STATUSES:
            return parsed
        if isinstance(parsed.get("detail"), str):
            raise UploadError(
                f"{what}: HTTP {status} from {url}: {parsed['detail']}", status=status
            )
    excerpt = " ".join(text.split())[:120] or "an empty body"
    raise UploadError(
        f"{what}: {url} did not answer as chunkserver does: HTTP {status}, {excerpt!r}",
        status=status,
    )


def parse_size(text: str) -> int:
    """`1MiB`, `5MB`, `4m` or plain bytes."""
    lowered = text.strip().lower().replace(" ", "")
    number = lowered.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = lowered[len(number) :] or "b"
    if unit not in SIZE_UNITS or not number:
        raise ValueError(f"not a size: {text!r} (use e.g. 4MiB, 5MB or 1048576)")
    size = int(float(number) * SIZE_UNITS[unit])
    if size < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return size
