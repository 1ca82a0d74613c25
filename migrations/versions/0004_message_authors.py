"""message authors, hiding and answer timing: who wrote each message, the owner's
moderation, and how long an answer took

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 11:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        # User messages: the sender's id (a key's name, or a client-chosen id) and
        # display name; answers: no id, the model's name. Null on older messages.
        batch.add_column(sa.Column("author_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("author_name", sa.String(200), nullable=True))
        batch.add_column(
            sa.Column("hidden", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        # Answers: milliseconds to the first token shown and to the end, as the gateway saw.
        batch.add_column(sa.Column("timing", sa.JSON(), nullable=True))
    with op.batch_alter_table("rooms") as batch:
        # The room list is ordered by last activity.
        batch.create_index("ix_rooms_updated_at", ["updated_at"])


def downgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.drop_index("ix_rooms_updated_at")
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("timing")
        batch.drop_column("hidden")
        batch.drop_column("author_name")
        batch.drop_column("author_id")
