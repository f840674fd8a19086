"""Alembic owns the schema: upgrade from empty works and matches the models."""

from __future__ import annotations

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlmodel import SQLModel

from hub.db import Database


def test_upgrade_from_empty_matches_models(db_url: str) -> None:
    db = Database(db_url)
    try:
        with db.engine.begin() as conn:  # start from nothing, even on the shared PG database
            SQLModel.metadata.drop_all(conn)
            conn.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
        db.migrate()
        db.migrate()  # idempotent
        with db.engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            assert {"device", "bundle", "model_version", "deployment", "deployment_device",
                    "telemetry", "payload_error_count", "alembic_version"} <= tables
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, SQLModel.metadata) == []
    finally:
        db.dispose()
