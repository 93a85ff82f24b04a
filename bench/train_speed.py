"""Training speed of the seed job: the tutorial's HF Trainer recipe vs `chatlora train`, one run.

    python bench/make_index_model.py /tmp/index-1.9b            # random Index-1.9B-shaped weights
    python bench/train_speed.py /tmp/index-1.9b --steps 30 --warmup 10 --json results.json

Both paths see the same tokenized huanhuan examples (chatlora's `index` template), the seed's LoRA
(r 8, alpha 32, dropout 0.1, q,k,v,o,gate,up,down), 16 examples per optimizer step, lr 1e-4, bf16
weights. The reference is the tutorial's: `transformers.Trainer`, batch 4 x accumulation 4,
gradient checkpointing, `DataCollatorForSeq2Seq` padding to the longest. Reported: real (unpadded)
tokens/s and seconds per optimizer step (medians over the timed steps, after warm-up, device
synchronized), peak GPU memory, and the loss of both paths on the same first optimizer step with the
same initial adapter. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.batches import StepPlan, pack  # noqa: E402
from chatlora.config import load_config  # noqa: E402
from chatlora.dataset import dataset_for_config  # noqa: E402
from chatlora.lora import attach  # noqa: E402
from chatlora.model import load_model  # noqa: E402
from chatlora.train import accumulate_gradients, train  # noqa: E402


def seed_config(model_dir: str, **train):
    overrides = ["data.held_out_fraction=0", "train.eval_every=0", "train.save_every=0"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(overrides=overrides, flags={"model.path": model_dir})


def reference_trainer(cfg, examples, steps: int, warmup: int) -> dict:
    """The tutorial's training, exactly: HF Trainer + peft, batch 4 x 4, gradient checkpointing."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    base, tok, _, _ = dataset_for_config(cfg)
    model = load_model(base, "bfloat16", "cuda")
    model.enable_input_require_grads()  # what the tutorial's peft + checkpointing setup needs
    model = attach(model, cfg.lora)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=1e-4, max_steps=warmup + steps,
                             gradient_checkpointing=True, logging_steps=10, save_strategy="no",
                             report_to=[], disable_tqdm=True, seed=cfg.train.seed)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=_seq2seq_collator(tok.pad_id), callbacks=[Clock()])
    trainer.train()
    step_seconds = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
    tokens_per_step = 16 * sum(len(e.input_ids) for e in examples) / len(examples)
    del trainer, model
    return _summary(step_seconds, tokens_per_step, torch.cuda.max_memory_allocated())


def _seq2seq_collator(pad_id: int):
    """DataCollatorForSeq2Seq(padding=True) semantics: pad input_ids with pad, labels with -100
    (our tokenizer is not a transformers one, so the collator is written out)."""
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        out = {k: [] for k in ("input_ids", "attention_mask", "labels")}
        for r in rows:
            n = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [pad_id] * n)
            out["attention_mask"].append(r["attention_mask"] + [0] * n)
            out["labels"].append(r["labels"] + [-100] * n)
        return {k: torch.tensor(v) for k, v in out.items()}
    return collate


def chatlora_path(cfg, steps: int, warmup: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    run = Path(tempfile.mkdtemp()) / "run"
    cfg.train.max_steps = warmup + steps
    train(cfg, run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    timed = rows[warmup:]
    step_seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
    tokens_per_step = statistics.mean(r["tokens"] for r in timed)
    return _summary(step_seconds, tokens_per_step, torch.cuda.max_memory_allocated())


def first_step_losses(cfg, examples) -> dict:
    """Both loss definitions on the same first optimizer step, same initial adapter (B != 0)."""
    base, tok, _, _ = dataset_for_config(cfg)
    torch.manual_seed(0)
    model = attach(load_model(base, "bfloat16", "cuda"), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    model.eval()  # no dropout: the two paths must see the same function
    step = [examples[i] for i in StepPlan(len(examples), 16, cfg.train.seed).indices(0)]
    ours = accumulate_gradients(model, step, 4, lambda ex: pack(ex, "cuda")).item()
    collate = _seq2seq_collator(tok.pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, 16, 4):
            batch = collate([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                              "labels": e.labels} for e in step[i:i + 4]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**{k: v.cuda() for k, v in batch.items()}).loss.float().item()
            total, count = total + loss * n, count + n
    return {"chatlora": ours, "reference": total / count}


def _summary(step_seconds, tokens_per_step, peak) -> dict:
    median = statistics.median(step_seconds)
    return {"seconds_per_step": median, "tokens_per_s": tokens_per_step / median,
            "peak_gib": peak / 2**30, "timed_steps": len(step_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    cfg = seed_config(args.model_dir)
    _, _, _, ds = dataset_for_config(cfg)
    results = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "peft": __import__("peft").__version__, "examples": len(ds.train),
               "mean_tokens_per_example": sum(len(e.input_ids) for e in ds.train) / len(ds.train)}
    results["first_step_loss"] = first_step_losses(cfg, ds.train)
    results["reference"] = reference_trainer(cfg, ds.train, args.steps, args.warmup)
    torch.cuda.empty_cache()
    results["chatlora"] = chatlora_path(seed_config(args.model_dir), args.steps, args.warmup)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    ref = results["reference"]["tokens_per_s"]
    print(json.dumps(results, indent=2))
    print(f"\n{'path':<40}{'tokens/s':>10}{'s/step':>9}{'peak GiB':>10}{'x ref':>7}")
    for name, label in (("reference", "seed recipe (HF Trainer, 4x4, ckpt, pad)"), ("chatlora", "chatlora train")):
        r = results[name]
        print(f"{label:<40}{r['tokens_per_s']:>10.0f}{r['seconds_per_step']:>9.3f}{r['peak_gib']:>10.1f}"
              f"{r['tokens_per_s'] / ref:>7.2f}")
    print(f"first-step loss: chatlora {results['first_step_loss']['chatlora']:.5f}, "
          f"reference {results['first_step_loss']['reference']:.5f}")


if __name__ == "__main__":
    main()
