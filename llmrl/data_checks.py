"""What TRL reads in each column of a dataset, checked row by row, and where a file goes wrong.

Every trainer's columns go through `require_columns`, so a prompt that is a number, a chat message
with an unknown role or with its text under 'text', or an empty answer stops the run before it
starts, with one DataError naming the dataset, the row (its line in a JSON Lines file), the
column and the fix. `json_problem` finds the line of a JSON file that datasets could not load.
"""

from __future__ import annotations

import json
from pathlib import Path

# TRL's roles (trl.data_utils.prepare_multimodal_messages); a model's own chat template may know fewer.
CHAT_ROLES = ("system", "user", "assistant", "tool")
# A prompt ending in one of these gets the generation prompt (user, tool) or is continued
# (assistant); TRL's apply_chat_template refuses any other last role.
PROMPT_LAST_ROLES = ("user", "tool", "assistant")
# What each column TRL reads holds: "text" a string, "chat" a list of messages, "either" one or the other.
COLUMN_KINDS = {"prompt": "either", "completion": "either", "chosen": "either", "rejected": "either",
                "messages": "chat", "text": "text"}
CHAT_SHAPE = 'a list of chat messages [{"role": "user", "content": "..."}]'
# Keys other formats use, and the key TRL reads instead (ShareGPT writes from/value).
RENAMED_KEYS = {"content": ("text", "value"), "role": ("from",)}


class DataError(ValueError):
    """A dataset the user has to fix; the message names the source and the column."""


def require_columns(rows, columns: tuple[str, ...], source: str) -> None:
    """Every trainer's check of the columns it reads: each present, filled in every row, and
    holding what TRL reads there (`value_problem`: text, chat messages with known roles and a
    'content'). A DataError names `source`, the row (its line in a JSON Lines file), the column
    and the fix, so a bad row stops the run before it starts instead of failing mid-training, or
    training silently on an empty prompt."""
    present = list(rows.column_names)
    for column in columns:
        if column not in present:
            raise DataError(
                f"Dataset {source!r} has no column {column!r} (its columns: {present}). "
                f"Rename the column holding the {column}s to {column!r}."
            )
        _check_values(rows[column], column, source)


def _check_values(values, column: str, source: str) -> None:
    empty = []
    for i, value in enumerate(values):
        if is_empty(value):
            empty.append(i)
        elif problem := value_problem(column, value):
            raise DataError(f"Dataset {source!r}, {_at(source, i)}, column {column!r}: {problem}.")
    if empty:
        line = _json_lines_number(source, empty[0])
        raise DataError(
            f"Dataset {source!r}{f', line {line}' if line else ''}: column {column!r} is empty in {len(empty)} of "
            f"{len(values)} rows (first at row {empty[0]}). Fill or drop those rows."
        )


def is_empty(value) -> bool:
    return value is None or (isinstance(value, (str, list)) and len(value) == 0)


def value_problem(column: str, value) -> str | None:
    """What is wrong with one filled value of a column TRL reads, with the fix; None if nothing
    is (or if TRL does not read `column`: extra columns go to reward functions as they are)."""
    kind = COLUMN_KINDS.get(column)
    if kind is None or (isinstance(value, str) and kind != "chat"):
        return None
    if isinstance(value, list) and kind != "text":
        return _messages_problem(value, PROMPT_LAST_ROLES if column == "prompt" else None)
    wanted = {"text": "a string", "chat": CHAT_SHAPE, "either": f"a string or {CHAT_SHAPE}"}[kind]
    return f"holds {_describe(value)}; it must be {wanted}"


