"""`UploadState`: every statement of the S3 backend's upload state, by role."""

from __future__ import annotations

from .chunks import ChunkStatements
from .claims import ClaimStatements


class UploadState(ClaimStatements, ChunkStatements):
    """The upload state in PostgreSQL, shared by every host."""
