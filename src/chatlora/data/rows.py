"""Read a user's dataset into conversations, reporting every bad row as path:line, field and reason.

Accepted files: a JSON array, or JSON lines (a file whose first line is a whole JSON value followed
by more lines is JSON lines, even if that value is an array); UTF-8 with or without a BOM; CRLF and
blank lines are fine. Whatever the bytes, reading gives rows or `path:line` errors, never a traceback
(rows nested too deeply, numbers too long to read, invalid UTF-8 or lone surrogates included).
Row shapes, detected per row:

    alpaca    {"instruction", "input"?, "output", "system"?, "history"?: [[q, a], ...]}
    sharegpt  {"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "system"?}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}

Each row becomes `Conversation(line, messages)`: an optional system message, then user/assistant
turns alternating, ending on the assistant. Alpaca joins `instruction` and a non-empty `input` with a
newline (LLaMA-Factory's convention; the bundled data has no `input`).

    result = read_conversations("data.jsonl", system_prompt="You are ...")
    result.conversations, result.errors     # Conversation(line, messages, shape), RowError(path, line, ...)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from chatlora.errors import UserError

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system"}
MESSAGE_ROLES = {"system", "user", "assistant"}
MAX_LISTED_ERRORS = 20


@dataclass
class RowError:
    path: str
    line: int
    field: str  # the offending field ("" for the row as a whole)
    reason: str
    column: int | None = None
    row: object = None  # the row as read, when it could be parsed (for the rejects file)
    unit: str = "line"  # what `line` counts: the file's lines, or a table's rows (Parquet, Arrow, hub)

    def __str__(self) -> str:
        where = (f"{self.path}:{self.line}" + (f":{self.column}" if self.column else "") if self.unit == "line"
                 else f"{self.path}: row {self.line}")
        return f"{where}: {self.field + ': ' if self.field else ''}{self.reason}"


@dataclass
class Conversation:
    line: int
    messages: list[dict]
    shape: str = "alpaca"


@dataclass
class ReadResult:
    conversations: list[Conversation] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    rows: int = 0
    fatal: bool = False  # the file could not be read to its end (JSON array syntax, encoding)
    parts: list = field(default_factory=list)  # data/sources.py: the files behind the rows' numbers


class BadField(Exception):
    def __init__(self, field: str, reason: str):
        self.field, self.reason = field, reason


def read_conversations(path: str | Path, system_prompt: str | None = None) -> ReadResult:
    """Every row of the file, as conversations and errors; never raises for a bad row."""
    path = Path(path)
    raw = read_data_bytes(path)
    bom = 3 if raw.startswith(b"\xef\xbb\xbf") else 0
    raw = raw[bom:]
    result = ReadResult()
    if raw.lstrip()[:1] == b"[" and not _first_line_is_a_row(raw):
        rows = _json_array_rows(raw, str(path), result, bom)
    else:
        rows = _jsonl_rows(raw, str(path), result, bom)
    for line, obj in rows:
        try:
            messages, shape = to_messages(obj, system_prompt)
        except BadField as bad:
            result.errors.append(RowError(str(path), line, bad.field, bad.reason, row=obj))
            continue
        result.conversations.append(Conversation(line, messages, shape))
    return result


def read_data_bytes(path: Path) -> bytes:
    """The file's bytes, or a UserError saying why they cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"data path {path} is a directory; pass a data file") from None
    except OSError as e:
        raise UserError(f"cannot read data file {path}: {e.strerror or e}") from None


def _first_line_is_a_row(raw: bytes) -> bool:
    """Whether a file starting with '[' is JSON lines whose first row is an array: its first line is a
    whole JSON value and more follows. (A JSON array's first line is '[' or the whole array.)"""
    first, _, rest = raw.lstrip().partition(b"\n")
    if not rest.strip():
        return False
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        return False
    return True


def _parse(text: str):
    """json.loads, with the failures that are not JSONDecodeError turned into one (ValueError)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:   # e.g. an integer of more than 4,300 digits
        raise ValueError(str(e).split(";")[0]) from None


def _decode(raw: bytes, path: str, first_line: int, base: int) -> str | RowError:
    """The text, or the error naming the line and the file's byte offset of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = first_line + raw[: e.start].count(b"\n")
        return RowError(path, line, "", f"invalid UTF-8 at byte offset {base + e.start}")


def _jsonl_rows(raw: bytes, path: str, result: ReadResult, offset: int):
    for number, chunk in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(chunk) + 1
        if not chunk.strip():
            continue
        result.rows += 1   # a line that cannot be read is a row read, and rejected
        text = _decode(chunk, path, number, start)
        if isinstance(text, RowError):
            result.errors.append(text)
            continue
        try:
            obj = _parse(text)
        except json.JSONDecodeError as e:
            result.errors.append(RowError(path, number, "", f"malformed JSON ({e.msg})", column=e.colno))
            continue
        except ValueError as e:
            result.errors.append(RowError(path, number, "", f"malformed JSON ({e})"))
            continue
        yield number, obj