def _messages_problem(messages: list, last_roles: tuple[str, ...] | None) -> str | None:
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f'message {i} is {_describe(message)}, not a message {{"role": ..., "content": ...}}'
        for key in ("role", "content"):
            if message.get(key) is None and not (key == "content" and message.get("tool_calls")):
                other = next((k for k in RENAMED_KEYS[key] if message.get(k) is not None), None)
                hint = f" (it has {other!r}: rename it to {key!r})" if other else ""
                return f"message {i} has no {key!r}{hint}; each message needs a 'role' and its text under 'content'"
        if message["role"] not in CHAT_ROLES:
            return f"message {i} has role {message['role']!r}; a role is one of {', '.join(CHAT_ROLES)}"
        content = message["content"]
        if content is not None and not isinstance(content, (str, list)):
            return f"message {i} has content {_describe(content)}; it must be a string (or a list of content parts)"
    if last_roles and messages[-1]["role"] not in last_roles:
        return (f"the last message has role {messages[-1]['role']!r}; a prompt ends with a user or tool message "
                "(the model answers it) or an assistant message (the model continues it)")
    return None


def _describe(value) -> str:
    """A value as the user wrote it in JSON: 'the number 3', 'null', "an object {'q': 1}"."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:80] + "..."
    if isinstance(value, str):
        return f"the string {text}"
    if isinstance(value, dict):
        return f"an object {text}"
    if isinstance(value, list):
        return f"a list {text}"
    return f"a {type(value).__name__} {text}"


def _at(source: str, index: int) -> str:
    """'line 3' of a JSON Lines file, else 'row 2' (the dataset index)."""
    number = _json_lines_number(source, index)
    return f"line {number}" if number else f"row {index}"


def _json_lines_number(source: str, index: int) -> int | None:
    """The 1-based line of row `index` when `source` is a local JSON Lines file (blank lines hold
    no row), else None: rows of other sources are named by their index."""
    path = Path(source)
    if path.suffix.lower() not in (".jsonl", ".json") or not path.is_file():
        return None
    row = -1
    with open(path, "rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            if row == -1 and not _is_object(line):
                return None  # one JSON document (an array, an object of columns), not one row per line
            row += 1
            if row == index:
                return number
    return None


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def json_problem(path: Path, source: str) -> str | None:
    """What makes a JSON file unreadable, with its line ('line 3, column 19: not valid JSON ...'), else None.

    A file that opens with '[' is one JSON document (an array of rows); any other is JSON Lines,
    one object per line, checked line by line: the loader's own error names no line (or counts
    rows from its block, not the file)."""
    raw, fix = path.read_bytes(), "Fix or remove that line."
    if raw.lstrip().startswith(b"["):
        try:
            json.loads(raw)
        except UnicodeDecodeError as err:
            return f"Dataset file {source!r}, byte {err.start}: not UTF-8 text ({err.reason}). Save it as UTF-8."
        except json.JSONDecodeError as err:
            return f"Dataset file {source!r}, line {err.lineno}, column {err.colno}: not valid JSON ({err.msg}). {fix}"
        return None
    rows = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except UnicodeDecodeError as err:
            return f"Dataset file {source!r}, line {number}, byte {err.start + 1}: not UTF-8 text ({err.reason}). {fix}"
        except json.JSONDecodeError as err:
            return f"Dataset file {source!r}, line {number}, column {err.colno}: not valid JSON ({err.msg}). {fix}"
        if not isinstance(row, dict):
            return f"Dataset file {source!r}, line {number}: {_describe(row)}, not an object of column: value pairs. {fix}"
        rows.append((number, row))
    problem = _kind_change(rows)
    return f"Dataset {source!r}, {problem}." if problem else None


def _kind_change(rows: list[tuple[int, dict]]) -> str | None:
    """The first column whose values change kind between lines (a string, then an object), which
    the JSON loader cannot put in one column: the value TRL cannot read there, if one is."""
    first = {}
    for number, row in rows:
        for column, value in row.items():
            if value is None:
                continue
            first_number, first_value = first.setdefault(column, (number, value))
            if _json_kind(value) == _json_kind(first_value):
                continue
            for at, seen in ((first_number, first_value), (number, value)):
                if problem := value_problem(column, seen):
                    return f"line {at}, column {column!r}: {problem}"
            return (f"line {number}, column {column!r}: {_describe(value)}, but {_describe(first_value)} on line "
                    f"{first_number}; a column holds one kind of value (all strings, all numbers, ...) in every row")
    return None


def _json_kind(value) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}[type(value)]
