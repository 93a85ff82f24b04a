"""Conversations -> tokenized training examples, a report, a held-out split; cached on disk.

    ds = build_dataset(DataSpec(path, system_prompt, 384, "truncate", "stop", 0.02, 42), tok, fmt,
                       tokenizer_key=tokenizer_fingerprint(base.dir))
    ds.train[0].input_ids, ds.train[0].labels   # labels aligned with input_ids, -100 = not supervised
    print(format_report(ds.report))

Rules: an example longer than `max_seq_tokens` is truncated on the right (the self-llm recipe's behaviour),
dropped, or an error; an example left with no supervised token is dropped and counted, never
trained on. Exact duplicate conversations are counted (kept). The cache key covers the data bytes,
the tokenizer files, the template, the system prompt and the length rules, so a change in any of
them re-tokenizes; a repeated run loads the cached ids at once.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from tqdm import tqdm

from chatlora.atomic import new_file, write_lines
from chatlora.data.rows import describe_errors
from chatlora.data.sources import HUB_PREFIX, fingerprint, locate, read_source
from chatlora.errors import UserError
from chatlora.models import hub
from chatlora.templates import IGNORE

CACHE_VERSION = 4  # bump when tokenization or the cache layout changes (2: message text encoded as text;
#                    3: chat templates rendered without reasoning, one example per reply where turns are rewritten;
#                    4: the report's source parts, for folders and tables)
PROGRESS_MIN_ROWS = 2000


@dataclass
class DataSpec:
    path: str
    system_prompt: str | None
    max_seq_tokens: int
    on_overlength: Literal["truncate", "drop", "error"] = "truncate"
    on_error: Literal["stop", "skip"] = "stop"
    held_out_fraction: float = 0.0
    seed: int = 42

    @classmethod
    def of(cls, cfg, path: str | None = None) -> "DataSpec":
        """A config's data rules (training and evaluation use this one builder); `path`: another
        dataset read by the same rules, whole (no held-out split)."""
        from chatlora.config import system_prompt_for

        d = cfg.data
        return cls(path or d.path, system_prompt_for(cfg), d.max_seq_tokens, d.on_overlength, d.on_error,
                   0.0 if path else d.held_out_fraction, d.seed)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    line: int  # the row's number in its source: the line it starts on, or a table's row (data/sources.py)


@dataclass
class Dataset:
    train: list[Example]
    held_out: list[Example]
    report: dict


def data_file(path: str) -> Path:
    """The file or folder behind a local data path; 'huanhuan' is the dataset shipped with chatlora."""
    from chatlora.config import ASSETS, BUNDLED_DATA

    if path == BUNDLED_DATA:
        return ASSETS / "huanhuan.json"
    return Path(path).expanduser()


def data_source(path: str) -> str:
    """What data/sources.py reads for a data path: a local file or folder, or a hub dataset as given."""
    return path if path.startswith(HUB_PREFIX) else str(data_file(path))


def build_dataset(spec: DataSpec, tok, fmt, tokenizer_key: str, rejects_path: Path | None = None,
                  use_cache: bool = True) -> Dataset:
    """Read, validate, tokenize and split; from the cache when nothing that matters has changed."""
    source = data_source(spec.path)
    key = _cache_key(source, spec, f"{fmt.name}{':parse-special' if fmt.parse_special else ''}", tokenizer_key)
    cache = hub.cache_root() / "tokenized" / f"{key}.safetensors"
    examples, report = _load_cache(cache) if use_cache else (None, None)
    if examples is None:
        examples, report, clean = _tokenize_source(source, spec, tok, fmt, rejects_path)
        if use_cache and clean:
            _save_cache(cache, examples, report)
    train, held_out = split_held_out(examples, spec.held_out_fraction, spec.seed)
    # The source's path is not part of the cache key (its bytes are), so it is set here, not cached:
    # the parts are kept relative to it (a folder's files; "" for the source itself).
    parts = [[base, end, str(Path(source) / name) if name else source, unit]
             for base, end, name, unit in report["parts"]]
    report = dict(report, file=source, parts=parts, train_examples=len(train), held_out_examples=len(held_out))
    return Dataset(train, held_out, report)


def _tokenize_source(source: str, spec: DataSpec, tok, fmt, rejects_path: Path | None):
    result = read_source(source, spec.system_prompt)
    if result.rows == 0 and not result.errors:
        raise UserError(f"{source} holds no rows (an empty file, or an empty JSON array)")
    if result.errors and (spec.on_error == "stop" or result.fatal):
        hint = "" if result.fatal else "\nFix them, or pass --on-error skip to leave these rows out."
        raise UserError(f"{source}: {len(result.errors)} bad row(s):\n{describe_errors(result.errors)}{hint}")
    if result.errors and rejects_path is not None:
        write_lines(rejects_path, (_json_line({"line": e.line, "error": str(e), "row": e.row}) for e in result.errors),
                    overwrite=_is_rejects_file(rejects_path))
    dropped: Counter = Counter()
    truncated, examples, too_long = 0, [], []
    seen: Counter = Counter(json.dumps(c.messages, ensure_ascii=False, sort_keys=True)
                            for c in result.conversations)
    bar = tqdm(result.conversations, desc="tokenizing", unit="row", leave=False,
               disable=len(result.conversations) < PROGRESS_MIN_ROWS or None)
    per_reply = 0   # conversations the template made one example per reply of (templates.TemplateFormat)

    def rendered():
        nonlocal per_reply
        for conv in bar:
            try:
                made = fmt.examples(conv.messages)
            except UserError as e:
                raise UserError(f"{locate(result.parts, conv.line)}: {e}") from None
            per_reply += len(made) > 1
            yield from ((conv, ids, labels) for ids, labels in made)

    for conv, ids, labels in rendered():
        if len(ids) > spec.max_seq_tokens:
            if spec.on_overlength == "error":
                too_long.append(f"  {locate(result.parts, conv.line)}: {len(ids)} tokens")
                continue
            if spec.on_overlength == "drop":
                dropped["too_long"] += 1
                continue
            ids, labels = ids[: spec.max_seq_tokens], labels[: spec.max_seq_tokens]
            truncated += 1
        if all(label == IGNORE for label in labels):
            dropped["no_supervised_tokens"] += 1
            continue
        examples.append(Example(ids, labels, conv.line))
    if too_long:
        listed = "\n".join(too_long[:20]) + (f"\n  ... and {len(too_long) - 20} more" if len(too_long) > 20 else "")
        raise UserError(f"{len(too_long)} example(s) exceed max_seq_tokens={spec.max_seq_tokens}:\n{listed}\n"
                        f"Raise data.max_seq_tokens, or use on_overlength truncate or drop.")
    report = _report(spec, fmt.name, result, examples, dropped, truncated,
                     duplicates=sum(n - 1 for n in seen.values()))
    report["conversations_per_reply"] = per_reply
    report["parts"] = [[p.base, p.end, "" if p.path == source else str(Path(p.path).relative_to(source)), p.unit]
                       for p in result.parts]
    return examples, report, not result.errors


def _json_line(obj) -> str:
    """One JSON line, non-ASCII kept readable; \\u escapes where the text holds a lone surrogate
    (which UTF-8 cannot carry)."""
    line = json.dumps(obj, ensure_ascii=False)
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        line = json.dumps(obj)
    return line


def _is_rejects_file(path: Path) -> bool:
    """Whether `path` is a rejects file chatlora wrote (an earlier --on-error skip), which a new one
    may replace; any other file is the user's and is not overwritten."""
    try:
        with path.open(encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return False
    return isinstance(first, dict) and set(first) == {"line", "error", "row"}


def _report(spec, template, result, examples, dropped, truncated, duplicates) -> dict:
    lengths = sorted(len(e.input_ids) for e in examples)
    supervised = sum(sum(1 for x in e.labels if x != IGNORE) for e in examples)
    shapes = Counter(c.shape for c in result.conversations)
    return {
        "template": template, "system_prompt": spec.system_prompt,
        "max_seq_tokens": spec.max_seq_tokens, "on_overlength": spec.on_overlength,
        "rows_read": result.rows, "rows_rejected": len(result.errors),
        "rejected": [str(e) for e in result.errors[:20]],
        "shapes": dict(shapes), "examples_kept": len(examples), "dropped": dict(dropped),
        "truncated": truncated, "duplicates": duplicates,
        "tokens": {
            "total": sum(lengths), "supervised": supervised,
            "mean": round(sum(lengths) / len(lengths), 1) if lengths else 0,
            **{f"p{q}": _percentile(lengths, q) for q in (50, 90, 99)},
            "max": lengths[-1] if lengths else 0,
        },
    }


def _percentile(sorted_values: list[int], q: int) -> int:
    """Nearest-rank percentile."""
    if not sorted_values:
        return 0
    rank = max(1, -(-q * len(sorted_values) // 100))
    return sorted_values[rank - 1]


def split_held_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random held-out set (at least one example when fraction > 0); order otherwise kept."""
    if fraction <= 0 or len(examples) < 2:
        return list(examples), []
    count = min(len(examples) - 1, max(1, round(fraction * len(examples))))
    held = set(random.Random(seed).sample(range(len(examples)), count))
    return ([e for i, e in enumerate(examples) if i not in held],
            [e for i, e in enumerate(examples) if i in held])


# ---------------------------------------------------------------- cache and dump


def _cache_key(source: str, spec: DataSpec, template: str, tokenizer_key: str) -> str:
    parts = {
        "version": CACHE_VERSION, "data": fingerprint(source),
        "tokenizer": tokenizer_key, "template": template, "system": spec.system_prompt,
        "max_seq_tokens": spec.max_seq_tokens, "on_overlength": spec.on_overlength,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _save_cache(path: Path, examples: list[Example], report: dict) -> None:
    from safetensors.torch import save_file

    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    tensors = {
        "input_ids": torch.tensor([i for e in examples for i in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([i for e in examples for i in e.labels], dtype=torch.int32),
        "lengths": lengths, "lines": torch.tensor([e.line for e in examples], dtype=torch.int64),
    }
    with new_file(path, overwrite=True) as tmp:
        save_file(tensors, str(tmp), metadata={"report": json.dumps(report, ensure_ascii=False)})


def _load_cache(path: Path):
    from safetensors import safe_open

    if not path.is_file():
        return None, None
    try:
        with safe_open(str(path), framework="pt") as f:
            report = json.loads(f.metadata()["report"])
            ids, labels = f.get_tensor("input_ids").tolist(), f.get_tensor("labels").tolist()
            lengths, lines = f.get_tensor("lengths").tolist(), f.get_tensor("lines").tolist()
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None, None
    examples, start = [], 0
    for n, line in zip(lengths, lines):
        examples.append(Example(ids[start:start + n], labels[start:start + n], line))
        start += n
    return examples, report


def dump_examples(path: Path, ds: Dataset) -> int:
    """One JSON line per example, in the data's order: {"source": "FILE:LINE" (tables: "FILE: row N"),
    "split": "train" or "held_out", "input_ids": [...], "labels": [...]} (labels aligned, -100 = masked).
    Returns the count."""
    rows = sorted([(e, "train") for e in ds.train] + [(e, "held_out") for e in ds.held_out], key=lambda r: r[0].line)
    write_lines(path, (json.dumps({"source": locate(ds.report["parts"], e.line), "split": split,
                                   "input_ids": e.input_ids, "labels": e.labels}, ensure_ascii=False)
                       for e, split in rows))
    return len(rows)


def format_report(report: dict) -> str:
    """The data report as a few aligned lines for the terminal."""
    t = report["tokens"]
    dropped = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in report["dropped"].items()) or "none"
    shapes = ", ".join(f"{k} {v}" for k, v in report["shapes"].items()) or "none"
    lines = [
        f"data            {report['file']}",
        f"template        {report['template']}   system prompt: "
        f"{repr(report['system_prompt']) if report['system_prompt'] else 'none'}",
        f"rows read       {report['rows_read']}  ({shapes})",
        f"rows rejected   {report['rows_rejected']}",
        f"examples kept   {report['examples_kept']}  (train {report.get('train_examples', '-')}, "
        f"held-out {report.get('held_out_examples', '-')})",
        *([f"                {report['conversations_per_reply']} conversation(s) as one example per reply: the "
           f"chat template rewrites earlier turns"] if report.get("conversations_per_reply") else []),
        f"dropped         {dropped}",
        f"truncated       {report['truncated']}  (at {report['max_seq_tokens']} tokens)",
        f"duplicates      {report['duplicates']}  (exact, kept)",
        f"tokens          {t['total']} total, {t['supervised']} supervised, mean {t['mean']}",
        f"length          p50 {t['p50']}  p90 {t['p90']}  p99 {t['p99']}  max {t['max']}",
    ]
    return "\n".join(lines)


@dataclass
class ConfiguredData:
    """What a config's model and data give: the base model, its tokenizer, the chat format, the dataset."""
    base: object
    tok: object
    fmt: object
    dataset: Dataset


def dataset_for_config(cfg, rejects_path: Path | None = None) -> ConfiguredData:
    """The base model's tokenizer and chat format, and the dataset, as a config describes them."""
    from chatlora.models.load import load_tokenizer, prepare_base
    from chatlora.models.tokenizer import tokenizer_fingerprint
    from chatlora.templates import chat_format

    base = prepare_base(cfg.model.path)
    tok = load_tokenizer(base)
    fmt = chat_format(cfg.model.template, tok, base.family, cfg.data.parse_special_tokens)
    spec = DataSpec.of(cfg)
    if spec.on_error == "skip" and rejects_path is None:
        name = spec.path[len(HUB_PREFIX):].replace("/", "_").replace(":", "_") if spec.path.startswith(HUB_PREFIX) \
            else data_file(spec.path).stem
        rejects_path = Path(f"{name}.rejected.jsonl")
    ds = build_dataset(spec, tok, fmt, tokenizer_fingerprint(base.dir), rejects_path)
    if ds.report["rows_rejected"] and rejects_path is not None:
        ds.report["rejects_file"] = str(rejects_path)
    return ConfiguredData(base, tok, fmt, ds)
