"""A run directory is self-describing: chat, serve, merge and export need nothing else.

    RUN/
      config.yaml          the resolved configuration
      run.json             base model (as given and as resolved), family, template, stop ids, system prompt
      data_report.json     the data check of the training data
      tokenizer/           the tokenizer files the run was trained with
      metrics.jsonl        one line per optimizer step, plus held-out evaluations
      loss_curve.png       train and held-out loss
      checkpoint-<step>/   PEFT adapter + resume state (see checkpoint.py)
      final/               the finished PEFT adapter, with its resume state (the last step's checkpoint)
      status.json          running (with the training process), finished, stopped or failed (`run_status`)

`load_run(RUN)` also accepts a checkpoint directory inside a run.

    run = load_run("runs/huanhuan")
    model = load_tuned_model(run)     # base + adapter, eval mode
    ids = run.fmt.prompt(messages)
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatlora.atomic import new_directory, write_lines, write_text
from chatlora.config import Config, config_from_dict, system_prompt_for
from chatlora.errors import UserError
from chatlora.models.load import BaseModel, load_model, load_tokenizer, parameter_count, pick_dtype, prepare_base
from chatlora.models.tokenizer import TOKENIZER_FILES
from chatlora.templates import chat_format
from chatlora.train.checkpoint import MARKER, damage, latest_checkpoint

# Changing any of these would change what a resumed run computes; resuming refuses it.
RESUME_FIXED = ("model.path", "model.template", "model.quantize", "lora.r", "lora.alpha", "lora.dropout", "lora.targets",
                "lora.rslora", "lora.dora", "data.path", "data.system_prompt", "data.max_seq_tokens",
                "data.on_overlength", "data.held_out_fraction", "data.seed", "data.parse_special_tokens",
                "train.examples_per_step",
                "train.seed", "train.learning_rate", "train.schedule", "train.warmup_ratio",
                "train.weight_decay")
# These may change on resume (to extend or shorten a run); the learning-rate schedule then changes too.
RESUME_ADJUSTABLE = ("train.epochs", "train.max_steps")
# What a run directory holds: `--overwrite` replaces a directory of these only (rundir.py, checkpoint.py,
# eval); anything else in it is the user's, and is not deleted.
RUN_ENTRIES = re.compile(r"^(config\.yaml|run\.json|data_report\.json|tokenizer|metrics\.jsonl|loss_curve\.png|"
                         r"rejected\.jsonl|final|eval|checkpoint-\d+|status\.json|train\.log|trackers\.json|"
                         r"tensorboard|wandb|mlruns|swanlog|\.tmp-.*|\.old-.*|\..+\.tmp)$")


@dataclass
class Run:
    dir: Path
    cfg: Config
    info: dict  # run.json
    base: BaseModel
    tok: object
    fmt: object
    adapter: Path | None  # None: the base model alone (before the first checkpoint)

    @property
    def system_prompt(self) -> str | None:
        return self.info.get("system_prompt")

    @property
    def name(self) -> str:
        """What the run is called when served or exported: `train --name`, else its folder's name."""
        return self.info.get("name") or self.dir.name


def write_run_files(run: Path, cfg: Config, base: BaseModel, fmt, report: dict, name: str | None = None) -> str:
    """The files that make `run` self-describing (written at the start of training). `name`: what the
    run is called when served and exported (default: the name it had, else its folder's name); returns
    the name it was given."""
    run.mkdir(parents=True, exist_ok=True)
    before = json.loads((run / "run.json").read_text(encoding="utf-8")) if (run / "run.json").is_file() else {}
    write_text(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False),
               overwrite=True)
    info = {"name": name or before.get("name") or run.resolve().name, "base_model": cfg.model.path,
            "base_dir": str(base.dir), "family": base.family, "template": fmt.name, "stop_ids": fmt.stop_ids,
            "system_prompt": system_prompt_for(cfg)}
    write_text(run / "run.json", json.dumps(info, indent=2, ensure_ascii=False), overwrite=True)
    write_text(run / "data_report.json", json.dumps(report, indent=2, ensure_ascii=False), overwrite=True)
    with new_directory(run / "tokenizer", replace=True) as tmp:
        for file in TOKENIZER_FILES:
            if (base.dir / file).is_file():
                shutil.copyfile(base.dir / file, tmp / file)
    return info["name"]


