"""Checkpoints: written atomically, found safely, resumed exactly. Safetensors and JSON only.

    RUN/checkpoint-<step>/
      adapter_config.json, adapter_model.safetensors   the PEFT adapter (peft can load it alone)
      resume_state.safetensors                          optimizer moments, RNG states
      trainer_state.json                                step, optimizer hyper-parameters, metrics
      COMPLETE                                          written last: a checkpoint without it is torn

A checkpoint is assembled in a hidden temporary directory and renamed into place in one step; the
marker makes even a copy interrupted by hand detectable. No tensor that is not finite is written.

    save_checkpoint(run, step, model, optimizer, {"epoch": 1}, keep_last=2)
    path = latest_checkpoint(run)        # None if there is none
    state = load_checkpoint(path, model, optimizer)
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from chatlora.distributed import like
from chatlora.errors import UserError
from chatlora.lora import save_adapter

MARKER = "COMPLETE"
_NAME = re.compile(r"^checkpoint-(\d+)$")


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight became NaN or infinite."""


def _optimizer_tensors(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = state
    return tensors


def check_finite(named_tensors, what: str) -> None:
    for name, t in named_tensors:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NonFiniteError(f"{what} {name} holds NaN or infinite values")


def save_checkpoint(run: Path, step: int, model, optimizer, state: dict, keep_last: int = 0,
                    extra: dict[str, torch.Tensor] | None = None, adapter_state: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write checkpoint-<step> atomically; then keep only the newest `keep_last` (0 = all).
    `extra`: more resume tensors (every rank's RNG states in a multi-process run); `adapter_state`
    and `optimizer_state`: full copies to write instead of the model's and optimizer's own (sharded mode)."""
    from safetensors.torch import save_file

    trainable = list(adapter_state.items()) if adapter_state is not None else \
        [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    check_finite(trainable, "adapter weight")
    tensors, opt_json = _optimizer_tensors(optimizer_state or optimizer.state_dict())
    check_finite(tensors.items(), "optimizer state")
    final = run / f"checkpoint-{step}"
    tmp = run / f".tmp-checkpoint-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, adapter_state)
    save_file({**tensors, **_rng_tensors(), **(extra or {})}, str(tmp / "resume_state.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer": opt_json, **state},
                                                       indent=1, ensure_ascii=False))
    (tmp / MARKER).write_text("ok\n")
    if final.exists():  # a torn leftover of an earlier attempt at this very step
        shutil.rmtree(final)
    os.replace(tmp, final)
    if keep_last > 0:
        for old in complete_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first; torn ones (no COMPLETE marker) are never listed."""
    found = []
    for p in run.glob("checkpoint-*"):
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run: Path) -> Path | None:
    found = complete_checkpoints(run)
    return found[-1] if found else None


def load_checkpoint(path: Path, model, optimizer, ranks=None, sharded: bool = False) -> dict:
    """Restore adapter weights, optimizer and RNG states (this rank's) from `path`; return its
    trainer_state. A run resumes with the number of processes it was written with."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    world = ranks.world if ranks else 1
    if state.get("world_size", 1) != world:
        raise UserError(f"{path} was written by {state.get('world_size', 1)} training process(es); resume it "
                        f"with the same number (this run has {world}): the data split depends on it")
    adapter = load_file(str(path / "adapter_model.safetensors"))
    params = [p for p in model.parameters() if p.requires_grad]
    if sharded:  # full tensors from the file, laid out as each rank's shards
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(like(adapter[name.replace(".default.", ".")], p))
    else:
        result = set_peft_model_state_dict(model, adapter)
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{path}: adapter weights do not fit the model: {result.unexpected_keys[:3]}")
    tensors = load_file(str(path / "resume_state.safetensors"))
    opt_json = state["optimizer"]
    opt_state: dict = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, idx, name = key.split(".", 2)
            if sharded and value.shape == params[int(idx)].shape:
                value = like(value, params[int(idx)])
            opt_state.setdefault(int(idx), {})[name] = value
    for key, value in opt_json["scalars"].items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": opt_state, "param_groups": opt_json["param_groups"]})
    if ranks is not None and ranks.active:
        torch.set_rng_state(tensors[f"rng.rank{ranks.rank}.cpu"])
        if torch.cuda.is_available() and f"rng.rank{ranks.rank}.cuda" in tensors:
            torch.cuda.set_rng_state(tensors[f"rng.rank{ranks.rank}.cuda"])
        return state
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    return state
