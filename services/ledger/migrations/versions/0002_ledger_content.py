"""Prompts and answers (LLMBUS_LEDGER_CONTENT=on), a table of their own so retention and erasure
delete them without touching the usage rows.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_content",
        sa.Column("request_id", sa.String(128), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("answer", sa.Text, nullable=False),
        sa.Column("truncated", sa.Boolean, nullable=False),
        sa.Column("stream_seq", sa.BigInteger),
    )
    op.create_index("ix_ledger_content_ended", "ledger_content", ["ended_at"])
    op.create_index("ix_ledger_content_tenant_key", "ledger_content", ["tenant", "key_id"])


def downgrade() -> None:
    op.drop_table("ledger_content")
