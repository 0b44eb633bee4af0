"""The Python client (`chunkserver upload` uses it): async first, parallel chunks, retries
with backoff and jitter, resumption from `missing_chunks`, the final CRC-64/NVME verified.
`uploader.py` holds it; `rules.py` the rules of the server's answers it checks."""

from .rules import UploadError, check_file_id, parse_size
from .uploader import (
    Backoff,
    Progress,
    get_status,
    get_status_async,
    upload_file,
    upload_file_async,
)

__all__ = [
    "Backoff",
    "Progress",
    "UploadError",
    "check_file_id",
    "get_status",
    "get_status_async",
    "parse_size",
    "upload_file",
    "upload_file_async",
]
