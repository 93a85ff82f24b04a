"""An optimizer step's gradient work, behind one interface for the training loop (loop.py): on the
peft model itself (`PlainGradients`, over `accumulate_gradients`) or through the fused pass
(`FusedGradients`, over fused_step.FusedStep; `choose_fused_step` says which applies): this rank's backward,
the sum across ranks, clipping, zeroing, the held-out loss. Then the step's loss and gradient norm
on their way back to the host (`StepFigures`): at once, or on one GPU while the next step runs
(`defers_read_back`).
"""

from __future__ import annotations

import math
import os

import torch

from chatlora.config import Config
from chatlora.errors import UserError
from chatlora.models import native, triton_kernels
from chatlora.train import distributed
from chatlora.train.checkpoint import NonFiniteError
from chatlora.train.distributed import Ranks
from chatlora.train.fused import adapter_reason, unsupported_reason
from chatlora.train.fused_step import FusedStep
from chatlora.train.steps import held_out_loss, loss_sum, micro_batches, supervised_count

# Kernels every fused training pass on a GPU compiles (train/kernels.py, lora_kernels.py): none in
# Triton's cache means a first run on this machine (or Triton version), which compiles them all.
KERNELS = ("_rms_norm_backward_kernel", "_silu_mul_backward_kernel", "_a_grad")


def accumulate_gradients(model, examples, micro_batch_examples: int, collate,
                         micro_batch_tokens: int | None = None, supervised: int | None = None,
                         grad_scale: float = 1.0) -> torch.Tensor:
    """Backward over one optimizer step's examples, micro-batch by micro-batch, each micro-batch's
    token-loss sum divided by the supervised tokens of the WHOLE step (`supervised`: of all ranks'
    examples when several processes share the step): the gradients equal those of one batch holding
    every example. `grad_scale` multiplies the gradients only (sharded mode: FSDP averages over
    ranks). Returns the step's loss (0-d, no host sync)."""
    supervised = supervised or supervised_count(examples)
    total = torch.zeros((), device=next(model.parameters()).device)
    for chunk in micro_batches(examples, micro_batch_examples, micro_batch_tokens):
        part = loss_sum(model, collate(chunk)) / supervised
        (part * grad_scale if grad_scale != 1.0 else part).backward()
        total = total + part.detach()
    return total


class PlainGradients:
    """An optimizer step's gradient work on the peft model itself: this rank's backward, the sum
    across ranks, clipping, zeroing. `FusedGradients` does the same for the fused pass, so the training
    loop has one path."""

    def __init__(self, model, params, t, collate, ranks: Ranks, sharded: bool, device: str):
        self.model, self.params, self.t, self.collate, self.device = model, params, t, collate, device
        self.ranks, self.sharded = ranks, sharded
        self.tokens = t.micro_batch_tokens if t.packing else None

    def backward(self, step: int, examples, mine, supervised: int) -> torch.Tensor:
        t, world = self.t, self.ranks.world
        loss = accumulate_gradients(self.model, mine, t.micro_batch_examples, self.collate, self.tokens,
                                    supervised, world if self.sharded else 1.0)
        if self.sharded:  # every rank runs as many passes as the busiest one (FSDP gathers layers together)
            passes = lambda part: len(micro_batches(part, t.micro_batch_examples, self.tokens))  # noqa: E731
            busiest = max(passes(distributed.shard(examples, Ranks(r, world))) for r in range(world))
            for _ in range(busiest - passes(mine)):
                (loss_sum(self.model, self.collate(examples[:1])) * 0.0).backward()
        return loss

    def reduce(self) -> None:
        if not self.sharded:  # FSDP has already reduced them
            distributed.sum_gradients(self.params, self.ranks)

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm or float("inf"))
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def held_out_loss(self, examples) -> float | None:
        t = self.t
        return held_out_loss(self.model, examples, t.micro_batch_examples, self.device, t.micro_batch_tokens)


