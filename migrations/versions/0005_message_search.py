"""message search: a full-text index of messages, kept in step by the database

SQLite: an FTS5 table with the trigram tokenizer (it finds any run of 3 or more
characters, so Japanese and other text without spaces is found as well as English),
filled by triggers on ``messages``. Its rows are keyed by ``message_search``, whose
INTEGER PRIMARY KEY survives VACUUM (the implicit rowid of ``messages`` does not).

PostgreSQL: a stored ``tsvector`` column (the ``simple`` configuration: no stemming,
any language) with a GIN index for ranked word search, and a trigram GIN index
(``pg_trgm``) on the content for text without spaces (Japanese) and short terms.

Answers are indexed once they end (not at every checkpoint while streaming).
Later migrations that rebuild ``messages`` on SQLite (``batch_alter_table``) drop
its triggers: they must call ``create_sqlite_triggers()`` again.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 23:10:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROW_OF = "(SELECT rowid FROM message_search WHERE message_id = {}.id)"


def create_sqlite_triggers() -> None:
    op.execute(
        f"""
        CREATE TRIGGER messages_search_insert AFTER INSERT ON messages
        WHEN new.status != 'streaming' BEGIN
            INSERT INTO message_search (message_id) VALUES (new.id);
            INSERT INTO messages_fts (rowid, content) VALUES ({ROW_OF.format("new")}, new.content);
        END
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER messages_search_update AFTER UPDATE OF content, status ON messages
        WHEN new.status != 'streaming' BEGIN
            DELETE FROM messages_fts WHERE rowid = {ROW_OF.format("old")};
            INSERT OR IGNORE INTO message_search (message_id) VALUES (new.id);
            INSERT INTO messages_fts (rowid, content) VALUES ({ROW_OF.format("new")}, new.content);
        END
        """
    )
    op.execute(
        f"""
        CREATE TRIGGER messages_search_delete AFTER DELETE ON messages BEGIN
            DELETE FROM messages_fts WHERE rowid = {ROW_OF.format("old")};
            DELETE FROM message_search WHERE message_id = old.id;
        END
        """
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")
        op.execute(
            "ALTER TABLE messages ADD COLUMN search_vector tsvector"
            " GENERATED ALWAYS AS (to_tsvector('simple', content)) STORED"
        )
        op.execute("CREATE INDEX ix_messages_search_vector ON messages USING gin (search_vector)")
        op.execute(
            "CREATE INDEX ix_messages_content_trgm ON messages USING gin (content gin_trgm_ops)"
        )
        return
    op.execute(
        "CREATE TABLE message_search ("
        " rowid INTEGER PRIMARY KEY, message_id VARCHAR(40) NOT NULL UNIQUE)"
    )
    op.execute("CREATE VIRTUAL TABLE messages_fts USING fts5(content, tokenize='trigram')")
    # What is already stored.
    op.execute(
        "INSERT INTO message_search (message_id)"
        " SELECT id FROM messages WHERE status != 'streaming'"
    )
    op.execute(
        "INSERT INTO messages_fts (rowid, content) SELECT s.rowid, m.content"
        " FROM message_search s JOIN messages m ON m.id = s.message_id"
    )
    create_sqlite_triggers()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP INDEX ix_messages_content_trgm")
        op.execute("DROP INDEX ix_messages_search_vector")
        op.execute("ALTER TABLE messages DROP COLUMN search_vector")
        return
    for name in ("insert", "update", "delete"):
        op.execute(f"DROP TRIGGER messages_search_{name}")
    op.execute("DROP TABLE messages_fts")
    op.execute("DROP TABLE message_search")
