"""The one training loop, top to bottom: output -> seed -> data -> model -> adapter -> optimizer -> loop -> save.

    chatlora train --model smollm2-demo --output runs/demo --set train.max_steps=20
    chatlora train --output runs/demo --resume          # continue exactly where it stopped

Loss semantics: the loss of an optimizer step is the mean cross-entropy over every supervised token
of all its micro-batches (sum of token losses / supervised tokens of the step), so k accumulated
micro-batches give the same gradient as one batch of all their examples, and packed rows give the
same as padded ones (tests/test_train.py proves both).

Side activities are single calls guarded by a step condition: held-out loss every `eval_every`
steps (through the step's own path, gradients.py), a checkpoint every `save_every` (on a GPU
written on a thread of its own, checkpoint.CheckpointWriter). SIGINT/SIGTERM finish the current step, write a checkpoint
and exit non-zero; a non-finite loss or gradient stops the run naming the step.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from chatlora.config import Config
from chatlora.data.dataset import dataset_for_config
from chatlora.errors import UserError
from chatlora.models import native
from chatlora.models.arch import TARGETS
from chatlora.models.load import load_model, pick_dtype
from chatlora.models.lora import attach, peft_module, trainable_parameters
from chatlora.models.quantize import describe as describe_quantized
from chatlora.models.quantize import quiet_optional_imports
from chatlora.rundir import Metrics, end_status, plot_losses, prepare_run_dir, write_run_files, write_status
from chatlora.tracking import Trackers
from chatlora.train import distributed
from chatlora.train.checkpoint import (
    CheckpointWriter,
    NonFiniteError,
    check_finite,
    checkpoint_step,
    latest_checkpoint,
    load_checkpoint,
    snapshot,
    write_checkpoint,
)
from chatlora.train.flat_optimizer import FlatAdamW
from chatlora.train.gradients import (
    FusedGradients,
    PlainGradients,
    StepFigures,
    choose_fused_step,
    defers_read_back,
    native_model_reason,
)
from chatlora.train.steps import StepPlan, pack, pad, supervised_count


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


def train(cfg: Config, output: str | Path, resume: bool = False, overwrite: bool = False,
          name: str | None = None) -> Path:
    """Train a LoRA adapter as `cfg` says, into the run directory `output`; return its final/ path.
    `name`: what the run is called when served and exported (default: the folder's name).
    Launched by torchrun (WORLD_SIZE > 1), every process runs this with its share of each step."""
    ranks, device = distributed.init("cuda" if torch.cuda.is_available() else "cpu")
    # SIGTERM (how `chatlora studio` and schedulers stop a run) is noted from the start: one that
    # arrives while the data and model load stops the run after its first step, with a checkpoint,
    # instead of killing it half-made. Ctrl-C still interrupts the loading at once.
    stop_signal: list[int] = []
    term = signal.signal(signal.SIGTERM, lambda signum, frame: stop_signal.append(signum))
    try:
        final = _train(cfg, Path(output), resume, overwrite, ranks, device, name, stop_signal)
    except Interrupted as e:
        end_status(Path(output), "stopped", str(e))
        raise
    except BaseException as e:   # status.json says why, for whoever watches the run (chatlora studio)
        end_status(Path(output), "failed", str(e) or type(e).__name__)
        raise
    finally:
        signal.signal(signal.SIGTERM, term)
        distributed.shutdown(ranks)
    end_status(Path(output), "finished")
    return final


def _together(ranks, fn):
    """Run fn on every rank; if it fails with a user error on any rank, every rank stops."""
    error = None
    try:
        result = fn()
    except UserError as e:
        error, result = e, None
    if not distributed.all_ok(error is None, ranks):
        raise error or UserError("another training process stopped at start (see its message)")
    return result


def _import_model_libraries() -> None:
    """transformers' model classes and peft, imported before the model loads so that the first
    metrics row's `startup_s` tells their seconds (most of a start on a fresh machine) from the load's."""
    with quiet_optional_imports():
        import transformers
        transformers.AutoModelForCausalLM   # the lazy module imports the model classes on first access
    peft_module()


def _train(cfg: Config, run: Path, resume: bool, overwrite: bool, ranks, device: str, name: str | None,
           stop_signal: list[int]) -> Path:
    started = time.perf_counter()
    main = ranks.main
    checkpoint = _together(ranks, lambda: prepare_run_dir(run, resume, overwrite, cfg) if main else None)
    if not main and resume:
        checkpoint = latest_checkpoint(run, with_final=True)
    t = cfg.train
    torch.manual_seed(t.seed)

    def load_data():
        if main:
            (run / "rejected.jsonl").unlink(missing_ok=True)  # the run's own; rewritten by this data check
        loaded = dataset_for_config(cfg, rejects_path=run / "rejected.jsonl" if main else None)
        if not loaded.dataset.train:
            raise UserError("no training examples are left after the data check")
        return loaded
    loaded = _together(ranks, load_data)
    # seconds from the start to each point of the way to the first step (its metrics row carries them)
    startup = {"data": round(time.perf_counter() - started, 2)}
    base, tok, fmt, ds = loaded.base, loaded.tok, loaded.fmt, loaded.dataset
    if ranks.active:
        distributed.check_agreement({"configuration": json.dumps(cfg.to_dict(), sort_keys=True, default=str),
                                     "data": _digest(ds.train)}, ranks)
    if main:
        name = write_run_files(run, cfg, base, fmt, ds.report, name)
        write_status(run, "running", started=round(time.time(), 3))

    # The fused pass needs only the weights: read straight from the safetensors files, the model
    # skips transformers' and peft's imports and model building (seconds of every start)
    without_transformers = native_model_reason(base.dir, cfg, device, ranks) is None
    if not without_transformers:
        _import_model_libraries()
        startup["libraries"] = round(time.perf_counter() - started, 2)
    if device.startswith("cuda"):   # the GPU's context is made here, not inside the model's load
        torch.zeros(1, device=device).item()
    startup["device"] = round(time.perf_counter() - started, 2)
    if without_transformers:
        model = native.load(base.dir, cfg.lora, pick_dtype(cfg.model.dtype, device), device)
    else:
        model = attach(load_model(base, cfg.model.dtype, device, cfg.model.quantize), cfg.lora)
    startup["model"] = round(time.perf_counter() - started, 2)
    quantized = describe_quantized(model, TARGETS)
    if quantized and main:
        say(quantized.line())
    if t.gradient_checkpointing and not without_transformers:   # the fused pass checkpoints on its own
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    if ranks.active:  # same initial adapter on every rank (same seed), own dropout masks per rank
        torch.manual_seed(t.seed + 7919 * ranks.rank)
    sharded = ranks.active and t.distributed == "shard"
    if t.distributed == "shard" and not ranks.active:
        print("chatlora: train.distributed=shard needs several processes (--nproc N or torchrun); "
              "training one unsharded model")
    if sharded:
        distributed.shard_model(model, ranks)
    params = [p for _, p in trainable_parameters(model)]
    defer = defers_read_back(device, ranks)
    fast = None if sharded else choose_fused_step(model, cfg, device)   # its parameters: views into one tensor
    # the fused pass: its own AdamW on the one flat buffer (torch's fused kernel, without torch.optim's
    # import of torch._dynamo); elsewhere fused on a GPU: one kernel for all adapter tensors (the
    # foreach version launches per chunk of tensors). Fused AdamW skips a step on the device when
    # told the step's figures are not finite, which a deferred read-back relies on.
    settings = dict(lr=t.learning_rate, weight_decay=t.weight_decay)
    optimizer = (FlatAdamW(params, fast.net.flat, **settings) if fast else
                 torch.optim.AdamW(params, **settings, fused=device.startswith("cuda") or defer))
    # the fused pass built and the optimizer made
    startup["optimizer"] = round(time.perf_counter() - started, 2)

    plan = StepPlan(len(ds.train), t.examples_per_step, t.seed)
    total = plan.total_steps(t.epochs, t.max_steps)
    if checkpoint is not None and (checkpoint_step(checkpoint) or 0) >= total:
        say(f"{run} has finished its {checkpoint_step(checkpoint)} steps: nothing to do (raise --epochs or "
            f"--max-steps to train further)")
        return run / "final"
    start = _together(ranks, lambda: load_checkpoint(checkpoint, model, optimizer, ranks, sharded)["step"]
                      if checkpoint else 0)
    startup["ready"] = round(time.perf_counter() - started, 2)   # the first step then warms up and captures
    if resume and main:
        say(f"resuming from {checkpoint} (step {start} of {total})" if checkpoint else
            f"no complete checkpoint in {run}; starting from step 0")
    metrics = Metrics(run / "metrics.jsonl", keep_through_step=start) if main else None
    trackers = Trackers(t.report_to, run, name, cfg.to_dict(), resume_step=start) if main and t.report_to else None

    def record(row: dict) -> None:
        metrics.log(row)
        if trackers:
            trackers.log(row)
    collate = (lambda ex: pack(ex, device)) if t.packing else (lambda ex: pad(ex, tok.pad_id, device))
    stepper = FusedGradients(fast, t, ranks) if fast else PlainGradients(model, params, t, collate, ranks, sharded, device)

    def evaluate(step: int) -> None:
        if not ds.held_out:
            return
        if main or sharded:  # a sharded model runs on every rank together
            loss = stepper.held_out_loss(ds.held_out)
        if main:
            record({"step": step, "held_out_loss": loss})
            say(f"held-out loss at step {step}: {loss:.4f} ({len(ds.held_out)} examples)")
        distributed.barrier(ranks)

    def full_copies():  # sharded mode: every rank helps gather the full adapter and optimizer state
        if not sharded:
            return None, None
        adapter = distributed.full_tensors(((n, p) for n, p in model.named_parameters() if p.requires_grad), ranks)
        sd = optimizer.state_dict()
        state = {i: distributed.full_tensors(st.items(), ranks) for i, st in sd["state"].items()}
        return adapter, {"state": state, "param_groups": sd["param_groups"]}

    # On a GPU the files are written while training goes on; CPU runs write in line (they would
    # share their cores with the writer anyway, and a test's kill then lands after a whole checkpoint).
    writer = CheckpointWriter(background=device.startswith("cuda"))

    def save(done: int, name: str | None = None) -> None:
        """checkpoint-<done>, or final/ (the same contents: a finished run resumes from it), which is
        on disk when this returns, as every checkpoint before it is."""
        rng = distributed.gather_rng(ranks)
        adapter, opt = full_copies()
        if main:
            snap = snapshot(model, optimizer, rng, adapter, opt)
            state = {"epoch": done / plan.steps_per_epoch, "world_size": ranks.world}
            writer.write(partial(write_checkpoint, run, done, model, snap, state, t.keep_last, name))
            if name is not None:
                writer.wait()
        distributed.barrier(ranks)

    def report(outcome: StepOutcome) -> None:
        """A finished step's metrics row and progress, once its figures are back from the device; the
        run stops naming the step when they are not finite (its update was not applied)."""
        loss, grad_norm = outcome.figures.checked(outcome.done)
        if main:
            row = {"step": outcome.done, "epoch": round(outcome.done / plan.steps_per_epoch, 4), "loss": loss,
                   "lr": outcome.lr, "grad_norm": grad_norm, "tokens": outcome.tokens,
                   "tokens_per_s": round(outcome.tokens / outcome.seconds, 1), "elapsed_s": outcome.elapsed}
            if outcome.done == start + 1:
                row["startup_s"] = startup
            record(row)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{outcome.lr:.2e}", tok_s=f"{outcome.tokens / outcome.seconds:.0f}")
        bar.update(1)

    state = "failed"
    try:
        if start == 0 and ds.held_out:  # the base model's held-out loss: where the curve starts
            say(f"held-out loss of the base model on {len(ds.held_out)} examples...")
            evaluate(0)

        handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=total, initial=start, desc="training", unit="step", dynamic_ncols=True, disable=not main)
        pending: StepOutcome | None = None   # the previous step, its figures still on their way back
        try:
            for step in range(start, total):
                writer.check()   # a checkpoint that failed to write stops the run now, not at the end
                began = time.perf_counter()
                examples = [ds.train[i] for i in plan.indices(step)]
                mine, supervised = distributed.shard(examples, ranks), supervised_count(examples)
                lr = lr_at(step, total, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_t = stepper.backward(step, examples, mine, supervised)
                stepper.reduce()
                distributed.sum_([loss_t], ranks)
                grad_norm_t = stepper.clip_grad_norm_(t.max_grad_norm)
                if pending is not None:   # read while the device works on this step
                    report(pending)
                    pending = None
                figures = StepFigures(loss_t, grad_norm_t, defer)
                if defer:   # no host sync: a non-finite step's update is skipped on the device
                    optimizer.found_inf = figures.not_finite
                else:
                    figures.checked(step + 1)   # raises, naming the step, before any update
                optimizer.step()
                stepper.zero_grad()
                done = step + 1
                tokens = sum(len(e.input_ids) for e in examples)
                outcome = StepOutcome(done, lr, tokens, time.perf_counter() - began,
                                      round(time.perf_counter() - started, 3), figures)
                evaluating = bool(t.eval_every and done % t.eval_every == 0 and done < total)
                stopping = distributed.any_true(bool(stop_signal), ranks)
                saving = bool(t.save_every and done % t.save_every == 0) or stopping
                if defer and not (evaluating or saving or done == total):
                    pending = outcome   # reported next step; a checkpoint or evaluation waits for it
                else:
                    report(outcome)
                if evaluating:
                    evaluate(done)
                if saving:
                    save(done)
                if stopping:
                    writer.wait()   # the checkpoint the message names is on disk
                    code = 128 + (stop_signal[0] if stop_signal else signal.SIGTERM)
                    raise Interrupted(code, f"stopped by signal after step {done}; a checkpoint "
                                      f"is in {run}/checkpoint-{done}. Resume with:\n    chatlora train "
                                      f"--output {run} --resume")
            check_finite(trainable_parameters(model), "adapter weight")   # before final/ is written
            save(total, "final")
        except NonFiniteError as e:
            raise UserError(f"training stopped: {e}. No checkpoint was written for this step; lower "
                            f"train.learning_rate or set train.max_grad_norm.") from None
        finally:
            writer.join()   # a write under way finishes (its failure, if any, is the run's next error)
            bar.close()
            for s, h in handlers.items():
                signal.signal(s, h)

        evaluate(total)
        if main:
            plot_losses(run, metrics.rows)
        state = "finished"
    except Interrupted:
        state = "stopped"
        raise
    finally:   # the trackers' runs end as the training does
        if trackers:
            trackers.finish(state)
    return run / "final"


@dataclass
class StepOutcome:
    """A finished optimizer step, as its metrics row reports it."""
    done: int             # steps done after it
    lr: float
    tokens: int
    seconds: float        # host time of the step
    elapsed: float        # since the run started
    figures: StepFigures


def say(text: str) -> None:
    """A line for the person watching (rank 0 prints; tqdm's bar is kept intact)."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(f"chatlora: {text}", file=sys.stderr)


def _digest(examples) -> str:
    """What every rank must agree on about the data: the tokenized training examples, in order."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.input_ids, e.labels)).encode())
    return h.hexdigest()
