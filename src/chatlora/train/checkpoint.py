"""Checkpoints: written atomically, verified when found, resumed exactly. Safetensors and JSON only.

    RUN/checkpoint-<step>/   (and RUN/final/, the finished run's last step, in the same layout)
      adapter_config.json, adapter_model.safetensors   the PEFT adapter (peft can load it alone)
      resume_state.safetensors                          optimizer moments, RNG states
      trainer_state.json                                step, optimizer hyper-parameters, metrics
      COMPLETE                                          written last: each file's size and SHA-256

A checkpoint is assembled in a hidden temporary directory, every file flushed to disk, and renamed
into place in one step (atomic.new_directory). Its marker records what it holds, so a checkpoint
damaged later (a truncated or emptied file, a copy interrupted by hand) is recognised: the newest
checkpoint that verifies is used, and each damaged newer one is named in a warning. No tensor that
is not finite is written. On a GPU the training loop writes them on a thread of its own
(`CheckpointWriter`) from a snapshot copied off the device, so the GPU does not wait for the disk.

    write_checkpoint(run, step, model, snapshot(model, optimizer), {"epoch": 1}, keep_last=2)
    path = latest_checkpoint(run)        # None if there is none that verifies
    state = load_checkpoint(path, model, optimizer)
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from chatlora.atomic import file_sha256, new_directory
from chatlora.errors import UserError
from chatlora.models.lora import save_adapter, saved_name, set_adapter_weights
from chatlora.train.distributed import like

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


@dataclass
class Snapshot:
    """What a checkpoint holds, copied off the device: writing it reads nothing training changes."""
    adapter: dict[str, torch.Tensor]     # the trainable weights by parameter name (CPU copies)
    resume: dict[str, torch.Tensor]      # optimizer tensors, RNG states, `extra` (CPU copies)
    optimizer: dict                      # the optimizer's hyper-parameters and scalars (JSON)


def snapshot(model, optimizer, extra: dict[str, torch.Tensor] | None = None, adapter_state: dict | None = None,
             optimizer_state: dict | None = None) -> Snapshot:
    """The model's adapter weights and the optimizer's state as they are now. `extra`: more resume
    tensors (every rank's RNG states in a multi-process run); `adapter_state` and `optimizer_state`:
    full copies to take instead of the model's and optimizer's own (sharded mode)."""
    named = adapter_state.items() if adapter_state is not None else \
        ((n, p) for n, p in model.named_parameters() if p.requires_grad)
    tensors, opt_json = _optimizer_tensors(optimizer_state or optimizer.state_dict())
    resume = {**tensors, **_rng_tensors(), **(extra or {})}
    return Snapshot(host_copies({n: t.detach() for n, t in named}), host_copies(resume), opt_json)


def host_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors`, each its own. Views into one device storage (the fused pass keeps the
    adapter weights, and the flat optimizer its moments, in one tensor each) come over in one copy
    of that storage, not one small synchronous copy per view (hundreds per checkpoint)."""
    groups: dict[int, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(t.untyped_storage().data_ptr(), []).append(name)
    out = {}
    for names in groups.values():
        storage = tensors[names[0]].untyped_storage()
        used = sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if len(names) < 2 or storage.nbytes() > 2 * used:
            continue
        host = torch.empty(storage.nbytes(), dtype=torch.uint8)
        host.untyped_storage().copy_(storage)
        for n in names:
            t = tensors[n]
            out[n] = torch.empty(0, dtype=t.dtype).set_(host.untyped_storage(), t.storage_offset(), t.shape,
                                                        t.stride()).clone()
    return {n: out[n] if n in out else t.to("cpu", copy=True) for n, t in tensors.items()}


def write_checkpoint(run: Path, step: int, model, snap: Snapshot, state: dict, keep_last: int = 0,
                     name: str | None = None) -> Path:
    """Write `snap` as checkpoint-<step> (or `name`, e.g. "final") atomically; then keep only the
    newest `keep_last` checkpoints (0 = all). `model` gives the adapter's configuration only."""
    from safetensors.torch import save_file

    check_finite(snap.adapter.items(), "adapter weight")
    check_finite(snap.resume.items(), "optimizer state")
    needed = sum(t.numel() * t.element_size() for t in [*snap.adapter.values(), *snap.resume.values()])
    final = run / (name or f"checkpoint-{step}")
    with new_directory(final, replace=True, needed_bytes=needed) as tmp:
        save_adapter(model, tmp, snap.adapter)
        save_file(snap.resume, str(tmp / "resume_state.safetensors"))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "optimizer": snap.optimizer, **state},
                                                           indent=1, ensure_ascii=False))
        (tmp / MARKER).write_text(json.dumps({"files": _fingerprints(tmp)}, indent=1))
    if keep_last > 0:
        for old in complete_checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


