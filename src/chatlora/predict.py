"""`chatlora generate`: a run's replies to every prompt of a dataset, as JSON lines; and the batched
prediction that `eval` and the demo use.

    chatlora generate runs/huanhuan --data test.jsonl --output preds.jsonl

Each row's last user turn (with the conversation before it and the run's system prompt where the row
has none) is the prompt; its reply is the reference. Prompts are decoded BATCH at a time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from chatlora.atomic import refuse_existing, write_lines
from chatlora.data.dataset import data_source
from chatlora.data.sources import read_source
from chatlora.decode.engine import BatchGeneration, Sampling
from chatlora.errors import UserError
from chatlora.rundir import Run, load_run, load_tuned_model

BATCH = 16


@dataclass
class Sample:
    messages: list[dict]  # the conversation up to the last user turn
    reference: str
    line: int


@dataclass
class Prediction:
    text: str
    finish_reason: str    # "stop" (the model ended its reply) or "length"


def samples_from(run: Run, data: str | None, lines: set[int] | None = None) -> list[Sample]:
    """The final user turn of each conversation as a prompt, its reply as the reference (the run's
    own data when `data` is None; only the rows starting on `lines` when given)."""
    result = read_source(data_source(data or run.cfg.data.path), run.system_prompt)
    if result.errors:
        raise UserError(f"{data}: {len(result.errors)} bad row(s), e.g. {result.errors[0]}")
    return [Sample(c.messages[:-1], c.messages[-1]["content"], c.line) for c in result.conversations
            if lines is None or c.line in lines]


def predict(model, run: Run, samples: list[Sample], sampling: Sampling, desc: str) -> list[Prediction]:
    """Each sample's reply, BATCH prompts decoded together."""
    out = []
    bar = tqdm(total=len(samples), desc=desc, unit="prompt", leave=False)
    for i in range(0, len(samples), BATCH):
        chunk = samples[i:i + BATCH]
        prompts = [run.fmt.prompt(s.messages) for s in chunk]
        gen = BatchGeneration(model, prompts, run.fmt.stop_ids, [sampling] * len(chunk), pad_id=run.tok.pad_id)
        tokens: list[list[int]] = [[] for _ in chunk]
        for row, token in gen:
            tokens[row].append(token)
        out += [Prediction(run.tok.decode(t).rstrip("\ufffd"), reason) for t, reason in zip(tokens, gen.finish_reasons)]
        bar.update(len(chunk))
    bar.close()
    return out


def generate_predictions(run_path: str, data: str, output: str, limit: int | None = None, **sampling) -> Path:
    run = load_run(run_path)
    samples = samples_from(run, data)[:limit]
    out = Path(output)
    refuse_existing(out)  # before the work, not after
    preds = predict(load_tuned_model(run), run, samples, Sampling.from_config(run.cfg.generate, **sampling),
                    "generating")
    write_lines(out, (json.dumps({"line": s.line, "messages": s.messages, "reference": s.reference,
                                  "prediction": p.text, "finish_reason": p.finish_reason}, ensure_ascii=False)
                      for s, p in zip(samples, preds)))
    return out
