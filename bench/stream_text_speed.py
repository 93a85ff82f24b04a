"""Streaming detokenization cost per token (`tokenizer.TextStream`), against decoding the whole reply
after every token (what TextStream did before), on CPU.

    python bench/make_index_model.py /tmp/idx --layers 2   # any Index model directory: its tokenizer
    python bench/stream_text_speed.py /tmp/idx

The server's generation thread pushes every row's token through a TextStream between two decode steps,
so this cost is paid per row per step. The table comes last.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.models.tokenizer import TextStream, load_index_tokenizer  # noqa: E402


class WholeDecode:
    """The previous TextStream: the whole reply decoded after every token."""

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def per_token_us(make, tok, ids) -> tuple[float, str]:
    stream, out = make(tok), []
    start = time.perf_counter()
    for token in ids:
        out.append(stream.push(token))
    return (time.perf_counter() - start) / len(ids) * 1e6, "".join(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--lengths", default="128,512,2000")
    args = parser.parse_args()
    tok = load_index_tokenizer(Path(args.model_dir))
    rng = random.Random(0)
    rows = []
    for n in map(int, args.lengths.split(",")):
        ids = [rng.randrange(5, tok.vocab_size) for _ in range(n)]
        whole, text_whole = per_token_us(WholeDecode, tok, ids)
        window, text_window = per_token_us(TextStream, tok, ids)
        rows.append((n, whole, window, text_whole == text_window))
    print(f"{'tokens':>7}{'whole decode us/token':>23}{'TextStream us/token':>21}{'same text':>11}")
    for n, whole, window, same in rows:
        print(f"{n:>7}{whole:>23.1f}{window:>21.1f}{str(same):>11}")


if __name__ == "__main__":
    main()
