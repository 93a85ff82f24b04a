"""Tokenizers behind one small interface: `encode(text)`, `decode(ids)`, and a few special ids.

Index ships a raw sentencepiece model (`tokenizer.model`) and a remote-code tokenizer class that we
never run. `SentencePieceTokenizer` reproduces that class exactly: the text is split on the special
tokens (`<unk>`, `<s>`, `</s>`, `reserved_0`, `reserved_1`: "special, not normalized" added tokens),
and every piece between them is encoded by `SentencePieceProcessor.encode` unchanged. We do not use
transformers' sentencepiece backend: with `legacy=False` it rewrites the model to drop the dummy
prefix, which is not how Index was trained (docs/index-model.md, "Trap").

Every other model uses its own Hugging Face tokenizer (`HFTokenizer`), special tokens split the same way.

Two ways to encode: `encode(text)` turns the text of a special token into that token (templates
write their control tokens this way), `encode_text(text)` never does (message content: a user who
types "<|im_start|>system" or "reserved_0" gets those characters as text, not a forged turn).

    tok = load_tokenizer(prepare_base("IndexTeam/Index-1.9B-Chat"))   # models/load.py
    tok.encode("reserved_0你好")        # -> [3, ...]
    tok.encode_text("reserved_0你好")   # -> the pieces of the characters r, e, s, ...
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from chatlora.errors import UserError

# Index's fixed special ids (tokenizer_config.json of Index-1.9B-Chat; docs/index-model.md, "Tokenizer").
INDEX_SPECIAL_TOKENS = {"<unk>": 0, "<s>": 1, "</s>": 2, "reserved_0": 3, "reserved_1": 4}

# Files that decide how text becomes ids; their bytes key the tokenized-data cache.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "added_tokens.json")


class SentencePieceTokenizer:
    """Index's tokenizer: special tokens split out, sentencepiece between them, no BOS added."""

    def __init__(self, model_file: Path, special_tokens: dict[str, int], eos_id: int, pad_id: int,
                 chat_template: str | None = None):
        import sentencepiece

        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.special_tokens = dict(special_tokens)
        self.special_ids = set(special_tokens.values())
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = self.sp.get_piece_size()
        self.chat_template = chat_template
        # Longest first, so that a special token never matches as the prefix of a longer one.
        names = sorted(special_tokens, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def encode_text(self, text: str) -> list[int]:
        """`text` as text only: sentencepiece on the whole string (it never produces a control symbol);
        where the model lists a special token as a user-defined piece, which sentencepiece matches in
        text, that occurrence is spelled in byte pieces instead."""
        ids = self.sp.encode(text)
        if not self.special_ids.intersection(ids):
            return ids
        pieces = self.sp.encode(text, out_type=str)   # the same tokenization, as pieces
        return [i for p in pieces for i in (self._spelled(p) if p in self.special_tokens else [self.sp.piece_to_id(p)])]

    def _spelled(self, text: str) -> list[int]:
        """`text` in byte-fallback pieces (<0x72> ...): the same characters, never a special id."""
        ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode("utf-8")]
        return [i for i in ids if i not in self.special_ids]

    @property
    def special_texts(self) -> list[str]:
        return list(self.special_tokens)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        out, run = [], []
        for i in ids:
            if i in self.special_ids:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special:
                    out.append(self.sp.id_to_piece(i) if i < self.vocab_size else "")
            elif i < self.vocab_size:  # a model's vocabulary can be larger than its tokenizer's: no text
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_id(self, text: str) -> int | None:
        return self.special_tokens.get(text)


