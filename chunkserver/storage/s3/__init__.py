"""The S3 backend: the bytes in an S3-compatible object store, the state in PostgreSQL.

An upload is one S3 multipart upload of its final object, `<prefix>uploads/<id>/<filename>`.
How its chunks become parts is decided once, by the first chunk other than the last that
arrives (or by a declared `chunk_size`), and kept in the upload's row:

- direct, when chunks are of 5 MiB or more (S3's smallest part but the last): chunk N is
  part N + 1, its bytes streamed from the client's socket into the part as they arrive.
  Resending a chunk replaces its part, so retries are idempotent.
- gathered, when chunks are smaller (the seed client's 1 MiB): each chunk is staged, its bytes
  a row of PostgreSQL (`chunkserver_staged`, key `<prefix>staging/<id>/<token>/<index>.<random>.pg`;
  a chunk of 5 MiB or more an object of that key without the suffix), and each run of
  consecutive chunks of at least 5 MiB is streamed into one part as soon as it is stored (the
  host that staged a chunk keeps a copy on its scratch disk to send, other hosts read the
  row), the completion gathering what is left, a few at once, through a bounded buffer: a
  host's memory does not grow with the file.

The completion is claimed once in PostgreSQL, then CompleteMultipartUpload; the file's
CRC-64/NVME is combined from the chunks' CRCs. Nothing on the local disk outlives a request.

A tus upload is a stream: a PATCH's bytes go into parts of `_stream_part_bytes` (5 MiB, or
more when the part limit needs it), streamed from the socket with their length known from
Content-Length; what is too little for a part (a small PATCH) is staged as a tail piece that
the next part starts with. Concatenation joins completed uploads with UploadPartCopy: the
store copies, no byte passes through this host (small sources are streamed into one part).
"""

from .pieces import BodySlices, S3PendingBytes, S3PendingChunk, Spool, StagedCopies
from .store import S3Store

__all__ = ["BodySlices", "S3PendingBytes", "S3PendingChunk", "S3Store", "Spool", "StagedCopies"]
