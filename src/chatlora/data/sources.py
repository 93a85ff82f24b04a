"""Where training data comes from, and where each of its rows is, for messages and `--dump`.

    --data data.jsonl | data.json          JSON lines or a JSON array (data/rows.py)
    --data table.csv | table.tsv           a header row, then one row per line or quoted record; cells are
                                           text, and `history`, `conversations`, `messages` cells hold JSON
    --data table.parquet | .arrow | .feather   columns of any type (pyarrow); nested columns as they are
    --data folder/                         every such file in it and below, in path order
    --data hf:OWNER/NAME[:SPLIT]           a Hugging Face dataset fetched once with
                                           `chatlora download --dataset OWNER/NAME` (split default: train)

Every row maps onto the alpaca, sharegpt or messages shape as JSON rows do, with the same checks and
messages: `file:line: field: reason` for text files (CSV included), `file: row N: column: reason` for
Parquet, Arrow and hub datasets. Rows get one number each across the whole source (`Conversation.line`);
`SourcePart`s turn it back into a file and its own line or row (`locate`).

    result = read_source("data/", system_prompt=None)   # ReadResult: conversations, errors, parts
    locate(result.parts, conv.line)                     # "data/b.csv:12"
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import NamedTuple

from chatlora.data.rows import (
    BadField,
    Conversation,
    ReadResult,
    RowError,
    read_conversations,
    read_data_bytes,
    to_messages,
)
from chatlora.errors import UserError
from chatlora.models.hub import HUB_ID, cache_root, dataset_dir

JSON_SUFFIXES = (".json", ".jsonl")
TEXT_TABLES = {".csv": ",", ".tsv": "\t"}
ARROW_SUFFIXES = (".parquet", ".arrow", ".feather")
SUFFIXES = JSON_SUFFIXES + tuple(TEXT_TABLES) + ARROW_SUFFIXES
JSON_CELLS = ("history", "conversations", "messages")   # CSV cells that hold a list, written as JSON
HUB_PREFIX = "hf:"


def read_source(data: str | Path, system_prompt: str | None = None) -> ReadResult:
    """Every row of the data (a file, a folder of files, or a cached hub dataset) as conversations,
    each numbered once across the source, and every bad row as an error naming where it is."""
    data = str(data)
    if data.startswith(HUB_PREFIX):
        name, split = hub_dataset(data)
        return _rows_result(data, _hub_rows(name, split), system_prompt, "row")
    path = Path(data).expanduser()
    if path.is_dir():
        files = source_files(path)
        result = ReadResult(parts=[])
        for file in files:
            part = _read_file(file, system_prompt)
            base = result.parts[-1].end if result.parts else 0
            for conv in part.conversations:
                conv.line += base
            result.conversations += part.conversations
            result.errors += part.errors
            result.rows += part.rows
            result.fatal |= part.fatal
            result.parts.append(SourcePart(base, base + part.parts[0].end, str(file), part.parts[0].unit))
        return result
    return _read_file(path, system_prompt)


class SourcePart(NamedTuple):
    """One file of a source: its rows are numbered base+1 .. end across the source (a dataset report
    keeps these as JSON lists)."""
    base: int
    end: int
    path: str
    unit: str    # "line" (text files) or "row" (tables)


def locate(parts: list, number: int) -> str:
    """`file:line` (text files) or `file: row N` (tables) of the row numbered `number` in its source;
    `parts`: SourceParts or their JSON lists."""
    for part in parts:
        base, end, path, unit = part
        if base < number <= end or part is parts[-1]:
            return f"{path}:{number - base}" if unit == "line" else f"{path}: row {number - base}"
    return str(number)


def source_files(folder: Path) -> list[Path]:
    """The data files in a folder and below, in path order (hidden files and folders left out)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise UserError(f"data folder {folder} holds no data files ({', '.join(SUFFIXES)})")
    return files


def fingerprint(data: str | Path) -> str:
    """A hash of the data's content (the tokenized-data cache's key): the file's bytes, or every file of
    a folder with its relative name (a hub dataset's cached copy is such a folder, with the split named)."""
    data = str(data)
    if data.startswith(HUB_PREFIX):
        name, split = hub_dataset(data)
        if not dataset_dir(name).is_dir():
            _load_hub(name, split)   # says how to fetch it
        return hashlib.sha256(f"{split}\0{fingerprint(dataset_dir(name))}".encode()).hexdigest()
    path = Path(data).expanduser()
    if path.is_dir():
        digest = hashlib.sha256()
        for file in source_files(path):
            digest.update(f"{file.relative_to(path)}\0{hashlib.sha256(read_data_bytes(file)).hexdigest()}\0".encode())
        return digest.hexdigest()
    return hashlib.sha256(read_data_bytes(path)).hexdigest()