def _json_array_rows(raw: bytes, path: str, result: ReadResult, offset: int):
    """Elements of a top-level JSON array with the line each starts on. A syntax error ends the read:
    past it, nothing in an array can be located reliably."""
    text = _decode(raw, path, 1, offset)
    if isinstance(text, RowError):
        result.errors.append(text)
        result.fatal = True
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, text.index("[") + 1)
    line, counted = 1, 0
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        line += text.count("\n", counted, pos)
        counted = pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            result.errors.append(RowError(path, e.lineno, "", f"malformed JSON ({e.msg})", column=e.colno))
            result.fatal = True
            return
        except (ValueError, RecursionError) as e:
            reason = "nested too deeply" if isinstance(e, RecursionError) else str(e).split(";")[0]
            result.errors.append(RowError(path, line, "", f"malformed JSON ({reason})"))
            result.fatal = True
            return
        result.rows += 1
        yield line, obj
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
            continue
        if pos < len(text) and text[pos] == "]" and not text[pos + 1:].strip():
            return
        bad_line = text.count("\n", 0, pos) + 1
        col = pos - text.rfind("\n", 0, pos)
        result.errors.append(RowError(path, bad_line, "", "malformed JSON (expected ',' or ']' after an "
                                      "element, and nothing after the closing ']')", column=col))
        result.fatal = True
        return


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


# ---------------------------------------------------------------- row shapes


def to_messages(obj, system_prompt: str | None = None) -> tuple[list[dict], str]:
    """A row as ([system?], user, assistant, ...) messages and the shape it was read as; raises BadField."""
    if not isinstance(obj, dict):
        raise BadField("", f"a row must be a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        messages, shape = _from_messages(obj), "messages"
    elif "conversations" in obj:
        messages, shape = _from_sharegpt(obj), "sharegpt"
    elif "instruction" in obj or "output" in obj:
        messages, shape = _from_alpaca(obj), "alpaca"
    else:
        raise BadField("", "unknown row shape: expected 'instruction'/'output' (alpaca), 'conversations' "
                       f"(sharegpt) or 'messages'; found fields {sorted(obj)}")
    if messages[0]["role"] != "system" and system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages, shape


def _text(obj, key, where: str, required: bool = True, allow_empty: bool = False) -> str:
    """obj[key] as a string (obj: a row, a turn, or a history pair with key 0 or 1); raises BadField."""
    if (key not in obj if isinstance(obj, dict) else key >= len(obj)) or obj[key] is None:
        if required:
            raise BadField(where, "missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise BadField(where, f"must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:   # JSON's \ud800 escapes decode to lone surrogates
        raise BadField(where, f"holds a lone surrogate (U+{ord(value[e.start]):04X}) at character {e.start}: "
                          f"not valid Unicode") from None
    if required and not allow_empty and not value.strip():
        raise BadField(where, "is empty")
    return value


def _from_alpaca(obj: dict) -> list[dict]:
    instruction = _text(obj, "instruction", "instruction")
    extra = _text(obj, "input", "input", required=False)
    output = _text(obj, "output", "output")
    system = _text(obj, "system", "system", required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise BadField("history", f"must be a list of [question, answer] pairs, got {type(history).__name__}")
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) and x.strip() for x in pair)):
            raise BadField(f"history[{i}]", "must be a [question, answer] pair of non-empty strings")
        for j in range(2):
            _text(pair, j, f"history[{i}][{j}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    user = instruction + ("\n" + extra if extra.strip() else "")
    return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _turns(obj: dict, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> list[dict]:
    turns = obj[key]
    if not isinstance(turns, list) or not turns:
        raise BadField(key, "must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise BadField(where, f"must be an object, got {type(turn).__name__}")
        role = _text(turn, role_key, f"{where}.{role_key}")
        if role not in roles:
            raise BadField(f"{where}.{role_key}", f"unknown role '{role}' (expected one of {', '.join(roles)})")
        messages.append({"role": roles[role], "content": _text(turn, text_key, f"{where}.{text_key}")})
    return messages


def _from_sharegpt(obj: dict) -> list[dict]:
    messages = _turns(obj, "conversations", "from", "value", SHAREGPT_ROLES)
    system = _text(obj, "system", "system", required=False)
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    _check_order(messages, "conversations")
    return messages


def _from_messages(obj: dict) -> list[dict]:
    messages = _turns(obj, "messages", "role", "content", {r: r for r in MESSAGE_ROLES})
    _check_order(messages, "messages")
    return messages


def _check_order(messages: list[dict], key: str) -> None:
    start = 1 if messages[0]["role"] == "system" else 0
    for i, m in enumerate(messages[start:], start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise BadField(f"{key}[{i}]", f"expected a {expected} turn here, got {m['role']} (turns must be "
                                      "[system], then user and assistant alternating)")
    if len(messages) == start:
        raise BadField(key, "has no user turn")
    if messages[-1]["role"] != "assistant":
        raise BadField(key, "must end with an assistant turn (nothing to learn after the last user turn)")


def describe_errors(errors: list[RowError]) -> str:
    """The first errors, one per line, and how many more there are."""
    lines = [f"  {e}" for e in errors[:MAX_LISTED_ERRORS]]
    if len(errors) > MAX_LISTED_ERRORS:
        lines.append(f"  ... and {len(errors) - MAX_LISTED_ERRORS} more")
    return "\n".join(lines)
