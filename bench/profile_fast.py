"""Where the fast path's optimizer step spends its time.

    python bench/profile_fast.py MODEL_DIR [--mask-attention]

Times, for the self-llm job's steps (16 examples in passes of at most train.micro_batch_tokens: one
packed row at the Index shape, two where a step's tokens do not fit one; CUDA graphs): the step's
first captured pass alone (device events around `replay`), the host work before it (row building, copy), clipping + AdamW, and
the whole step as `chatlora train` runs it; then lists the CUDA kernels of one eager fused pass by
GPU kernel time (the same kernels the graph replays), with their count.
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
from chatlora.train.flat_optimizer import FlatAdamW  # noqa: E402
from chatlora.train.fused_step import FusedStep, GraphKey  # noqa: E402
from chatlora.train.packed_row import host_row, pass_shape  # noqa: E402
from chatlora.train.steps import StepPlan, micro_batches  # noqa: E402


def median_ms(fn, n=20):
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def kernel_ms(fn, n=1):
    """(ms of GPU kernel time per call of `fn`, summed over its CUDA kernels without the gaps between
    launches; kernels per call; the profile)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    return sum(e.self_device_time_total for e in events) / 1e3 / n, round(sum(e.count for e in events) / n), prof


def main():
    cfg = load_config(overrides=["data.held_out_fraction=0"], flags={"model.path": sys.argv[1]})
    data = dataset_for_config(cfg)
    base, ds = data.base, data.dataset
    model = attach(load_model(base, "bfloat16", "cuda"), cfg.lora).train()
    params = [p for _, p in trainable_parameters(model)]
    plan = StepPlan(len(ds.train), 16, 42)
    fast = FusedStep(model, "cuda", graphs=True, capture_at_use=1)   # every shape captured on its first pass
    opt = FlatAdamW(params, fast.net.flat, lr=1e-4)   # as the training loop steps it
    fast.net.flash = "--mask-attention" not in sys.argv   # the block-diagonal mask instead of flash attention
    steps = [[ds.train[j] for j in plan.indices(i)] for i in range(40)]
    per_pass, max_tokens = cfg.train.micro_batch_examples, cfg.train.micro_batch_tokens   # the job's passes
    for ex in steps:  # capture every bucket these steps need
        fast.zero_grad()
        fast.accumulate(ex, per_pass, max_tokens)
    torch.cuda.synchronize()
    tokens = statistics.mean(sum(len(e.input_ids) for e in ex) for ex in steps)

    ex = steps[0]
    passes = micro_batches(ex, per_pass, max_tokens)   # a step of a long-token vocabulary may take two
    shape = pass_shape(passes[0])
    captured = fast._captured[GraphKey(shape, backward=True)]
    replay = median_ms(captured.graph.replay)
    t0 = time.perf_counter()
    for _ in range(20):
        row = host_row(passes[0], shape)
        captured.row.copy_(row.pin_memory(), non_blocking=True)
    host = (time.perf_counter() - t0) / 20 * 1e3

    def optimizer():
        fast.clip_grad_norm_(1.0)
        opt.step()
        fast.zero_grad()
    opt_ms = median_ms(optimizer)
    t0 = time.perf_counter()
    for _ in range(5):
        optimizer()
    torch.cuda.synchronize()
    opt_wall = (time.perf_counter() - t0) / 5 * 1e3

    def whole(i=[0]):   # no host sync: the loop reads a step's figures back while the next one runs
        fast.accumulate(steps[i[0] % 40], per_pass, max_tokens)
        fast.clip_grad_norm_(1.0)
        opt.step()
        fast.zero_grad()
        i[0] += 1
    for _ in range(5):
        whole()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(40):
        whole()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) / 40 * 1e3

    fast.graphs = False
    device_ms, kernels, prof = kernel_ms(lambda: fast.accumulate(ex, per_pass, max_tokens))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=150))
    print(f"\n{len(passes)} pass(es) in the first step; its first: bucket {shape.tokens} tokens / {shape.supervised} "
          f"supervised; {sum(len(e.input_ids) for e in ex)} real tokens in the step; mean {tokens:.0f} tokens per step")
    print(f"{'part':<52}{'ms':>8}")
    for name, ms in (("captured first pass, replay (device events)", replay),
                     ("host: build row + pinned copy", host),
                     ("clip + AdamW + zero grad (device events)", opt_ms),
                     ("clip + AdamW + zero grad (wall)", opt_wall),
                     ("whole step as train runs it (wall)", step_ms),
                     (f"eager pass: sum of kernel times ({kernels} kernels)", device_ms)):
        print(f"{name:<52}{ms:>8.2f}")
    print(f"whole step: {tokens / step_ms * 1e3:.0f} tokens/s")


if __name__ == "__main__":
    main()
