"""Where one optimizer step of `chatlora train` spends its time (torch.profiler), and variants.

    python bench/profile_step.py MODEL_DIR [--compile-only]

Times the self-llm job's optimizer step (16 examples, 4 micro-batches) in variants that isolate one
cost each, then prints the profiler's top operators for the default path.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.data.dataset import dataset_for_config  # noqa: E402
from chatlora.models.load import load_model  # noqa: E402
from chatlora.models.lora import attach, trainable_parameters  # noqa: E402
from chatlora.train.gradients import accumulate_gradients  # noqa: E402
from chatlora.train.steps import StepPlan, pack, pad  # noqa: E402


def timed(fn, steps=6, warmup=2):
    out = []
    for i in range(warmup + steps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out[warmup:])


def main():
    cfg = load_config(overrides=["data.held_out_fraction=0"], flags={"model.path": sys.argv[1]})
    data = dataset_for_config(cfg)
    base, ds = data.base, data.dataset
    model = attach(load_model(base, "bfloat16", "cuda"), cfg.lora).train()
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    plan = StepPlan(len(ds.train), 16, 42)

    def step(i, collate, micro=4, net=None):
        ex = [ds.train[j] for j in plan.indices(i)]
        accumulate_gradients(model if net is None else net, ex, micro, collate)
        torch.nn.utils.clip_grad_norm_(params, float("inf"))
        opt.step()
        opt.zero_grad(set_to_none=True)

    variants = {
        "packed, 4 micro-batches (default)": lambda i: step(i, lambda ex: pack(ex, "cuda")),
        "packed, 1 micro-batch of 16": lambda i: step(i, lambda ex: pack(ex, "cuda"), 16),
        "padded, 4 micro-batches": lambda i: step(i, lambda ex: pad(ex, 0, "cuda")),
        "forward only, packed x4": lambda i: [model(**{k: v for k, v in pack(c, "cuda").items() if k != "targets"},
                                                     use_cache=False) for c in
                                               [[ds.train[j] for j in plan.indices(i)][k:k + 4] for k in range(0, 16, 4)]],
    }
    only_compile = "--compile-only" in sys.argv
    rows = [] if only_compile else [(name, timed(fn)) for name, fn in variants.items()]
    try:  # torch.compile over the whole model, dynamic shapes (packed rows vary in length)
        compiled = torch.compile(model, dynamic=True)
        t0 = time.perf_counter()
        step(0, lambda ex: pack(ex, "cuda"), 16, compiled)
        torch.cuda.synchronize()
        print(f"torch.compile first step (compile included): {time.perf_counter() - t0:.1f} s")
        rows.append(("packed, 1 x 16, torch.compile", timed(lambda i: step(i, lambda ex: pack(ex, "cuda"), 16,
                                                                            compiled))))
    except Exception as e:  # report, do not hide: the table says it failed
        print(f"torch.compile failed: {type(e).__name__}: {str(e)[:300]}")
    from torch.profiler import ProfilerActivity, profile

    if only_compile:
        variants = {}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(2):
            step(i, lambda ex: pack(ex, "cuda"))
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))
    tokens = statistics.mean(sum(len(ds.train[j].input_ids) for j in plan.indices(i)) for i in range(8))
    print(f"\n{'variant':<40}{'s/step':>9}{'tokens/s':>10}")
    for name, s in rows:
        print(f"{name:<40}{s:>9.3f}{tokens / s:>10.0f}")


if __name__ == "__main__":
    main()
