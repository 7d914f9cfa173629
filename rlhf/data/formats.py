"""Field validation shared by every data format (prompts, SFT pairs, preference pairs, KTO labels).

Each check raises DataError naming the row's location, the field, what is wrong and how to fix
it, so a bad row fails before any worker starts rather than as a tokenizer error mid-run.
"""

from __future__ import annotations

import difflib
from typing import Any

from rlhf.data.sources import Record
from rlhf.errors import DataError

CHAT_ROLES = ("system", "user", "assistant", "tool")

Messages = list[dict[str, Any]]


def require_field(record: Record, key: str, *, hint: str = "") -> Any:
    """The value of `key`, or DataError listing the fields the row does have (close matches first)."""
    if key in record.fields:
        return record.fields[key]
    present = sorted(record.fields)
    close = difflib.get_close_matches(key, present, n=3, cutoff=0.5)
    ordered = close + [k for k in present if k not in close]
    suggestion = f" (did you mean {close[0]!r}?)" if close else ""
    message = f"{record.where}: no field {key!r}{suggestion}; the row has: {', '.join(ordered) or 'no fields'}"
    raise DataError(message + (f". {hint}" if hint else ""))


def require_text(record: Record, key: str) -> str:
    """A non-empty string field."""
    value = require_field(record, key)
    if not isinstance(value, str):
        raise DataError(f"{record.where}: field {key!r} must be a string, got {type(value).__name__} {_preview(value)}")
    if not value.strip():
        raise DataError(f"{record.where}: field {key!r} is empty; fill it in or remove the row")
    return value


def require_messages(record: Record, key: str) -> Messages:
    """A non-empty list of {"role", "content"} chat messages with known roles and string content."""
    value = require_field(record, key)
    if not isinstance(value, list) or not value:
        raise DataError(
            f"{record.where}: field {key!r} must be a non-empty list of chat messages "
            f'({{"role": ..., "content": ...}}), got {type(value).__name__} {_preview(value)}'
        )
    for i, message in enumerate(value):
        at = f"{record.where}: field {key!r}, message {i}"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f'{at} must be an object with "role" and "content", got {_preview(message)}')
        if message["role"] not in CHAT_ROLES:
            raise DataError(f"{at} has role {message['role']!r}; use one of {', '.join(CHAT_ROLES)}")
        if not isinstance(message["content"], str):
            raise DataError(f"{at} content must be a string, got {type(message['content']).__name__}")
    return value


def require_prompt(record: Record, key: str) -> str | Messages:
    """A prompt: plain text, or chat messages that end with a turn the assistant should answer."""
    value = require_field(record, key, hint="choose the prompt column with prompt_key=<name>")
    if isinstance(value, list):
        messages = require_messages(record, key)
        if messages[-1]["role"] == "assistant":
            raise DataError(
                f"{record.where}: field {key!r} ends with an assistant message; a prompt must end with "
                "the turn the model answers (drop the trailing assistant reply from the prompt)"
            )
        return messages
    return require_text(record, key)


def _preview(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
