"""OOD verdict and ROI on audited requests; outcomes (reference results) with revisions

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

_REQUEST_COLUMNS = (
    sa.Column("ood_score", sa.Float(), nullable=True),
    sa.Column("in_distribution", sa.Boolean(), nullable=True),
    sa.Column("roi_x", sa.Integer(), nullable=True),
    sa.Column("roi_y", sa.Integer(), nullable=True),
    sa.Column("roi_w", sa.Integer(), nullable=True),
    sa.Column("roi_h", sa.Integer(), nullable=True),
    sa.Column("roi_source", sa.String(16), nullable=True),
)


def upgrade() -> None:
    with op.batch_alter_table("requests") as batch:  # SQLite: batch mode
        for column in _REQUEST_COLUMNS:
            batch.add_column(column.copy())
    op.create_table(
        "outcomes",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("pathology", sa.String(16), nullable=False),
        sa.Column("truth", sa.String(16), nullable=False),
        sa.Column("outcome_date", sa.Date(), nullable=False),
        sa.Column("entered_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("request_id", "revision"),
    )
    op.create_index("ix_outcomes_request_id", "outcomes", ["request_id"])


def downgrade() -> None:
    op.drop_index("ix_outcomes_request_id", table_name="outcomes")
    op.drop_table("outcomes")
    with op.batch_alter_table("requests") as batch:
        for column in reversed(_REQUEST_COLUMNS):
            batch.drop_column(column.name)
