"""Device: the seq_epoch of the last status report, so that a device whose spool was
recreated (with its clock behind) is heard again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('device') as batch_op:
        batch_op.add_column(sa.Column('last_status_epoch', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('device') as batch_op:
        batch_op.drop_column('last_status_epoch')
