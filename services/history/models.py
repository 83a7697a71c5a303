"""SQLAlchemy models of the history database.

Every table carries ``tenant``; public ids (``conv_...``, ``msg_...``, ``resp_...``) are unique
per tenant, and rows are joined through integer surrogate keys. Links cascade on delete, so a
conversation or response disappears with all its links in one statement; items that nothing
links to any more are removed by the repository in the same transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT keys on PostgreSQL; INTEGER on SQLite, where only INTEGER PRIMARY KEY autoincrements.
PK = BigInteger().with_variant(Integer(), "sqlite")
JSONType = JSON().with_variant(JSONB(), "postgresql")
ID = String(128)
TENANT = String(128)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {
        dict[str, Any]: JSONType,
        dict[str, str]: JSONType,
        datetime: DateTime(timezone=True),
    }


class ConversationRow(Base):
    __tablename__ = "conversations"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID)
    tenant: Mapped[str] = mapped_column(TENANT)
    created_at: Mapped[datetime]
    meta: Mapped[dict[str, str]] = mapped_column("metadata")

    __table_args__ = (
        UniqueConstraint("tenant", "id"),
        Index("ix_conversations_tenant_pk", "tenant", "pk"),
    )


class ItemRow(Base):
    __tablename__ = "items"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID)
    tenant: Mapped[str] = mapped_column(TENANT)
    type: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(32), default="")
    status: Mapped[str] = mapped_column(String(32), default="")
    data: Mapped[dict[str, Any]]
    created_at: Mapped[datetime]

    __table_args__ = (UniqueConstraint("tenant", "id"),)


class ConversationItemRow(Base):
    """An item's place in a conversation (insertion order)."""

    __tablename__ = "conversation_items"

    conversation_pk: Mapped[int] = mapped_column(
        PK, ForeignKey("conversations.pk", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_pk: Mapped[int] = mapped_column(PK, ForeignKey("items.pk", ondelete="CASCADE"))

    __table_args__ = (
        UniqueConstraint("conversation_pk", "item_pk"),
        Index("ix_conversation_items_item_pk", "item_pk"),
    )


class ResponseRow(Base):
    __tablename__ = "responses"

    pk: Mapped[int] = mapped_column(PK, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(ID)
    tenant: Mapped[str] = mapped_column(TENANT)
    model: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(32), default="")
    previous_response_id: Mapped[str | None] = mapped_column(ID)
    conversation_id: Mapped[str | None] = mapped_column(ID)
    instructions: Mapped[str | None] = mapped_column(Text)
    usage: Mapped[dict[str, Any]]
    body: Mapped[dict[str, Any]]
    meta: Mapped[dict[str, str]] = mapped_column("metadata")
    # Whether its items were appended to conversation_id (UpdateResponse keeps it in step).
    in_conversation: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime]

    __table_args__ = (
        UniqueConstraint("tenant", "id"),
        Index("ix_responses_created_at", "created_at"),
    )


class ResponseItemRow(Base):
    """An input or output item of a response, in order."""

    __tablename__ = "response_items"

    response_pk: Mapped[int] = mapped_column(
        PK, ForeignKey("responses.pk", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(8), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    item_pk: Mapped[int] = mapped_column(PK, ForeignKey("items.pk", ondelete="CASCADE"))

    __table_args__ = (
        CheckConstraint("kind IN ('input', 'output')", name="kind"),
        Index("ix_response_items_item_pk", "item_pk"),
    )


class IdempotencyKeyRow(Base):
    """The result of a create, by the caller's request_id."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(TENANT, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(256), primary_key=True)
    result_id: Mapped[str] = mapped_column(ID)
    result_items: Mapped[list[str] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime]

    __table_args__ = (Index("ix_idempotency_keys_created_at", "created_at"),)
