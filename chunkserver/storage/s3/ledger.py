"""The S3 backend's shared counts (quotas.Ledger), in its PostgreSQL database so that every
host sees the same: an identity's uploads in progress are its rows not completed; its request
bucket a row of `chunkserver_request_buckets`, taken in one statement on the database's
clock; an upload stopped by the application has its detail in its row's `stopped`."""

from __future__ import annotations

from ..ledger import Usage
from .state import UploadState

# An upload's rows counted toward its identity's quotas: those of its namespace, not
# completed, each for its declared length or the bytes stored so far.
USAGE = """
SELECT count(*) AS uploads, coalesce(sum(coalesce(
    u.total_size,
    u.stream_offset,
    (SELECT sum(c.length) FROM chunkserver_chunks c
     WHERE c.file_id = u.file_id AND c.token = u.token),
    0)), 0) AS stored
FROM chunkserver_uploads u
WHERE u.status <> 'completed'
  AND CASE WHEN $1 = '' THEN strpos(u.file_id, '~') = 0
           ELSE starts_with(u.file_id, $1 || '~') END
"""

# One token from the bucket (as deep as one second of requests, at least one), refilled for
# the time since it was counted.
TAKE = """
WITH now AS (SELECT extract(epoch FROM clock_timestamp())::double precision AS t)
INSERT INTO chunkserver_request_buckets AS b (namespace, tokens, counted_at, taken)
SELECT $1, $2 - 1, now.t, true FROM now
ON CONFLICT (namespace) DO UPDATE SET
    tokens = LEAST($2, b.tokens + GREATEST(0, excluded.counted_at - b.counted_at) * $3)
        - CASE WHEN LEAST($2, b.tokens + GREATEST(0, excluded.counted_at - b.counted_at) * $3)
                    >= 1 THEN 1 ELSE 0 END,
    taken = LEAST($2, b.tokens + GREATEST(0, excluded.counted_at - b.counted_at) * $3) >= 1,
    counted_at = excluded.counted_at
RETURNING tokens, taken
"""


class PostgresLedger:
    def __init__(self, state: UploadState) -> None:
        self.state = state

    async def usage(self, namespace: str) -> Usage:
        async with self.state.connection() as db:
            row = await db.fetchrow(USAGE, namespace)
        assert row is not None
        return Usage(int(row["uploads"]), int(row["stored"]))

    async def take_request(self, namespace: str, rate: float) -> float:
        async with self.state.connection() as db:
            row = await db.fetchrow(TAKE, namespace, max(rate, 1.0), rate)
        assert row is not None
        return 0.0 if row["taken"] else (1.0 - float(row["tokens"])) / rate

    async def stop(self, file_id: str, token: str, detail: str) -> None:
        async with self.state.connection() as db:
            await db.execute(
                """UPDATE chunkserver_uploads SET stopped = $3
                   WHERE file_id = $1 AND token = $2 AND status <> 'completed'""",
                file_id,
                token,
                detail,
            )

    async def stopped(self, file_id: str, token: str) -> str | None:
        async with self.state.connection() as db:
            detail: str | None = await db.fetchval(
                "SELECT stopped FROM chunkserver_uploads WHERE file_id = $1 AND token = $2",
                file_id,
                token,
            )
        return detail
