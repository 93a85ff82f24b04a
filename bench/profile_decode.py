"""Where a decode step's time goes: the captured step with on-device greedy picks alone, and
`BatchGeneration`'s whole greedy per-token loop, plus the kernels of one replayed step.

    python bench/make_index_model.py /tmp/idx
    python bench/profile_decode.py /tmp/idx --batch 1 16
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.decode.engine import BatchGeneration, Sampling  # noqa: E402
from chatlora.decode.static import static_decoder  # noqa: E402
from chatlora.models.load import load_model, prepare_base  # noqa: E402
from chatlora.models.lora import attach  # noqa: E402


def timed(fn, n: int) -> float:
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / n


def start(dec, ids, columns: int) -> None:
    """Rows of `ids` [B, W] joined into a fresh cache with room for `columns` more tokens."""
    rows, width = ids.shape
    dec.reset(rows, dec.join_width(width) + columns)
    ones = torch.ones_like(ids)
    dec.join(list(range(rows)), ids, ones, torch.arange(width, device=ids.device).expand(rows, -1))


def profile(model, batch: int, steps: int) -> dict:
    dec = static_decoder(model)
    start(dec, torch.randint(5, 3000, (batch, 8), device="cuda"), 2 * steps + 16)
    for _ in range(2):   # captures the step (device picks) at this attention bucket
        dec.advance()
    graph = dec.state.graphs[128].graph
    replay = timed(graph.replay, steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels[e.name[:70]]
            k[0] += 1
            k[1] += e.device_time
    count = sum(n for n, _ in kernels.values()) / 5
    busy = sum(t for _, t in kernels.values()) / 5 / 1000
    s = Sampling(max_new_tokens=steps, temperature=0, repetition_penalty=1.0)
    prompts = [list(range(10, 50))] * batch
    list(BatchGeneration(model, prompts, [], [s] * batch))  # captures the buckets these steps need
    torch.cuda.synchronize()
    began = time.perf_counter()
    list(BatchGeneration(model, prompts, [], [s] * batch))
    torch.cuda.synchronize()
    loop = (time.perf_counter() - began) / steps
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:12]
    return {"batch": batch, "replay_ms": replay * 1e3, "generation_ms_per_token": loop * 1e3,
            "kernels_per_step": count, "kernel_busy_ms": busy,
            "top": [(name, n / 5, t / 5 / 1000) for name, (n, t) in top]}


def steady_loop(model, batch: int, tokens: int = 110) -> dict:
    """Per-token time of the decoding loops in steady state (after their 10th token, prefill excluded):
    `BatchGeneration` greedy and with the self-llm recipe's sampling, and the decoder's steps alone
    (`advance`, no read-back); plus how long the GPU sat idle between kernels (gaps over 2 us) in
    BatchGeneration's greedy loop past its prefill."""
    dec = static_decoder(model)
    s = Sampling(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    prompts = [list(range(10, 18))] * batch
    list(BatchGeneration(model, prompts, [], [s] * batch))   # captures

    def per_token(stamps):
        return (stamps[-1] - stamps[10]) / (len(stamps) - 11) * 1e3

    stamps = []
    for row, _ in BatchGeneration(model, prompts, [], [s] * batch):
        if row == 0:
            stamps.append(time.perf_counter())
    generation = per_token(stamps)
    sampled = Sampling(max_new_tokens=tokens, temperature=0.3, top_k=5, top_p=0.8, repetition_penalty=1.1, seed=0)
    list(BatchGeneration(model, prompts, [], [sampled] * batch))
    stamps = []
    for row, _ in BatchGeneration(model, prompts, [], [sampled] * batch):   # the self-llm recipe's sampling
        if row == 0:
            stamps.append(time.perf_counter())
    sampling = per_token(stamps)
    ids = torch.tensor(prompts, device="cuda")

    def bare(n):   # the decoder's steps alone, queued back to back, read back once
        start(dec, ids, n + 2)
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                dec.advance()
                dec.mark_seen()
        torch.cuda.synchronize()
        return (time.perf_counter() - began) / n * 1e3

    bare(tokens)
    steps_only = bare(tokens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        list(BatchGeneration(model, prompts, [], [replace(s, max_new_tokens=40)] * batch))
        torch.cuda.synchronize()
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    spans = spans[len(spans) // 4:]   # past the prefill
    idle = sum(max(0, b[0] - a[1]) for a, b in zip(spans, spans[1:]) if b[0] - a[1] > 2)
    wall = spans[-1][1] - spans[0][0]
    return {"batch": batch, "generation_ms": generation, "steps_only_ms": steps_only, "sampled_ms": sampling,
            "gpu_idle_fraction": idle / wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--no-loop", action="store_true", help="skip the steady-state loop timings")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = attach(load_model(prepare_base(args.model_dir), "bfloat16", "cuda"), load_config().lora).eval()
    rows = [profile(model, b, args.steps) for b in args.batch]
    loops = [] if args.no_loop else [steady_loop(model, b) for b in args.batch]
    for r in rows:
        print(f"\nbatch {r['batch']}: top kernels of one replayed step (count, ms)")
        for name, n, ms in r["top"]:
            print(f"  {n:>6.0f} {ms:>7.3f}  {name}")
    print(f"\n{'batch':>5}{'replay ms':>11}{'loop ms/token':>15}{'kernels':>9}{'kernel busy ms':>16}")
    for r in rows:
        print(f"{r['batch']:>5}{r['replay_ms']:>11.3f}{r['generation_ms_per_token']:>15.3f}"
              f"{r['kernels_per_step']:>9.0f}{r['kernel_busy_ms']:>16.3f}")
    print(f"\n{'batch':>5}{'BatchGeneration ms/token':>26}{'steps alone ms':>16}{'sampled ms/token':>18}"
          f"{'GPU idle':>10}   (steady state)")
    for r in loops:
        print(f"{r['batch']:>5}{r['generation_ms']:>26.3f}{r['steps_only_ms']:>16.3f}{r['sampled_ms']:>18.3f}"
              f"{r['gpu_idle_fraction']:>10.1%}")


if __name__ == "__main__":
    main()
