"""Domain errors of the tokenizer service (plain Python; server.py maps them to statuses)."""

from __future__ import annotations


class InvalidRequest(ValueError):
    """A request field is wrong; ``field`` names it (e.g. ``tools[1].function.name``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
