"""The state of every upload of the S3 backend, in PostgreSQL, shared by every host.

Each step that two hosts could race on is one atomic statement: an upload is created once
(`INSERT ... ON CONFLICT DO NOTHING`), its completion is claimed once (`UPDATE ... WHERE
status = 'uploading' RETURNING`), an expiry removes a row once (`DELETE ... RETURNING`). No
lock is held across a request to the object store.

An upload's row keeps its S3 multipart UploadId; a chunk's row says where its bytes are: a
part of that upload (its ETag) or a staging object (its key), with its length and CRC.

A tus upload's row also keeps its offset, the CRC of its bytes so far and its tail (the
staged pieces not yet in a part), and a writer's lease: one PATCH at a time across hosts.
Its chunk rows are its parts (index = part number - 1), and its total_chunks counts them.
"""

from .rows import ChunkRow, PartRow, Stream, UploadRow
from .schema import MIGRATIONS, SCHEMA_VERSION, migrate, schema_version
from .state import UploadState

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "ChunkRow",
    "PartRow",
    "Stream",
    "UploadRow",
    "UploadState",
    "migrate",
    "schema_version",
]
