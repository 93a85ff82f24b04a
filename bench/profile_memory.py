"""Where the fast training path's peak GPU memory goes, stage by stage, as `chatlora train` builds it.

    python bench/make_index_model.py /tmp/idx
    python bench/profile_memory.py /tmp/idx --preset lowmem

For each stage (model load, LoRA, fused pass set-up, optimizer, an eager pass, the first capture,
replays, the optimizer step) prints the memory allocated after it and the peak during it
(`torch.cuda.max_memory_allocated`, reset before each stage), then a table of the saved tensors
that one eager pass keeps for backward, by shape.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.data.dataset import dataset_for_config  # noqa: E402
from chatlora.models.load import load_model  # noqa: E402
from chatlora.models.lora import attach, trainable_parameters  # noqa: E402
from chatlora.train.gradients import choose_fused_step  # noqa: E402
from chatlora.train.packed_row import pass_shape  # noqa: E402
from chatlora.train.steps import StepPlan, micro_batches  # noqa: E402

MIB = 2 ** 20


class Stages:
    def __init__(self):
        self.rows = []

    def __call__(self, name: str, fn):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        self.rows.append((name, torch.cuda.memory_allocated() / MIB, torch.cuda.max_memory_allocated() / MIB))
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--preset", default="lowmem")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    cfg = load_config(overrides=["data.held_out_fraction=0"], flags={"model.path": args.model_dir},
                      preset=args.preset or None)
    t = cfg.train
    data = dataset_for_config(cfg)
    base, ds = data.base, data.dataset
    stage = Stages()
    model = stage("load the model (bf16)", lambda: load_model(base, cfg.model.dtype, "cuda"))
    model = stage("attach LoRA", lambda: attach(model, cfg.lora).train())
    fast = stage("fused pass set-up (weights fused, flat adapter)", lambda: choose_fused_step(model, cfg, "cuda"))
    params = [p for _, p in trainable_parameters(model)]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, fused=True)
    plan = StepPlan(len(ds.train), t.examples_per_step, t.seed)
    examples = [ds.train[i] for i in plan.indices(0)]

    saved = Counter()

    def pack_hook(x):
        saved[(tuple(x.shape), str(x.dtype).replace("torch.", ""))] += 1
        return x

    def eager():
        fast.graphs = False
        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda x: x):
            fast.accumulate(examples, t.micro_batch_examples, t.micro_batch_tokens)
        fast.graphs = True

    stage("one eager step (checkpointed)" if fast.checkpoint else "one eager step", eager)
    stage("first step, graphs (warm-up + capture)", lambda: fast.accumulate(examples, t.micro_batch_examples,
                                                                            t.micro_batch_tokens))
    stage("same step, replayed", lambda: fast.accumulate(examples, t.micro_batch_examples, t.micro_batch_tokens))
    stage("clip + optimizer step (first: state made)", lambda: (fast.clip_grad_norm_(t.max_grad_norm),
                                                                 optimizer.step()))
    for s in range(1, args.steps):
        batch = [ds.train[i] for i in plan.indices(s)]
        shapes = [pass_shape(c) for c in micro_batches(batch, t.micro_batch_examples, t.micro_batch_tokens)]
        stage(f"step {s} (pass shapes {shapes})",
              lambda: (fast.accumulate(batch, t.micro_batch_examples, t.micro_batch_tokens), optimizer.step()))

    print(f"\nsaved for backward in one eager step (top 12 by bytes; {sum(saved.values())} tensors):")
    sizes = {k: n * torch.Size(k[0]).numel() * torch.empty(0, dtype=getattr(torch, k[1])).element_size()
             for k, n in saved.items()}
    for (shape, dtype), b in sorted(sizes.items(), key=lambda kv: -kv[1])[:12]:
        print(f"{b / MIB:>9.1f} MiB  {saved[(shape, dtype)]:>5} x {dtype} {list(shape)}")
    print(f"\n{'stage':<60}{'after MiB':>11}{'peak MiB':>10}")
    for name, after, peak in stage.rows:
        print(f"{name:<60}{after:>11,.0f}{peak:>10,.0f}")


if __name__ == "__main__":
    main()
