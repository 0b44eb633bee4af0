"""The schema: the numbered SQL files of chunkserver/migrations/, applied in order, each
once, by one host at a time, each recorded in chunkserver_schema. A host that finds the
database at the newest version runs no DDL at all: an ALTER TABLE takes an exclusive lock and
would deadlock with the hosts already serving."""

from __future__ import annotations

from importlib import resources

import asyncpg

SCHEMA_LOCK = 0x63686B73  # pg_advisory_xact_lock key: one host migrates at a time


# Numbered migrations (chunkserver/migrations/NNNN_name.sql), applied in order, each once, by
# one host at a time, each recorded in chunkserver_schema. A host that finds the database at
# the newest version runs no DDL at all: an ALTER TABLE takes an exclusive lock and would
# deadlock with the hosts already serving.
MIGRATIONS_DIR = resources.files("chunkserver.storage.s3") / "migrations"


def _migrations() -> tuple[tuple[int, str], ...]:
    found = sorted(
        (int(entry.name.split("_", 1)[0]), entry.read_text(encoding="utf-8"))
        for entry in MIGRATIONS_DIR.iterdir()
        if entry.name.endswith(".sql")
    )
    if [number for number, _ in found] != list(range(1, len(found) + 1)):
        raise RuntimeError("chunkserver/migrations/*.sql must be numbered 0001, 0002, ...")
    return tuple(found)


MIGRATIONS = _migrations()


SCHEMA_VERSION = MIGRATIONS[-1][0]


async def schema_version(db: asyncpg.Connection) -> int:
    if await db.fetchval("SELECT to_regclass('chunkserver_schema')") is None:
        return 0
    return int(await db.fetchval("SELECT coalesce(max(version), 0) FROM chunkserver_schema"))


async def migrate(db: asyncpg.Connection) -> None:
    """Bring the database to SCHEMA_VERSION; read-only when it is there already."""
    if await schema_version(db) >= SCHEMA_VERSION:
        return
    async with db.transaction():
        await db.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
        await db.execute("CREATE TABLE IF NOT EXISTS chunkserver_schema (version integer NOT NULL)")
        version = await schema_version(db)
        for number, statements in MIGRATIONS:
            if number > version:
                await db.execute(statements)
                await db.execute("INSERT INTO chunkserver_schema (version) VALUES ($1)", number)