class HFTokenizer:
    """A Hugging Face tokenizer seen through the same interface (no BOS/EOS added by encode)."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_id = hf_tokenizer.eos_token_id
        self.pad_id = hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id
        self.vocab_size = len(hf_tokenizer)
        self.chat_template = hf_tokenizer.chat_template
        # Every control token: the named ones (eos, bos, ...) and the added tokens marked special, which
        # tokenizers need not name (Llama 3's <|start_header_id|>, <|eot_id|>).
        self.special_tokens = {t: i for t, i in zip(hf_tokenizer.all_special_tokens, hf_tokenizer.all_special_ids)}
        self.special_tokens.update({t.content: i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special})
        self.special_ids = set(self.special_tokens.values())

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)

    def encode_text(self, text: str) -> list[int]:
        """`text` as text only: a special token's text is tokenized as characters, not as the token."""
        return self.hf.encode(text, add_special_tokens=False, split_special_tokens=True)

    @property
    def special_texts(self) -> list[str]:
        return [t for t in self.special_tokens if t]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        tid = self.hf.convert_tokens_to_ids(text)
        return None if tid is None or tid == self.hf.unk_token_id and text != self.hf.unk_token else tid


# How llama.cpp splits text before BPE (its `tokenizer.ggml.pre` names), by the model's pre-tokenizer
# in tokenizer.json: GPT-2's byte-level regex; the same with single digits (SmolLM); Llama 3's and
# Qwen2's regexes (digits in threes, and one by one).
_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}
_CONTRACTIONS_LETTERS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_PUNCT_SPACES = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    "llama-bpe": [{"type": "Split", "pattern": {"Regex": _CONTRACTIONS_LETTERS + r"\p{N}{1,3}" + _PUNCT_SPACES}},
                  {"type": "ByteLevel", "use_regex": False}],
    "qwen2": [{"type": "Split", "pattern": {"Regex": _CONTRACTIONS_LETTERS + r"\p{N}" + _PUNCT_SPACES}},
              {"type": "ByteLevel", "use_regex": False}],
}


def pre_tokenizer_name(spec: dict | None) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None when it is none of PRE_TOKENIZERS."""
    steps = (spec or {}).get("pretokenizers") if (spec or {}).get("type") == "Sequence" else [spec]
    for name, want in PRE_TOKENIZERS.items():
        if len(steps) == len(want) and all(s and all(s.get(k) == v for k, v in w.items())
                                           for s, w in zip(steps, want)):
            return name
    return None


class TextStream:
    """Turns a growing list of ids into text increments, holding back an incomplete UTF-8 character
    (a multi-byte character can span several byte-fallback tokens).

    Each push decodes a short window, not the whole reply (which cost ~90 us a token by 2,000 tokens,
    per row, in the server's generation thread): `ids[prefix:read]` is the text already shown
    decoded from a token behind it, so that a tokenizer's handling of a window's first token (a
    leading space dropped) is the same in both decodes; the new text is what `ids[prefix:]` adds."""

    def __init__(self, tok):
        self.tok, self.ids = tok, []
        self.prefix = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        shown = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        if text.endswith("\ufffd") or len(text) <= len(shown):   # mid-character, or no text yet
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def text(self) -> str:
        return self.tok.decode(self.ids).rstrip("\ufffd")  # a reply cut mid-character by the length limit


def load_index_tokenizer(model_dir: Path) -> SentencePieceTokenizer:
    model_file = model_dir / "tokenizer.model"
    if not model_file.is_file():
        raise UserError(f"{model_dir} looks like an Index model but has no tokenizer.model")
    config = _read_json(model_dir / "tokenizer_config.json")
    special = dict(INDEX_SPECIAL_TOKENS)
    # Honour the file's own added special tokens (ids and texts) where it lists them.
    for tid, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("special") and entry.get("content"):
            special[entry["content"]] = int(tid)
    return SentencePieceTokenizer(model_file, special, eos_id=special["</s>"], pad_id=special["<unk>"],
                                  chat_template=config.get("chat_template"))


def load_hf_tokenizer(model_dir: Path) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False)
    except Exception as e:
        raise UserError(f"could not load the tokenizer in {model_dir}: {e}") from None
    return HFTokenizer(hf)


def tokenizer_fingerprint(model_dir: Path) -> str:
    """A hash of the files that decide tokenization (keys the tokenized-data cache)."""
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = model_dir / name
        if path.is_file():
            h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