def read_config(run: Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {})
    except FileNotFoundError:
        raise UserError(f"{run} is not a chatlora run directory (no config.yaml)") from None


def find_adapter(path: Path) -> tuple[Path, Path | None]:
    """(run directory, adapter directory) for a run directory or a checkpoint/final inside one."""
    if (path / "adapter_config.json").is_file() and (path.parent / "run.json").is_file():
        problem = damage(path) if (path / MARKER).is_file() else None
        if problem:
            raise UserError(f"{path} is damaged ({problem}); pick another checkpoint, or the run directory")
        return path.parent, path
    if not (path / "run.json").is_file():
        raise UserError(f"{path} is not a chatlora run directory (no run.json) nor a checkpoint in one")
    final = path / "final"
    if (final / MARKER).is_file():
        problem = damage(final)
        if problem is None:
            return path, final
        warnings.warn(f"{final} is damaged ({problem}); using the newest checkpoint before it")
    return path, latest_checkpoint(path)


def load_run(path: str | Path) -> Run:
    run, adapter = find_adapter(Path(path))
    if adapter is None:
        warnings.warn(f"{run} has no finished adapter nor a complete checkpoint yet: this is the base model "
                      f"alone")
    cfg = read_config(run)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    base = prepare_base(info["base_model"])
    tok = load_tokenizer(BaseModel(base.name, run / "tokenizer", base.family))  # the run's own copy
    fmt = chat_format(info["template"], tok, base.family, cfg.data.parse_special_tokens)
    return Run(run, cfg, info, base, tok, fmt, adapter)


def load_base_model(run: Run, device: str | None = None, dtype: str | None = None, say: bool = False):
    """The run's base model alone, in eval mode, decoding as the run's `generate` settings say. A run
    trained on a 4-bit base gets its 16-bit base (merging into 4-bit weights loses quality), unless
    that does not fit the GPU: then the 4-bit one, the adapter to be kept unmerged (`base_precision`;
    `say`: with its line, as `load_tuned_model` asks)."""
    from chatlora.decode.engine import configure

    dtype = dtype or run.cfg.model.dtype
    model = load_model(run.base, dtype, device, base_precision(run, device, dtype, say))
    configure(model, run.cfg.generate)
    return model


def base_precision(run: Run, device: str | None, dtype: str, say: bool = True) -> str:
    """How to load a run's base for using it: "none" (16 bits) or "nf4", said in a line for a run
    trained on a 4-bit base (`say=False`: not said, for the base loaded alone, as `eval` loads it
    beside the tuned model, which says it)."""
    import torch

    if run.cfg.model.quantize != "nf4":
        return "none"
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda":   # on a CPU the 16-bit base is the one to use
        need = parameter_count(run.base.dir) * pick_dtype(dtype, device).itemsize
        free = torch.cuda.mem_get_info(torch.device(device))[0]
        if need * 1.1 + 2**30 > free:
            if say:
                print(f"chatlora: {run.dir.name} was trained on a 4-bit base; its 16-bit base ({need / 2**30:.1f} "
                      f"GiB) does not fit this GPU's {free / 2**30:.1f} GiB free, so the 4-bit base runs with the "
                      f"adapter unmerged (transformers' decoding, slower)", file=sys.stderr)
            return "nf4"
    if say:
        print(f"chatlora: {run.dir.name} was trained on a 4-bit base; the adapter is applied to its 16-bit base "
              f"(merging into 4-bit weights would lose quality)", file=sys.stderr)
    return "none"


def load_tuned_model(run: Run, device: str | None = None, dtype: str | None = None):
    """Base + the run's adapter (unmerged, peft), in eval mode, decoding as the run's `generate`
    settings say."""
    from chatlora.decode.engine import configure
    from chatlora.models.lora import load_adapter

    model = load_base_model(run, device, dtype, say=run.adapter is not None)
    if run.adapter is None:
        return model
    model = load_adapter(model, run.adapter).eval()
    configure(model, run.cfg.generate)
    return model


