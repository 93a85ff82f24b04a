"""The one training loop, top to bottom: seed -> model -> adapter -> data -> optimizer -> loop -> save.

    chatlora train --model smollm2-demo --output runs/demo --set train.max_steps=20
    chatlora train --output runs/demo --resume          # continue exactly where it stopped

Loss semantics: the loss of an optimizer step is the mean cross-entropy over every supervised token
of all its micro-batches (sum of token losses / supervised tokens of the step), so k accumulated
micro-batches give the same gradient as one batch of all their examples, and packed rows give the
same as padded ones (tests/test_train.py proves both).

Side activities are single calls guarded by a step condition: held-out loss every `eval_every`
steps, a checkpoint every `save_every`. SIGINT/SIGTERM finish the current step, write a checkpoint
and exit non-zero; a non-finite loss or gradient stops the run naming the step.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import torch
from tqdm import tqdm

from chatlora.batches import StepPlan, held_out_loss, loss_sum, micro_batches, pack, pad, supervised_count
from chatlora.checkpoint import MARKER, NonFiniteError, latest_checkpoint, load_checkpoint, save_checkpoint
from chatlora.config import Config
from chatlora.dataset import dataset_for_config
from chatlora.errors import UserError
from chatlora.fastpath import FastStep, unsupported_reason
from chatlora.lora import attach, save_adapter, trainable_parameters
from chatlora.model import load_model
from chatlora.rundir import read_config, write_run_files

# Changing any of these would change what a resumed run computes; resuming refuses it.
RESUME_FIXED = ("model.path", "model.template", "lora.r", "lora.alpha", "lora.dropout", "lora.targets",
                "lora.rslora", "lora.dora", "data.path", "data.system_prompt", "data.max_seq_tokens",
                "data.on_overlength", "data.held_out_fraction", "data.seed", "train.examples_per_step",
                "train.seed", "train.learning_rate", "train.schedule", "train.warmup_ratio",
                "train.weight_decay")
# These may change on resume (to extend or shorten a run); the learning-rate schedule then changes too.
RESUME_ADJUSTABLE = ("train.epochs", "train.max_steps")


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint; `code` is the exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def lr_at(step: int, total: int, cfg) -> float:
    """Learning rate of optimizer update `step` (0-based): linear warm-up, then the decay
    (HF get_linear/cosine_schedule_with_warmup semantics: update 0 uses the peak when there is no warm-up)."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.learning_rate * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    match cfg.schedule:
        case "linear":
            factor = max(0.0, 1.0 - progress)
        case "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        case _:
            factor = 1.0
    return cfg.learning_rate * factor


def prepare_output(run: Path, resume: bool, overwrite: bool, cfg: Config) -> Path | None:
    """Check the output directory; return the checkpoint to resume from (or None)."""
    if resume:
        saved = read_config(run)
        drift = [f"{key}: {_get(saved, key)!r} -> {_get(cfg, key)!r}" for key in RESUME_FIXED
                 if _get(saved, key) != _get(cfg, key)]
        if drift:
            raise UserError(f"cannot resume {run}: the configuration differs from the run's:\n  "
                            + "\n  ".join(drift) + "\nStart a new run (another --output) instead.")
        for key in RESUME_ADJUSTABLE:
            if _get(saved, key) != _get(cfg, key):
                print(f"chatlora: resuming with {key} {_get(saved, key)!r} -> {_get(cfg, key)!r}: the "
                      f"learning-rate schedule follows the new length from here on")
        return latest_checkpoint(run)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {run} is not empty. Pass --resume to continue that run, "
                            f"--overwrite to replace it, or choose another --output.")
        shutil.rmtree(run)
    return None


def _get(cfg: Config, key: str):
    group, name = key.split(".")
    return getattr(getattr(cfg, group), name)


def accumulate_gradients(model, examples, micro_batch_examples: int, collate, step: int = -1,
                         micro_batch_tokens: int | None = None) -> torch.Tensor:
    """Backward over one optimizer step's examples, micro-batch by micro-batch, each micro-batch's
    token-loss sum divided by the supervised tokens of the WHOLE step: the gradients equal those of
    one batch holding every example. Returns the step's loss (a 0-d tensor; no host sync here)."""
    supervised = supervised_count(examples)
    total = None
    for micro, chunk in enumerate(micro_batches(examples, micro_batch_examples, micro_batch_tokens)):
        _fault(step, micro)
        part = loss_sum(model, collate(chunk)) / supervised
        part.backward()
        total = part.detach() if total is None else total + part.detach()
    return total


def _fault(step: int, micro: int) -> None:
    """Test-only fault injection: CHATLORA_FAULT=kill:STEP:MICRO SIGKILLs the process right before
    micro-batch MICRO of optimizer step STEP (0-based), as a crash or an out-of-memory kill would."""
    spec = os.environ.get("CHATLORA_FAULT", "")
    if spec.startswith("kill:") and spec.split(":")[1:] == [str(step), str(micro)]:
        os.kill(os.getpid(), signal.SIGKILL)


