"""Launch settings of the fused pass's Triton kernels, timed where they run: inside the captured pass.

    python bench/pass_sweep.py MODEL_DIR [--steps 3] [--json out.json]

bench/lora_kernel_tiles.py times each LoRA kernel alone, and its winners ran 7% slower inside the
training pass (bench/NOTES.md, 2026-11-30). Here the self-llm job's first `--steps` steps (16
examples, bf16, dropout 0.1) are captured as the training loop captures them, once per setting,
and each step's captured pass is replayed 30 times (profile_fast.median_ms; the median, summed over the
steps): first the current settings, then each alternative in `ALTERNATIVES` alone (one kernel's
launch changed, the rest current), then torch's flash kernel in place of the packed-row attention
kernel, then the current settings again (the run's drift). Each setting's first replayed loss is
printed beside its time, from the same generator state, as a check that it computes the same
pass. A launch too large for the GPU's shared memory is reported and left out (the attention kernels
would otherwise run it with a smaller one). On a GPU.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from profile_fast import median_ms  # noqa: E402

from chatlora.config import load_config  # noqa: E402
from chatlora.data.dataset import dataset_for_config  # noqa: E402
from chatlora.models.load import load_model  # noqa: E402
from chatlora.models.lora import attach  # noqa: E402
from chatlora.train import attention_kernels, lora_kernels  # noqa: E402
from chatlora.train.fused_step import FusedStep, GraphKey  # noqa: E402
from chatlora.train.packed_row import pass_shape  # noqa: E402
from chatlora.train.steps import StepPlan  # noqa: E402

TABLES = {"attention": attention_kernels.LAUNCH, **{name: lora_kernels.LAUNCH[name] for name in lora_kernels.LAUNCH}}
ALTERNATIVES = {   # a kernel -> launches to try in its place (bench/lora_kernel_tiles.py's winners among them)
    "attention": [dict(BM=32, BN=32, num_warps=4), dict(BM=64, BN=32, num_warps=4), dict(BM=32, BN=64, num_warps=4),
                  dict(BM=64, BN=64, num_warps=8), dict(BM=64, BN=16, num_warps=4), dict(BM=128, BN=32, num_warps=4),
                  dict(BM=128, BN=64, num_warps=8)],
    "a_forward": [dict(BT=32, BK=128, SPAN=512, num_warps=2), dict(BT=16, BK=128, SPAN=512, num_warps=4),
                  dict(BT=16, BK=64, SPAN=1024, num_warps=4)],
    "a_grad": [dict(BT=16, BK=128, SPLIT=64, num_warps=8), dict(BT=16, BK=64, SPLIT=64, num_warps=4),
               dict(BT=16, BK=64, SPLIT=256, num_warps=4)],
    "x_grad": [dict(BT=32, BK=128, num_warps=4), dict(BT=32, BK=64, num_warps=4), dict(BT=16, BK=128, num_warps=4)],
    "b_forward": [dict(BT=32, BC=128, num_warps=4), dict(BT=32, BC=64, num_warps=4), dict(BT=64, BC=128, num_warps=8)],
    "b_grad": [dict(BT=16, BC=64, SPAN=512, num_warps=4), dict(BT=32, BC=128, SPAN=512, num_warps=4),
               dict(BT=32, BC=64, SPAN=1024, num_warps=4)],
}


def measure(fast: FusedStep, steps) -> tuple[float, float]:
    """(the steps' captured passes' replay ms, summed; the first step's loss at its first replay)."""
    fast._captured.clear()     # capture again with the settings now in the tables
    fast._eager_passes.clear()
    total, loss = 0.0, None
    for examples in steps:
        torch.manual_seed(0)
        fast.zero_grad()
        value = fast.accumulate(examples, 16, 2048).item()
        loss = value if loss is None else loss
        total += median_ms(fast._captured[GraphKey(pass_shape(examples), backward=True)].graph.replay, 30)
    return total, loss


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    cfg = load_config(overrides=["data.held_out_fraction=0"], flags={"model.path": args.model})
    data = dataset_for_config(cfg)
    model = attach(load_model(data.base, "bfloat16", "cuda"), cfg.lora).train()
    plan = StepPlan(len(data.dataset.train), 16, 42)
    steps = [[data.dataset.train[j] for j in plan.indices(i)] for i in range(args.steps)]
    tokens = sum(len(e.input_ids) for ex in steps for e in ex)
    fast = FusedStep(model, "cuda", graphs=True, capture_at_use=1)

    rows = []

    def record(kernel, launch, label=None):
        attention_kernels.too_large.clear()
        try:
            ms, loss = measure(fast, steps)
        except triton.runtime.errors.OutOfResources as error:   # a launch too large for this GPU
            print(f"{kernel:<10} {label or json.dumps(launch):<58} does not fit: {error}", flush=True)
            return
        if attention_kernels.too_large:   # the attention kernels ran with a smaller launch than this one
            print(f"{kernel:<10} {label or json.dumps(launch):<58} does not fit: "
                  f"{sorted(entry[0] for entry in attention_kernels.too_large)}", flush=True)
            return
        rows.append(dict(kernel=kernel, launch=launch, label=label, ms=ms, loss=loss, tokens_per_s=tokens / ms * 1e3))
        print(f"{kernel:<10} {label or json.dumps(launch):<58} {ms:8.2f} ms  {tokens / ms * 1e3:8.0f} tok/s  "
              f"loss {loss:.5f}", flush=True)

    record("current", None, "current settings")
    for kernel, launches in ALTERNATIVES.items():
        table, before = TABLES[kernel], dict(TABLES[kernel])
        for launch in launches:
            if launch == before:
                continue
            table.clear()
            table.update(launch)
            record(kernel, launch)
        table.clear()
        table.update(before)
    fast.net.attention_kernel = False
    record("attention", None, "torch's flash kernel")
    fast.net.attention_kernel = True
    record("current", None, "current settings again")

    base = statistics.mean(r["ms"] for r in rows if r["kernel"] == "current")
    print(f"\n{'kernel':<10} {'launch':<58} {'ms':>8} {'x current':>10}")
    for r in sorted(rows, key=lambda r: r["ms"]):
        print(f"{r['kernel']:<10} {r['label'] or json.dumps(r['launch']):<58} {r['ms']:8.2f} {base / r['ms']:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(model=args.model, steps=args.steps, tokens=tokens, rows=rows),
                                              indent=1))


if __name__ == "__main__":
    main()
