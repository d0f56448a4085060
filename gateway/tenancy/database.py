"""The SQL database: an async engine (SQLite by default, PostgreSQL for several gateways)
and its migrations, applied with Alembic at start-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from gateway.settings import ConfigError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class Database:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @classmethod
    def from_url(cls, url: str) -> Database:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ConfigError(f"SLUIS_DATABASE_URL: not an SQLAlchemy URL: {url!r}") from exc
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_async_engine(parsed, connect_args={"timeout": 30})
            event.listen(engine.sync_engine, "connect", _tune_sqlite)
        elif parsed.get_backend_name() == "postgresql":
            # Per gateway; PostgreSQL's default of 100 connections then serves several gateways.
            engine = create_async_engine(parsed, pool_size=5, max_overflow=10, pool_pre_ping=True)
        else:
            raise ConfigError(
                f"SLUIS_DATABASE_URL: unsupported database {parsed.get_backend_name()!r}"
                " (use sqlite+aiosqlite:// or postgresql+asyncpg://)"
            )
        return cls(engine)

    async def migrate(self) -> None:
        async with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                # Gateways starting together take turns: one migrates, the others find it done.
                await conn.execute(text("SELECT pg_advisory_xact_lock(7263551)"))
            await conn.run_sync(_upgrade_to_head)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def dispose(self) -> None:
        await self.engine.dispose()


def _upgrade_to_head(connection: Connection) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _tune_sqlite(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
