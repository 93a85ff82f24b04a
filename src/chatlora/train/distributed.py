"""Data-parallel training over processes launched by torchrun (PyTorch's own distributed engine).

    torchrun --nproc-per-node 2 -m chatlora train --output runs/x     # or: chatlora train --nproc 2 ...

Every rank builds the same step plan; rank r trains on the r-th contiguous block of each optimizer
step's examples, divides its token-loss sum by the supervised tokens of the WHOLE step (all ranks), and the
gradients are summed across ranks: the update equals one process training on all the step's examples
(tests/test_distributed.py, CPU/gloo: with micro-batches of one block, per-step losses and the final
adapter are bit-identical to one process; otherwise they differ by float rounding only). Rank 0 alone
logs, evaluates and writes; checkpoints hold every rank's RNG state, so a resumed run continues
exactly. Ranks that disagree on configuration or data stop at start with the difference named.

Backends: NCCL on GPUs (one GPU per rank, LOCAL_RANK), gloo on CPU. Multi-node: the same command on
every node with torchrun's --nnodes/--node-rank/--rdzv-endpoint.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chatlora.errors import UserError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str) -> tuple[Ranks, str]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); returns the ranks and the
    device this rank trains on."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size()), device


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()


def shard(examples: list, ranks: Ranks) -> list:
    """This rank's share of one optimizer step's examples: a contiguous block, so that with
    micro-batches of one block each a single process computes exactly the same passes."""
    size = -(-len(examples) // ranks.world)
    return examples[ranks.rank * size:(ranks.rank + 1) * size]


def _device_of(ranks: Ranks) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_ok(ok: bool, ranks: Ranks) -> bool:
    """True when every rank says ok (a rank that failed must not leave the others waiting)."""
    return _flag(ok, dist.ReduceOp.MIN, ranks)


def any_true(value: bool, ranks: Ranks) -> bool:
    return _flag(value, dist.ReduceOp.MAX, ranks)


def _flag(value: bool, op, ranks: Ranks) -> bool:
    if not ranks.active:
        return value
    flag = torch.tensor([1 if value else 0], device=_device_of(ranks))
    dist.all_reduce(flag, op=op)
    return bool(flag.item())


def sum_(tensors: list[torch.Tensor], ranks: Ranks) -> None:
    """Sum tensors across ranks in place, as one flat message."""
    if not ranks.active or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    start = 0
    for t in tensors:
        t.copy_(flat[start:start + t.numel()].view_as(t))
        start += t.numel()


def sum_gradients(params, ranks: Ranks) -> None:
    """Sum the parameters' gradients across ranks (a rank without examples this step contributes zeros)."""
    if not ranks.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    sum_([p.grad for p in params], ranks)


def check_agreement(parts: dict[str, str], ranks: Ranks) -> None:
    """Every rank must have the same configuration and data: compare digests of each part."""
    if not ranks.active:
        return
    device = _device_of(ranks)
    mine = torch.tensor([list(hashlib.sha256(v.encode()).digest()) for v in parts.values()],
                        dtype=torch.uint8, device=device)
    gathered = [torch.empty_like(mine) for _ in range(ranks.world)]
    dist.all_gather(gathered, mine)
    problems = []
    for i, name in enumerate(parts):
        differing = [r for r in range(ranks.world) if not torch.equal(gathered[r][i], gathered[0][i])]
        if differing:
            problems.append(f"{name} differs between rank 0 and rank(s) {differing}")
    if problems:
        raise UserError("the training processes disagree: " + "; ".join(problems)
                        + ". Every rank must see the same configuration and the same data files.")


def gather_rng(ranks: Ranks) -> dict[str, torch.Tensor]:
    """Every rank's RNG states, for rank 0's checkpoint (keys rng.rank<R>.cpu / .cuda)."""
    if not ranks.active:
        return {}
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    out = {}
    device = _device_of(ranks)
    for kind, state in states.items():
        gathered = [torch.empty_like(state, device=device) for _ in range(ranks.world)]
        dist.all_gather(gathered, state.to(device))
        out.update({f"rng.rank{r}.{kind}": g.cpu() for r, g in enumerate(gathered)})
    return out


def shard_model(model, ranks: Ranks) -> None:
    """Sharded mode (FSDP2): each decoder layer's weights, frozen and trainable, are split across the
    ranks and gathered only while the layer runs. FSDP averages gradients over the ranks; the training
    loop multiplies each rank's loss by the number of ranks (exact in binary floating point), so the
    update is the sum, as the loss is already divided by the supervised tokens of the whole step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    lm = model.get_base_model()
    if lm.get_output_embeddings().weight is lm.get_input_embeddings().weight:
        raise UserError("train.distributed=shard does not support models whose output head shares the "
                        "embedding weights (tied embeddings); use train.distributed=replicate")
    dtype = lm.model.embed_tokens.weight.dtype
    # Frozen low-precision weights and fp32 adapters in one layer: gather everything in the model's
    # dtype (the adapters' fp32 copies stay the optimizer's), reduce gradients in fp32.
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in lm.model.layers:
        fully_shard(layer, mp_policy=policy)
    # the decoder and the head are called on their own (the loss projects supervised positions only)
    fully_shard(lm.model, mp_policy=policy)
    fully_shard(lm.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def full_tensors(named, ranks: Ranks) -> dict:
    """Plain (unsharded) copies of possibly sharded tensors, on CPU; every rank must call this."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in named}


def like(full: torch.Tensor, target):
    """`full` laid out as `target` (sharded like it when it is a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        return distribute_tensor(full.to(target.device, target.dtype), target.device_mesh, target.placements)
    return full.to(target.device, target.dtype)


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        dist.barrier()
