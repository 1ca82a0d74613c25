"""room access: owner, private, secret system prompt, grants

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 06:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rooms") as batch:
        batch.add_column(sa.Column("owner", sa.String(length=64), nullable=True))
        batch.add_column(
            sa.Column("private", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("secret_prompt", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    op.create_table(
        "room_grants",
        sa.Column("room_id", sa.String(length=40), nullable=False),
        sa.Column("key_name", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["room_id"], ["rooms.id"], name=op.f("fk_room_grants_room_id_rooms"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("room_id", "key_name", name=op.f("pk_room_grants")),
    )
    op.create_index(op.f("ix_room_grants_key_name"), "room_grants", ["key_name"])


def downgrade() -> None:
    op.drop_index(op.f("ix_room_grants_key_name"), table_name="room_grants")
    op.drop_table("room_grants")
    with op.batch_alter_table("rooms") as batch:
        batch.drop_column("secret_prompt")
        batch.drop_column("private")
        batch.drop_column("owner")