# ---------------------------------------------------------------- written by training


def prepare_run_dir(run: Path, resume: bool, overwrite: bool, cfg: Config) -> Path | None:
    """Check the output directory of `chatlora train`; return the checkpoint to resume from (or None).
    Only a chatlora run directory (its entries all RUN_ENTRIES) may be replaced."""
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
        checkpoint = latest_checkpoint(run, with_final=True)
        if checkpoint is None and (run / "final" / MARKER).is_file():
            raise UserError(f"{run} has finished, but its final/ holds no resume state (it was written by an "
                            f"older chatlora), so it cannot be continued; start a new run (another --output)")
        return checkpoint
    if run.exists() and not run.is_dir():
        raise UserError(f"--output {run} is a file; a run is a directory. Choose another --output.")
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise UserError(f"output directory {run} is not empty. Pass --resume to continue that run, "
                            f"--overwrite to replace it, or choose another --output.")
        foreign = sorted(p.name for p in run.iterdir() if not RUN_ENTRIES.match(p.name))
        if foreign or not (run / "run.json").is_file():
            what = f"it holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}" if foreign else \
                "it has no run.json"
            raise UserError(f"--overwrite replaces chatlora run directories only, and {run} is not one ({what}). "
                            f"Nothing was deleted; choose another --output.")
        shutil.rmtree(run)
    return None


def _get(cfg: Config, key: str):
    group, name = key.split(".")
    return getattr(getattr(cfg, group), name)


class Metrics:
    """metrics.jsonl, one strict JSON object per line (a value that is not finite is written as null);
    on resume, rows after the checkpoint are dropped and a last line torn by a crash is repaired."""

    def __init__(self, path: Path, keep_through_step: int):
        rows = [r for r in read_metrics(path) if r["step"] <= keep_through_step] if path.is_file() else []
        write_lines(path, (json.dumps(r) for r in rows), overwrite=True)
        self.path, self.rows = path, rows

    def log(self, row: dict) -> None:
        row = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a torn last line (a crash mid-write) is left out with a warning,
    any other bad line is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics row")
        except ValueError:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: a torn last line (the run was stopped while writing it); "
                              f"it is left out")
                break
            raise UserError(f"{path}:{number}: not a metrics row; repair or remove that line") from None
        rows.append(row)
    return rows


def plot_losses(run: Path, rows: list[dict]) -> None:
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


STATES = ("running", "finished", "stopped", "failed", "interrupted")


def write_status(run: Path, state: str, **fields) -> None:
    """RUN/status.json: the training process's state. `running` carries its pid and host, so that a
    process that died without a word (SIGKILL, power) reads as `interrupted` (`run_status`)."""
    if state == "running":
        fields = dict(fields, pid=os.getpid(), host=socket.gethostname())
    write_text(run / "status.json", json.dumps({"state": state, "time": round(time.time(), 3), **fields}),
               overwrite=True)


def end_status(run: Path, state: str, message: str = "") -> None:
    """The end of this process's training of `run` (only if this process is the one status.json names:
    a run directory refused at start is someone else's)."""
    status = read_json_object(run / "status.json")
    if status.get("state") == "running" and status.get("pid") == os.getpid():
        write_status(run, state, step=status.get("step"), started=status.get("started"), message=message[:2000])


def run_status(run: Path) -> dict:
    """status.json as it stands: a `running` run whose process is gone on this host is `interrupted`.
    A run directory from before status files: finished when final/ is complete, else stopped."""
    status = read_json_object(run / "status.json")
    if not status:
        return {"state": "finished" if (run / "final" / MARKER).is_file() else "stopped"}
    if status.get("state") == "running" and status.get("host") == socket.gethostname():
        try:
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            status["state"] = "interrupted"
        except (PermissionError, OSError, ValueError, KeyError):
            pass
    return status


def read_json_object(path: Path) -> dict:
    """A JSON object file chatlora writes beside a run (status, launch records), or {} when it is missing
    or torn: readers of such files go on with what they know."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
