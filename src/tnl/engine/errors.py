"""The engine's refusals, typed so that every front end reports them the same way. Torch-free.

The server maps InvalidRequest to a 400 whose `param` is the request field at fault, and
QueueFullError to a 429; the offline API and the CLI raise them as they are.
"""
from __future__ import annotations


class InvalidRequest(ValueError):
    """A request the engine will not run. `param` names the field at fault ("prompt",
    "max_tokens", "stop_token_ids", ...), `message` says what was wrong and what is expected."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param
        self.message = message


class QueueFullError(RuntimeError):
    """The waiting queue is at --max-waiting: the request is refused at once."""
