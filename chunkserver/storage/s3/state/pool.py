"""The connection pool to PostgreSQL: errors of a database that cannot be reached answer
503, and a connection cut off mid-statement is never reused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import asyncpg

from ....errors import StoreUnavailable
from .schema import migrate

# What a database that cannot be reached, or went away mid-operation, raises. asyncpg's
# InternalClientError ("cannot switch to state ...") is a connection left mid-operation by
# such a failure: the connection is dropped (see StatePool.connection), the request answers 503.
UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InternalClientError,
)


@contextlib.contextmanager
def translated_errors() -> Iterator[None]:
    """A database that cannot be reached (or is restarting) answers 503, never 500."""
    try:
        yield
    except UNREACHABLE as e:
        raise StoreUnavailable(f"the database cannot be reached ({type(e).__name__})") from e


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """No reset query when a connection goes back to the pool: this code keeps no session
    state (its one advisory lock is a transaction's), and the query cost a round trip."""

    def get_reset_query(self) -> str:
        return ""


class StatePool:
    """The pool, opened (and the schema migrated) before the first request."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pool: asyncpg.Pool | None = None

    async def open(self) -> None:
        try:
            await self._open()
        except asyncpg.PostgresError as e:  # a wrong password or database name, say
            raise StoreUnavailable(f"the database refused the connection: {e}") from e

    async def _open(self) -> None:
        with translated_errors():
            self._pool = await asyncpg.create_pool(
                self.url,
                # No floor: asyncpg would restore one with a traceback a second while the
                # database is down; a request opens what it needs.
                min_size=0,
                max_size=20,
                command_timeout=30,
                timeout=10,
                connection_class=_Connection,
            )
            async with self._pool.acquire() as db:
                await migrate(db)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection whose errors answer 503; one cut off mid-operation is never
        handed to another request."""
        assert self._pool is not None, "UploadState.open() first"
        with translated_errors():
            async with self._pool.acquire() as db:
                try:
                    yield db
                except (*UNREACHABLE, asyncio.CancelledError):
                    # Cut off mid-operation (the database went away, a timeout, a cancelled
                    # request): never hand this connection to another request.
                    if not db.is_closed():
                        db.terminate()
                    raise

    async def is_reachable(self) -> bool:
        try:
            async with self.connection() as db:
                await db.fetchval("SELECT 1")
        except StoreUnavailable:
            return False
        return True
