"""Chat rows: a cell holding a conversation, ``[{"role": "system" | "user" | "assistant", "content": ...}, ...]``.

Contract: ``is_chat(value)`` says whether a cell is one; ``parse_chat(messages, column) -> (prompt, system,
solution)``: the user turns are the prompt (several are joined by a blank line), a system turn is the system prompt
(None without one), a last assistant turn is the solution (None without one). rlfr trains single-turn prompts, so
an assistant turn before the last user turn (a multi-turn conversation), two system turns, a conversation without a
user turn or an unknown role is a ``DataError`` naming the column. Content is a string or a list of text parts
(``{"type": "text", "text": ...}``); images belong in the image column (``data.image_field``).
"""

from __future__ import annotations

from typing import Any

from rlfr.errors import DataError

MESSAGE_ROLES = ("system", "user", "assistant")


def is_chat(value: Any) -> bool:
    """A list of messages (dicts with a role), as a chat column holds."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(isinstance(m, dict) and "role" in m for m in value)
    )


def _text_of(message: dict, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and all(
        isinstance(p, dict) and p.get("type") == "text" for p in content
    ):
        return "".join(str(p.get("text", "")) for p in content)
    raise DataError(
        f"message {i} ({message.get('role')}): content must be a string or a list of text parts, got {content!r:.80}"
        " (images go in the image column, data.image_field)"
    )


def parse_chat(messages: Any, column: str) -> tuple[str, str | None, str | None]:
    """(prompt, system or None, solution or None) of a chat cell (module docstring)."""
    if hasattr(messages, "tolist"):
        messages = messages.tolist()
    roles = [m.get("role") for m in messages]
    bad = [r for r in roles if r not in MESSAGE_ROLES]
    if bad:
        raise DataError(f"column {column!r}: role {bad[0]!r} is not one of {list(MESSAGE_ROLES)}")
    solution = None
    if roles[-1] == "assistant":
        solution, messages, roles = _text_of(messages[-1], len(roles)), messages[:-1], roles[:-1]
    if "assistant" in roles:
        raise DataError(
            f"column {column!r}: an assistant turn before the last user turn (a multi-turn conversation); rlfr "
            "trains single-turn prompts: keep one exchange per row"
        )
    systems = [_text_of(m, i + 1) for i, m in enumerate(messages) if m["role"] == "system"]
    users = [_text_of(m, i + 1) for i, m in enumerate(messages) if m["role"] == "user"]
    if len(systems) > 1:
        raise DataError(f"column {column!r}: {len(systems)} system turns; keep one")
    if not users:
        raise DataError(f"column {column!r}: no user turn (roles {roles})")
    return "\n\n".join(users), (systems[0] if systems else None), solution