class CheckpointWriter:
    """Writes checkpoints one at a time, on a thread of its own when `background`: the training loop
    takes a snapshot (its only wait: the copies off the GPU) and goes on while the files are written,
    checksummed and renamed into place. A failed write is raised by the next `write`, `check` or
    `wait`; `wait` before anything must be on disk (final/, a stop)."""

    def __init__(self, background: bool):
        self.background = background
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, job) -> None:
        self.wait()
        if not self.background:
            job()
            return
        self._thread = threading.Thread(target=self._run, args=(job,), name="chatlora-checkpoint")
        self._thread.start()

    def _run(self, job) -> None:
        try:
            job()
        except BaseException as e:   # raised on the training thread by check() / wait()
            self._error = e

    def check(self) -> None:
        """Raise a finished write's failure, without waiting for one under way."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def join(self) -> None:
        """Let a write under way finish; its failure stays for `check`."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def wait(self) -> None:
        self.join()
        self.check()


def _fingerprints(directory: Path) -> dict[str, dict]:
    return {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
            for p in sorted(directory.iterdir()) if p.is_file() and p.name != MARKER}


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint `path` (None: it verifies). A marker from before sizes and
    checksums were recorded ("ok") is checked for its files being there and readable."""
    marker = path / MARKER
    if not marker.is_file():
        return "no COMPLETE marker (it was being written)"
    try:
        recorded = json.loads(marker.read_text()).get("files")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        recorded = None
    if recorded is None:   # an older marker: the files must at least be there and parse
        return _readable(path)
    for name, want in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, {want['bytes']} were written"
        if file_sha256(file) != want["sha256"]:
            return f"{name} does not hold what was written (checksum)"
    return None


def _readable(path: Path) -> str | None:
    from safetensors import safe_open

    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (path / name).is_file():
            return f"{name} is missing"
    for file in path.iterdir():
        try:
            if file.suffix == ".json":
                json.loads(file.read_text(encoding="utf-8"))
            elif file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as f:
                    f.keys()
        except Exception as e:   # noqa: BLE001 - any parse failure means a damaged file
            return f"{file.name} cannot be read ({type(e).__name__})"
    return None


def complete_checkpoints(run: Path) -> list[Path]:
    """checkpoint-<step> directories with a COMPLETE marker, oldest first (not verified)."""
    found = []
    for p in run.glob("checkpoint-*"):
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def checkpoint_step(path: Path) -> int | None:
    """The optimizer steps done at a checkpoint (final/ included), from its trainer_state.json."""
    try:
        return int(json.loads((path / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run: Path, with_final: bool = False) -> Path | None:
    """The newest checkpoint that verifies; each damaged newer one is named in a warning.
    `with_final`: final/ counts as the checkpoint of its step (a finished run resumes from it)."""
    candidates = [(int(_NAME.match(p.name).group(1)), 0, p) for p in complete_checkpoints(run)]
    final = run / "final"
    if with_final and (final / MARKER).is_file() and (final / "trainer_state.json").is_file():
        candidates.append((checkpoint_step(final) or 0, 1, final))
    for _, _, path in sorted(candidates, reverse=True):
        problem = damage(path)
        if problem is None:
            return path
        warnings.warn(f"{path} is damaged ({problem}); using the checkpoint before it")
    return None


def load_checkpoint(path: Path, model, optimizer, ranks=None, sharded: bool = False) -> dict:
    """Restore adapter weights, optimizer and RNG states (this rank's) from `path`; return its
    trainer_state. A run resumes with the number of processes it was written with."""
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
                    p.copy_(like(adapter[saved_name(name)], p))
    else:
        set_adapter_weights(model, adapter, str(path))
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