class FusedGradients:
    """`PlainGradients`' interface over the fused pass (`fused_step.FusedStep`)."""

    def __init__(self, fast: FusedStep, t, ranks: Ranks):
        self.fast, self.t, self.ranks = fast, t, ranks

    def backward(self, step: int, examples, mine, supervised: int) -> torch.Tensor:
        return self.fast.accumulate(mine, self.t.micro_batch_examples, self.t.micro_batch_tokens, supervised)

    def reduce(self) -> None:
        distributed.sum_([self.fast.net.flat.grad], self.ranks)

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        return self.fast.clip_grad_norm_(max_norm)

    def zero_grad(self) -> None:  # zeroed, not freed: the captured passes write into this buffer
        self.fast.zero_grad()

    def held_out_loss(self, examples) -> float | None:
        """Through the fused forward pass (eager, no dropout): the plain model's value, faster."""
        if not examples:
            return None
        t = self.t
        return self.fast.held_out_loss_sum(examples, t.micro_batch_examples, t.micro_batch_tokens).item() / \
            supervised_count(examples)


def fused_mode(t, device: str) -> str:
    """What `train.fast_path` asks for on `device`: "graphs", "eager" or "plain"."""
    if t.fast_path == "auto":
        return "graphs" if device.startswith("cuda") else "plain"
    return t.fast_path


def native_model_reason(base_dir, cfg: Config, device: str, ranks: Ranks) -> str | None:
    """None when the run can build its model without transformers and peft (models/native.py): one
    process on the fused pass, a 16-bit base the module reads exactly. Else why not (the run then
    loads through transformers and peft, the same model and adapters)."""
    if os.environ.get("CHATLORA_NATIVE_MODEL") == "0":
        return "CHATLORA_NATIVE_MODEL=0"
    if ranks.active:
        return "several processes"
    if fused_mode(cfg.train, device) == "plain" or not cfg.train.packing:
        return "the plain peft path"
    if cfg.model.quantize != "none":
        return "a 4-bit base"
    return adapter_reason(cfg.lora) or native.unsupported_reason(base_dir)


def choose_fused_step(model, cfg: Config, device: str) -> FusedStep | None:
    """The fused training pass when `train.fast_path` asks for it and the model allows it, else None."""
    t = cfg.train
    mode = fused_mode(t, device)
    if mode == "plain":
        return None
    reason = unsupported_reason(model, cfg.lora) or (None if t.packing else "train.packing is off")
    if reason is None and mode == "graphs" and not device.startswith("cuda"):
        reason = "CUDA graphs need a GPU"
    if reason:
        if t.fast_path != "auto":   # asked for by name (graphs on a CPU, say): the user's to change
            raise UserError(f"train.fast_path={t.fast_path} is not available: {reason}")
        if isinstance(model, native.NativeLoraModel):   # native_model_reason admits no such run
            raise RuntimeError(f"the model built without transformers cannot train on the plain path ({reason})")
        print(f"chatlora: the fast training path does not cover this run ({reason}); using the plain peft model")
        return None
    step = FusedStep(model, device, graphs=mode == "graphs", checkpoint=t.gradient_checkpointing)
    step.zero_grad()
    if step.device.type == "cuda" and triton_kernels.enabled(step.device) and not triton_kernels.in_cache(KERNELS):
        print("chatlora: compiling the training kernels for this GPU before the first step (once: later runs "
              "reuse them)")
    return step


def defers_read_back(device: str, ranks: Ranks) -> bool:
    """Whether a step's loss and gradient norm come back to the host while the next step runs (one GPU):
    the device then never waits for the host between steps. With several processes every rank
    agrees on each step's figures at once instead."""
    return device.startswith("cuda") and not ranks.active


class StepFigures:
    """A step's loss and gradient norm on their way to the host: read back at once, or (`defer`)
    copied into pinned memory behind the step's work, with a device-side flag for the optimizer."""

    def __init__(self, loss: torch.Tensor, grad_norm: torch.Tensor, defer: bool):
        both = torch.stack([loss.detach().float().reshape(()), grad_norm.detach().float().reshape(())])
        self.ready = None
        if defer:
            self.not_finite = (~torch.isfinite(both).all()).float()   # fused AdamW's found_inf
            self.host = torch.empty(2, dtype=torch.float32, pin_memory=both.is_cuda)
            self.host.copy_(both, non_blocking=True)
            if both.is_cuda:
                self.ready = torch.cuda.Event()
                self.ready.record()
        else:
            self.host = both.cpu()

    def checked(self, done: int) -> tuple[float, float]:
        """(loss, gradient norm) of the step that made `done` steps; NonFiniteError naming it if
        either is NaN or infinite."""
        if self.ready is not None:
            self.ready.synchronize()   # this step's figures only: later queued work runs on
        loss, grad_norm = self.host.tolist()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise NonFiniteError(f"step {done}: loss {loss}, gradient norm {grad_norm}")
        return loss, grad_norm