def hub_dataset(data: str) -> tuple[str, str]:
    """'hf:OWNER/NAME[:SPLIT]' -> (OWNER/NAME, SPLIT or train)."""
    name, _, split = data[len(HUB_PREFIX):].partition(":")
    if not HUB_ID.match(name):
        raise UserError(f"data {data!r}: a hub dataset is hf:OWNER/NAME or hf:OWNER/NAME:SPLIT")
    return name, split or "train"


def _read_file(path: Path, system_prompt: str | None) -> ReadResult:
    suffix = path.suffix.lower()
    if suffix in TEXT_TABLES:
        result = _csv_result(path, TEXT_TABLES[suffix], system_prompt)
    elif suffix in ARROW_SUFFIXES:
        result = _rows_result(str(path), _arrow_rows(path), system_prompt, "row")
    else:   # JSON, whatever the name says (the existing behaviour for .txt and no suffix)
        result = read_conversations(path, system_prompt)
        last = max([c.line for c in result.conversations] + [e.line for e in result.errors], default=0)
        result.parts = [SourcePart(0, last, str(path), "line")]
    return result


def _rows_result(path: str, rows, system_prompt: str | None, unit: str) -> ReadResult:
    """Conversations and errors of (number, row dict) pairs; `unit`: what the number counts."""
    result = ReadResult(parts=[])
    end = 0
    for number, row in rows:
        end = number
        result.rows += 1
        if isinstance(row, RowError):
            result.errors.append(row)
            continue
        try:
            messages, shape = to_messages(row, system_prompt)
        except BadField as bad:
            result.errors.append(RowError(path, number, bad.field, bad.reason, row=row, unit=unit))
            continue
        result.conversations.append(Conversation(number, messages, shape))
    result.parts = [SourcePart(0, end, path, unit)]
    return result


def _csv_result(path: Path, delimiter: str, system_prompt: str | None) -> ReadResult:
    raw = read_data_bytes(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        result = ReadResult(parts=[SourcePart(0, 1, str(path), "line")], fatal=True)
        line = raw[:e.start].count(b"\n") + 1
        result.errors.append(RowError(str(path), line, "", f"invalid UTF-8 at byte offset {e.start}"))
        return result
    return _rows_result(str(path), _csv_rows(str(path), text, delimiter), system_prompt, "line")


def _csv_rows(path: str, text: str, delimiter: str):
    """(line where the record starts, row dict or RowError) for each record after the header. Empty
    cells of optional columns are absent; JSON_CELLS are parsed."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return
    header = [h.strip() for h in header]
    last = reader.line_num
    while True:
        start = last + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, RowError(path, start, "", f"malformed {('CSV', 'TSV')[delimiter == chr(9)]} ({e})")
            return
        last = reader.line_num
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            yield start, RowError(path, start, "", f"{len(cells)} cells, but the header names {len(header)} columns")
            continue
        row = {}
        for name, cell in zip(header, cells):
            if name in JSON_CELLS and cell.strip():
                try:
                    cell = json.loads(cell)
                except ValueError as e:
                    row = RowError(path, start, name, f"must hold JSON (a list), got text that is not ({e})")
                    break
            if cell != "" or name in ("instruction", "output"):
                row[name] = cell
        yield start, row


def _arrow_rows(path: Path):
    """(row number from 1, row dict without null cells) of a Parquet, Arrow (file or stream) or Feather file."""
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise UserError(f"reading {path} needs pyarrow: pip install pyarrow (or 'chatlora[data]')") from None
    try:
        if path.suffix.lower() == ".parquet":
            table = pyarrow.parquet.read_table(path)
        else:
            try:
                table = pyarrow.ipc.open_file(path).read_all()
            except pyarrow.ArrowInvalid:   # datasets writes Arrow streams
                table = pyarrow.ipc.open_stream(path).read_all()
    except (pyarrow.ArrowException, OSError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield number, {k: v for k, v in row.items() if v is not None}


def _load_hub(name: str, split: str):
    folder = dataset_dir(name)
    if not folder.is_dir():
        raise UserError(f"dataset {name} is not in the cache ({folder}). Fetch it once with "
                        f"`chatlora download --dataset {name}`, or pass a local file or folder with --data.")
    try:
        import datasets
    except ImportError:
        raise UserError("reading a hub dataset needs the datasets package: pip install datasets "
                        "(or 'chatlora[data]')") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # the files are here; nothing is fetched
    try:
        return datasets.load_dataset(str(folder), split=split, cache_dir=str(cache_root() / "datasets-arrow"))
    except ValueError as e:   # an unknown split names the ones there are
        raise UserError(f"dataset {name}: {e}") from None
    except Exception as e:   # files that do not make one table (datasets' own error says which)
        raise UserError(f"dataset {name} ({folder}) cannot be read: {type(e).__name__}: {e}") from None


def _hub_rows(name: str, split: str):
    for number, row in enumerate(_load_hub(name, split), start=1):
        yield number, {k: v for k, v in row.items() if v is not None}
