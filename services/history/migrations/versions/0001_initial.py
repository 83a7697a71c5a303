"""Initial schema: conversations, items, responses, their links, idempotency keys.

Revision ID: 0001_initial
Revises:
Create Date: 2025-01-01 00:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PK = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "conversations",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_conversations"),
        sa.UniqueConstraint("tenant", "id", name="uq_conversations_tenant_id"),
    )
    op.create_index("ix_conversations_tenant_pk", "conversations", ["tenant", "pk"])
    op.create_table(
        "items",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("role", sa.String(32), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("data", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_items"),
        sa.UniqueConstraint("tenant", "id", name="uq_items_tenant_id"),
    )
    op.create_table(
        "conversation_items",
        sa.Column("conversation_pk", PK, nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("item_pk", PK, nullable=False),
        sa.PrimaryKeyConstraint("conversation_pk", "position", name="pk_conversation_items"),
        sa.UniqueConstraint("conversation_pk", "item_pk",
                            name="uq_conversation_items_conversation_pk_item_pk"),
        sa.ForeignKeyConstraint(["conversation_pk"], ["conversations.pk"], ondelete="CASCADE",
                                name="fk_conversation_items_conversation_pk_conversations"),
        sa.ForeignKeyConstraint(["item_pk"], ["items.pk"], ondelete="CASCADE",
                                name="fk_conversation_items_item_pk_items"),
    )
    op.create_index("ix_conversation_items_item_pk", "conversation_items", ["item_pk"])
    op.create_table(
        "responses",
        sa.Column("pk", PK, primary_key=True, autoincrement=True),
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("previous_response_id", sa.String(128), nullable=True),
        sa.Column("conversation_id", sa.String(128), nullable=True),
        sa.Column("instructions", sa.Text(), nullable=True),
        sa.Column("usage", JSON, nullable=False),
        sa.Column("body", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("in_conversation", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("pk", name="pk_responses"),
        sa.UniqueConstraint("tenant", "id", name="uq_responses_tenant_id"),
    )
    op.create_index("ix_responses_created_at", "responses", ["created_at"])
    op.create_table(
        "response_items",
        sa.Column("response_pk", PK, nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("item_pk", PK, nullable=False),
        sa.PrimaryKeyConstraint("response_pk", "kind", "position", name="pk_response_items"),
        sa.CheckConstraint("kind IN ('input', 'output')", name="ck_response_items_kind"),
        sa.ForeignKeyConstraint(["response_pk"], ["responses.pk"], ondelete="CASCADE",
                                name="fk_response_items_response_pk_responses"),
        sa.ForeignKeyConstraint(["item_pk"], ["items.pk"], ondelete="CASCADE",
                                name="fk_response_items_item_pk_items"),
    )
    op.create_index("ix_response_items_item_pk", "response_items", ["item_pk"])
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("request_id", sa.String(256), nullable=False),
        sa.Column("result_id", sa.String(128), nullable=False),
        sa.Column("result_items", JSON, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("tenant", "kind", "request_id", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_keys")
    op.drop_table("response_items")
    op.drop_table("responses")
    op.drop_table("conversation_items")
    op.drop_table("items")
    op.drop_table("conversations")