class _Metrics:
    """metrics.jsonl, one JSON object per line; on resume, rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_through_step: int):
        rows = []
        if path.is_file():
            rows = [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= keep_through_step]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        self.path, self.rows = path, rows

    def log(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


def train(cfg: Config, output: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Train a LoRA adapter as `cfg` says, into the run directory `output`; return its final/ path."""
    run = Path(output)
    started = time.perf_counter()
    checkpoint = prepare_output(run, resume, overwrite, cfg)
    t = cfg.train
    torch.manual_seed(t.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    (run / "rejected.jsonl").unlink(missing_ok=True)  # the run's own; rewritten by this data check
    base, tok, fmt, ds = dataset_for_config(cfg, rejects_path=run / "rejected.jsonl")
    if not ds.train:
        raise UserError("no training examples are left after the data check")
    write_run_files(run, cfg, base, fmt, ds.report)

    model = attach(load_model(base, cfg.model.dtype, device), cfg.lora)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for _, p in trainable_parameters(model)]
    # fused: one kernel for all adapter tensors on a GPU (the foreach version launches per chunk of tensors)
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=device == "cuda")

    plan = StepPlan(len(ds.train), t.examples_per_step, t.seed)
    total = plan.total_steps(t.epochs, t.max_steps)
    start = load_checkpoint(checkpoint, model, optimizer)["step"] if checkpoint else 0
    if resume and checkpoint is None:
        print(f"chatlora: no complete checkpoint in {run}; starting from step 0")
    metrics = _Metrics(run / "metrics.jsonl", keep_through_step=start)
    fast = fast_step(model, cfg, device)

    def evaluate(step: int) -> None:
        loss = held_out_loss(model, ds.held_out, t.micro_batch_examples, device, t.micro_batch_tokens)
        metrics.log({"step": step, "held_out_loss": loss})

    if start == 0 and ds.held_out:  # the base model's held-out loss: where the curve starts
        evaluate(0)
    collate = (lambda ex: pack(ex, device)) if t.packing else (lambda ex: pad(ex, tok.pad_id, device))

    stop_signal = []
    handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, total):
            began = time.perf_counter()
            examples = [ds.train[i] for i in plan.indices(step)]
            lr = lr_at(step, total, t)
            for group in optimizer.param_groups:
                group["lr"] = lr
            if fast:
                loss = fast.accumulate(examples, t.micro_batch_examples, t.micro_batch_tokens).item()
            else:
                loss = accumulate_gradients(model, examples, t.micro_batch_examples, collate, step,
                                            t.micro_batch_tokens if t.packing else None).item()
            if fast:
                grad_norm = fast.clip_grad_norm_(t.max_grad_norm).item()
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm or float("inf")).item()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                raise NonFiniteError(f"step {step + 1}: loss {loss}, gradient norm {grad_norm}")
            optimizer.step()
            if fast:  # its gradient buffer stays allocated: the captured passes write into it
                fast.zero_grad()
            else:
                optimizer.zero_grad(set_to_none=True)
            done = step + 1
            tokens = sum(len(e.input_ids) for e in examples)
            seconds = time.perf_counter() - began
            metrics.log({"step": done, "epoch": round(done / plan.steps_per_epoch, 4), "loss": loss, "lr": lr,
                         "grad_norm": grad_norm, "tokens": tokens,
                         "tokens_per_s": round(tokens / seconds, 1),
                         "elapsed_s": round(time.perf_counter() - started, 3)})
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens / seconds:.0f}")
            bar.update(1)
            if t.eval_every and done % t.eval_every == 0 and done < total:
                evaluate(done)
            if (t.save_every and done % t.save_every == 0) or stop_signal:
                save_checkpoint(run, done, model, optimizer, {"epoch": done / plan.steps_per_epoch},
                                t.keep_last)
            if stop_signal:
                raise Interrupted(128 + stop_signal[0], f"stopped by signal after step {done}; a checkpoint "
                                  f"is in {run}/checkpoint-{done}. Resume with:\n    chatlora train "
                                  f"--output {run} --resume")
    except NonFiniteError as e:
        raise UserError(f"training stopped: {e}. No checkpoint was written for this step; lower "
                        f"train.learning_rate or set train.max_grad_norm.") from None
    finally:
        bar.close()
        for s, h in handlers.items():
            signal.signal(s, h)

    final = _save_final(run, model)
    evaluate(total)
    _plot(run, metrics.rows)
    return final


def fast_step(model, cfg: Config, device: str) -> FastStep | None:
    """The fused training pass when `train.fast_path` asks for it and the model allows it, else None."""
    t = cfg.train
    mode = t.fast_path
    if mode == "auto":
        mode = "graphs" if device == "cuda" else "plain"
    if mode == "plain":
        return None
    reason = unsupported_reason(model, cfg.lora) or (None if t.packing else "train.packing is off")
    if reason is None and mode == "graphs" and device != "cuda":
        reason = "CUDA graphs need a GPU"
    if reason:
        if t.fast_path != "auto":
            raise UserError(f"train.fast_path={t.fast_path} is not available: {reason}")
        print(f"chatlora: the fast training path does not cover this run ({reason}); using the plain peft model")
        return None
    step = FastStep(model, device, graphs=mode == "graphs", checkpoint=t.gradient_checkpointing)
    step.zero_grad()
    return step


def _save_final(run: Path, model) -> Path:
    final, tmp = run / "final", run / ".tmp-final"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _plot(run: Path, rows: list[dict]) -> None:
    """loss_curve.png: per-step train loss and held-out loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    train_rows = [r for r in rows if "loss" in r]
    held = [r for r in rows if r.get("held_out_loss") is not None]
    ax.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], label="train", lw=1)
    if held:
        ax.plot([r["step"] for r in held], [r["held_out_loss"] for r in held], "o-", label="held-out")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title(run.name)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss_curve.png")
    plt.close(fig)
