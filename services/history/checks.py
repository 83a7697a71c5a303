"""Request checks shared by every history backend (sql, memory, none): one place, one wording.

Each function validates the arguments of one repository operation before anything is read or
written and returns them normalized (items with ids, metadata as a dict, page sizes with their
default). Failures are :class:`InvalidInput` naming the field. The checks that need stored state
(an unknown page token, an item already in a conversation, a reused request id) are built by
the ``*_error`` helpers here, so every backend words them the same.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from services.history.domain import (
    DEFAULT_MAX_ITEM_BYTES,
    MAX_CHAIN_DEPTH,
    MAX_ITEMS_PER_CALL,
    MAX_ITEMS_PER_RESPONSE,
    InvalidInput,
    Item,
    ResponseUpdate,
    StoredResponse,
    new_id,
    normalize_items,
    require,
    validate_metadata,
    validate_page_size,
    validate_page_token,
)

MAX_REQUEST_ID_LENGTH = 256
MAX_STATUS_LENGTH = 32

IdMaker = Callable[[str, int], str]


def request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID_LENGTH:
        raise InvalidInput("request_id",
                           f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters")
    return value


def listing(page_size: int, page_token: str) -> int:
    """The page size to use (the default for 0); checks the page token's shape."""
    size = validate_page_size(page_size)
    validate_page_token(page_token)
    return size


def create_conversation(metadata: Mapping[str, str] | None, items: Sequence[Item],
                        rid: str, max_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                        make_id: IdMaker | None = None) -> tuple[dict[str, str], list[Item]]:
    meta = validate_metadata(metadata)
    new_items = normalize_items(list(items), "items", MAX_ITEMS_PER_CALL, max_bytes, make_id)
    request_id(rid)
    return meta, new_items


def update_conversation(conversation_id: str, metadata: Mapping[str, str] | None
                        ) -> dict[str, str]:
    require(conversation_id, "conversation.id")
    return validate_metadata(metadata)


def create_items(conversation_id: str, items: Sequence[Item], rid: str,
                 max_bytes: int = DEFAULT_MAX_ITEM_BYTES,
                 make_id: IdMaker | None = None) -> list[Item]:
    require(conversation_id, "conversation_id")
    new_items = normalize_items(list(items), "items", MAX_ITEMS_PER_CALL, max_bytes, make_id)
    if not new_items:
        raise InvalidInput("items", "items must not be empty")
    request_id(rid)
    return new_items


def item_ref(conversation_id: str, item_id: str) -> None:
    require(conversation_id, "conversation_id")
    require(item_id, "item_id")


@dataclass
class NewResponse:
    """A checked ``create_response``: the id to use, metadata and normalized items."""

    id: str
    metadata: dict[str, str]
    input_items: list[Item]
    output_items: list[Item]


def create_response(response: StoredResponse, append_to_conversation: bool, rid: str,
                    max_bytes: int = DEFAULT_MAX_ITEM_BYTES, response_id: str = "",
                    make_id: IdMaker | None = None) -> NewResponse:
    """``response_id`` is the id to assign when the response has none (random when empty)."""
    meta = validate_metadata(response.metadata, "response.metadata")
    rid_ = response.id or response_id or new_id("resp")
    require(rid_, "response.id")
    if response.previous_response_id:
        require(response.previous_response_id, "response.previous_response_id")
    if response.conversation_id:
        require(response.conversation_id, "response.conversation_id")
    elif append_to_conversation:
        raise InvalidInput("append_to_conversation",
                           "append_to_conversation needs response.conversation_id")
    inputs = normalize_items(list(response.input_items), "response.input_items",
                             MAX_ITEMS_PER_RESPONSE, max_bytes, make_id)
    outputs_ids: IdMaker | None = None
    if make_id is not None:
        offset = len(inputs)

        def outputs_ids(prefix: str, index: int) -> str:
            return make_id(prefix, offset + index)

    outputs = normalize_items(list(response.output_items), "response.output_items",
                              MAX_ITEMS_PER_RESPONSE, max_bytes, outputs_ids)
    request_id(rid)
    return NewResponse(rid_, meta, inputs, outputs)


def update_response(response_id: str, update: ResponseUpdate,
                    max_bytes: int = DEFAULT_MAX_ITEM_BYTES
                    ) -> tuple[dict[str, str] | None, list[Item] | None]:
    """The update's metadata and output items, checked (None where the update leaves them)."""
    require(response_id, "response.id")
    meta = (validate_metadata(update.metadata, "response.metadata")
            if update.metadata is not None else None)
    outputs = (normalize_items(list(update.output_items), "response.output_items",
                               MAX_ITEMS_PER_RESPONSE, max_bytes)
               if update.output_items is not None else None)
    if update.status is not None and len(update.status) > MAX_STATUS_LENGTH:
        raise InvalidInput("response.status",
                           f"response.status is longer than {MAX_STATUS_LENGTH}")
    return meta, outputs


def chain_limit(response_id: str, max_depth: int) -> int:
    """How many responses a chain walk may return (``max_depth`` 0: the service's bound)."""
    require(response_id, "response_id")
    if max_depth < 0:
        raise InvalidInput("max_depth", "max_depth must be >= 0")
    return min(max_depth, MAX_CHAIN_DEPTH) if max_depth else MAX_CHAIN_DEPTH


# ---- checks against stored state: the errors, worded once -------------------------------------

def unknown_item_token_error(page_token: str) -> InvalidInput:
    return InvalidInput("page_token", f"page_token {page_token!r} names no item here")


def unknown_conversation_token_error(page_token: str) -> InvalidInput:
    return InvalidInput("page_token", f"page_token {page_token!r} names no conversation")


def already_in_conversation_error(item_id: str, conversation_id: str) -> InvalidInput:
    return InvalidInput("items", f"item {item_id!r} is already in conversation "
                                 f"{conversation_id!r}")


def new_members(conversation_id: str, ids: Sequence[str],
                existing: Collection[str] = ()) -> None:
    """Items appended to a conversation must not be in it already, nor repeat in one call."""
    seen = set(existing)
    for item_id in ids:
        if item_id in seen:
            raise already_in_conversation_error(item_id, conversation_id)
        seen.add(item_id)


def request_id_reused_error() -> InvalidInput:
    return InvalidInput("request_id", "request_id was used for another conversation")
