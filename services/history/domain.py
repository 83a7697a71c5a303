"""Domain types of the history service: plain dataclasses and errors, no transport types."""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_ITEMS_PER_CALL = 20
MAX_ITEMS_PER_RESPONSE = 10_000
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
MAX_ID_LENGTH = 128
MAX_CHAIN_DEPTH = 10_000

T = TypeVar("T")


class HistoryError(Exception):
    """Base of the errors the repository raises."""


class NotFound(HistoryError):
    """The named row does not exist for this tenant."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident


class InvalidInput(HistoryError):
    """A request field is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class AlreadyExists(HistoryError):
    """A row with this id already exists for this tenant."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} already exists")
        self.what = what
        self.ident = ident


class StorageUnavailable(HistoryError):
    """The database cannot be reached, timed out, or failed."""


class SortOrder(enum.Enum):
    ASC = "asc"
    DESC = "desc"


@dataclass
class Item:
    """One conversation or response item; ``data`` is the whole OpenAI item."""

    id: str = ""
    type: str = ""
    role: str = ""
    status: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class Conversation:
    id: str
    metadata: dict[str, str]
    created_at: datetime


@dataclass
class StoredResponse:
    id: str = ""
    model: str = ""
    status: str = ""
    previous_response_id: str = ""
    conversation_id: str = ""
    instructions: str = ""
    input_items: list[Item] = field(default_factory=list)
    output_items: list[Item] = field(default_factory=list)
    usage: dict[str, Any] = field(default_factory=dict)
    body: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None


@dataclass
class ResponseUpdate:
    """Fields to change on a stored response; None leaves a field as it is."""

    status: str | None = None
    output_items: list[Item] | None = None
    usage: dict[str, Any] | None = None
    body: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_page_token: str = ""


ITEM_ID_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "mcp_call": "mcp",
    "mcp_list_tools": "mcpl",
    "web_search_call": "ws",
    "file_search_call": "fs",
}


def new_id(prefix: str) -> str:
    """``prefix_`` + 48 random hex digits."""
    return f"{prefix}_{secrets.token_hex(24)}"


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def validate_metadata(metadata: Mapping[str, str] | None,
                      field_name: str = "metadata") -> dict[str, str]:
    metadata = dict(metadata or {})
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidInput(
            field_name, f"{field_name} has {len(metadata)} pairs; at most {MAX_METADATA_PAIRS}"
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidInput(field_name, f"{field_name} keys and values must be strings")
        if not key:
            raise InvalidInput(field_name, f"{field_name} keys must not be empty")
        if len(key) > MAX_METADATA_KEY:
            raise InvalidInput(
                field_name,
                f"{field_name} key {key[:16]!r}... is {len(key)} characters; at most "
                f"{MAX_METADATA_KEY}",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidInput(
                field_name,
                f"{field_name}[{key!r}] is {len(value)} characters; at most {MAX_METADATA_VALUE}",
            )
    return metadata


def validate_page_size(page_size: int) -> int:
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidInput("page_size", f"page_size must be 1-{MAX_PAGE_SIZE}, got {page_size}")
    return page_size


def require(value: str, field_name: str) -> str:
    if not value:
        raise InvalidInput(field_name, f"{field_name} is required")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidInput(field_name, f"{field_name} is longer than {MAX_ID_LENGTH} characters")
    return value


def normalize_item(item: Item, field_name: str) -> Item:
    """Fills id, type, role and status from ``data`` (and back), assigning an id when missing."""
    data = dict(item.data or {})
    item_type = item.type or str(data.get("type") or "message")
    item_id = item.id or str(data.get("id") or "")
    if not item_id:
        item_id = new_id(ITEM_ID_PREFIXES.get(item_type, "item"))
    if len(item_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"{field_name}.id", f"{field_name}.id is longer than {MAX_ID_LENGTH}")
    if len(item_type) > 64:
        raise InvalidInput(f"{field_name}.type", f"{field_name}.type is longer than 64")
    role = item.role or str(data.get("role") or "")
    status = item.status or str(data.get("status") or "")
    if len(role) > 32 or len(status) > 32:
        raise InvalidInput(field_name, f"{field_name}.role and .status are at most 32 characters")
    data["id"], data["type"] = item_id, item_type
    if role:
        data.setdefault("role", role)
    if status:
        data.setdefault("status", status)
    return Item(id=item_id, type=item_type, role=role, status=status, data=data)


def normalize_items(items: list[Item], field_name: str, limit: int) -> list[Item]:
    if len(items) > limit:
        raise InvalidInput(field_name, f"{field_name} has {len(items)} entries; at most {limit}")
    return [normalize_item(it, f"{field_name}[{i}]") for i, it in enumerate(items)]
