"""Domain types of the history service: plain dataclasses and errors, no transport types."""

from __future__ import annotations

import enum
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Mapping
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
MAX_PAGE_TOKEN_LENGTH = MAX_ID_LENGTH
DEFAULT_MAX_ITEM_BYTES = 1024 * 1024
MESSAGE_ROLES = frozenset({"user", "assistant", "system", "developer"})
_ITEM_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")

T = TypeVar("T")


class HistoryError(Exception):
    """Base of the errors the repository raises."""


class NotFound(HistoryError):
    """The named row does not exist for this tenant."""

    def __init__(self, what: str, ident: str) -> None:
        super().__init__(f"{what} {ident!r} not found")
        self.what = what
        self.ident = ident


class NotStored(NotFound):
    """The id cannot exist: this backend stores nothing (``--history-backend none``)."""

    def __init__(self, what: str, ident: str, backend: str = "none") -> None:
        super().__init__(what, ident)
        self.backend = backend
        self.args = (f"{what} {ident!r} not found: the history backend is {backend!r} and "
                     "stores nothing (run the history service with --history-backend sql or "
                     "memory to keep conversations and responses)",)


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


def derived_id(prefix: str, *parts: str) -> str:
    """A stable id: ``prefix_`` + 48 hex digits of a hash of ``parts`` (retries get the same)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{prefix}_{digest[:48]}"


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


def validate_page_token(page_token: str) -> str:
    """A page token is an id this service handed out: printable and bounded."""
    if len(page_token) > MAX_PAGE_TOKEN_LENGTH:
        raise InvalidInput("page_token", f"page_token is longer than {MAX_PAGE_TOKEN_LENGTH} "
                                         "characters; pass a next_page_token or an item id")
    if page_token and not page_token.isprintable():
        raise InvalidInput("page_token", "page_token has non-printable characters")
    return page_token


def item_size(data: Mapping[str, Any]) -> int:
    """Bytes of the item's JSON (UTF-8, compact), the unit of ``--max-item-bytes``."""
    return len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())


def _check_same(field_name: str, given: str, in_data: Any) -> None:
    if given and in_data not in (None, "") and str(in_data) != given:
        raise InvalidInput(field_name, f"{field_name} is {given!r} but the item data says "
                                       f"{str(in_data)[:64]!r}")


def _check_message(data: Mapping[str, Any], role: str, field_name: str) -> None:
    if not role:
        raise InvalidInput(f"{field_name}.role", f"{field_name}.role is required for a message")
    if role not in MESSAGE_ROLES:
        raise InvalidInput(f"{field_name}.role", f"{field_name}.role {role[:32]!r} is not one "
                                                 f"of {sorted(MESSAGE_ROLES)}")
    content = data.get("content")
    where = f"{field_name}.data.content"
    if content is None:
        raise InvalidInput(where, f"{where} is required for a message")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise InvalidInput(where, f"{where} must be a string or a list of content parts")
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str) \
                or not part["type"]:
            raise InvalidInput(f"{where}[{j}]",
                               f"{where}[{j}] must be an object with a string 'type'")


def _check_string_fields(data: Mapping[str, Any], field_name: str, *names: str,
                         required: tuple[str, ...] = ()) -> None:
    for name in names:
        value = data.get(name)
        if value is None and name not in required:
            continue
        if not isinstance(value, str) or (name in required and not value):
            raise InvalidInput(f"{field_name}.data.{name}",
                               f"{field_name}.data.{name} must be a non-empty string")


def normalize_item(item: Item, field_name: str, max_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                   make_id: Callable[[str], str] = new_id) -> Item:
    """Validates an item and fills id, type, role and status from ``data`` (and back),
    assigning an id (``make_id(prefix)``) when missing. Raises :class:`InvalidInput` naming
    the field."""
    data = dict(item.data or {})
    if not (item.id or item.type or item.role or item.status or data):
        raise InvalidInput(field_name, f"{field_name} is empty; an item needs a type and data")
    for name, given in (("id", item.id), ("type", item.type), ("role", item.role),
                        ("status", item.status)):
        if name in data and data[name] is not None and not isinstance(data[name], str):
            raise InvalidInput(f"{field_name}.data.{name}",
                               f"{field_name}.data.{name} must be a string")
        _check_same(f"{field_name}.{name}", given, data.get(name))
    item_type = item.type or str(data.get("type") or "message")
    if not _ITEM_TYPE.fullmatch(item_type):
        raise InvalidInput(f"{field_name}.type",
                           f"{field_name}.type {item_type[:64]!r} is not an item type "
                           "(lower-case letters, digits and '_', at most 64)")
    item_id = item.id or str(data.get("id") or "")
    if not item_id:
        item_id = make_id(ITEM_ID_PREFIXES.get(item_type, "item"))
    if len(item_id) > MAX_ID_LENGTH:
        raise InvalidInput(f"{field_name}.id", f"{field_name}.id is longer than {MAX_ID_LENGTH}")
    if not item_id.isprintable() or " " in item_id:
        raise InvalidInput(f"{field_name}.id", f"{field_name}.id has spaces or control "
                                               "characters")
    role = item.role or str(data.get("role") or "")
    status = item.status or str(data.get("status") or "")
    if len(role) > 32:
        raise InvalidInput(f"{field_name}.role", f"{field_name}.role is longer than 32")
    if len(status) > 32:
        raise InvalidInput(f"{field_name}.status", f"{field_name}.status is longer than 32")
    if item_type == "message":
        _check_message(data, role, field_name)
    elif item_type == "function_call":
        _check_string_fields(data, field_name, "name", "arguments", "call_id",
                             required=("name",))
    elif item_type == "function_call_output":
        _check_string_fields(data, field_name, "call_id", required=("call_id",))
        if "output" not in data:
            raise InvalidInput(f"{field_name}.data.output",
                               f"{field_name}.data.output is required")
    data["id"], data["type"] = item_id, item_type
    if role:
        data.setdefault("role", role)
    if status:
        data.setdefault("status", status)
    size = item_size(data)
    if size > max_bytes:
        raise InvalidInput(f"{field_name}.data",
                           f"{field_name} is {size} bytes of JSON; at most {max_bytes} "
                           "(--max-item-bytes)")
    return Item(id=item_id, type=item_type, role=role, status=status, data=data)


def normalize_items(items: list[Item], field_name: str, limit: int,
                    max_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                    make_id: Callable[[str, int], str] | None = None) -> list[Item]:
    """Validates a list of items; ``make_id(prefix, index)`` names the items without an id
    (random ids when None)."""
    if len(items) > limit:
        raise InvalidInput(field_name, f"{field_name} has {len(items)} entries; at most {limit}")
    def ids(index: int) -> Callable[[str], str]:
        if make_id is None:
            return new_id
        return lambda prefix: make_id(prefix, index)

    return [normalize_item(it, f"{field_name}[{i}]", max_bytes, ids(i))
            for i, it in enumerate(items)]
