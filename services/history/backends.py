"""The repository interface every history backend implements, and the factory that picks one.

``--history-backend``:

- ``sql`` (default): :class:`services.history.repository.HistoryRepository`, SQLite or
  PostgreSQL, durable, migrations, health follows the database;
- ``memory``: :class:`services.history.memory.MemoryRepository`, bounded, lost on restart;
- ``none``: :class:`services.history.null.NullRepository`, answers and stores nothing.

The servicer (``server.py``) depends on :class:`Repository` only. Request checks are shared by
all three (``checks.py``), so a bad request gets the same INVALID_ARGUMENT from each.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from services.history.domain import (
    Conversation,
    Item,
    Page,
    ResponseUpdate,
    SortOrder,
    StoredResponse,
)

if TYPE_CHECKING:
    from services.history.config import HistoryConfig

SQL, MEMORY, NONE = "sql", "memory", "none"
BACKENDS = (SQL, MEMORY, NONE)


@runtime_checkable
class Repository(Protocol):
    """Conversations, items and stored responses, scoped by tenant.

    Errors: :class:`~services.history.domain.NotFound` for unknown or foreign ids,
    :class:`~services.history.domain.InvalidInput` naming the field,
    :class:`~services.history.domain.AlreadyExists` for a taken response id,
    :class:`~services.history.domain.StorageUnavailable` when the store cannot be reached.
    A create with a ``request_id`` the tenant used before returns the first result.
    """

    backend: str

    async def close(self) -> None: ...

    # conversations
    async def create_conversation(self, tenant: str, metadata: dict[str, str] | None = None,
                                  items: Sequence[Item] = (), request_id: str = ""
                                  ) -> tuple[Conversation, list[Item]]: ...

    async def get_conversation(self, tenant: str, conversation_id: str) -> Conversation: ...

    async def update_conversation(self, tenant: str, conversation_id: str,
                                  metadata: dict[str, str]) -> Conversation: ...

    async def delete_conversation(self, tenant: str, conversation_id: str) -> None: ...

    async def list_conversations(self, tenant: str, page_size: int = 0,
                                 page_token: str = "") -> Page[Conversation]: ...

    # conversation items
    async def create_conversation_items(self, tenant: str, conversation_id: str,
                                        items: Sequence[Item], request_id: str = ""
                                        ) -> list[Item]: ...

    async def list_conversation_items(self, tenant: str, conversation_id: str,
                                      page_size: int = 0, page_token: str = "",
                                      order: SortOrder = SortOrder.ASC) -> Page[Item]: ...

    async def get_conversation_item(self, tenant: str, conversation_id: str,
                                    item_id: str) -> Item: ...

    async def delete_conversation_item(self, tenant: str, conversation_id: str,
                                       item_id: str) -> Conversation: ...

    # responses
    async def create_response(self, tenant: str, response: StoredResponse,
                              append_to_conversation: bool = False,
                              request_id: str = "") -> StoredResponse: ...

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse: ...

    async def update_response(self, tenant: str, response_id: str,
                              update: ResponseUpdate) -> StoredResponse: ...

    async def delete_response(self, tenant: str, response_id: str) -> None: ...

    async def list_response_input_items(self, tenant: str, response_id: str,
                                        page_size: int = 0, page_token: str = "",
                                        order: SortOrder = SortOrder.ASC) -> Page[Item]: ...

    async def get_response_chain(self, tenant: str, response_id: str,
                                 max_depth: int = 0) -> list[StoredResponse]: ...

    # retention
    async def purge_responses(self, older_than: datetime, batch: int = 500) -> int: ...


def open_repository(config: HistoryConfig) -> Repository:
    """The backend ``config.history_backend`` names, configured from ``config``."""
    if config.history_backend == MEMORY:
        from services.history.memory import MemoryLimits, MemoryRepository

        return MemoryRepository(
            max_item_bytes=config.max_item_bytes,
            limits=MemoryLimits(conversations=config.memory_max_conversations,
                                responses=config.memory_max_responses,
                                items=config.memory_max_items,
                                max_age=config.memory_max_age))
    if config.history_backend == NONE:
        from services.history.null import NullRepository

        return NullRepository(max_item_bytes=config.max_item_bytes)
    from services.history.repository import HistoryRepository

    return HistoryRepository(config.history_db, pool_size=config.pool_size,
                             op_timeout=config.op_timeout, max_item_bytes=config.max_item_bytes)
