"""Decode speed: the seed tutorial's inference path vs chatlora's engine, in one run.

    python bench/make_index_model.py /tmp/index-1.9b
    python bench/decode_speed.py /tmp/index-1.9b --new-tokens 256 --json results.json

A LoRA adapter (r 8, the seven projections, random B so it is not a no-op) sits on an
Index-1.9B-shaped model. Paths, all greedy after a 40-token prompt, no stop token:
- seed: `PeftModel` (adapter unmerged) + `model.generate`, batch 1 and batch 16 (the tutorial's way);
- chatlora: `generate.Generation` at batch 1 and `generate.BatchGeneration` at batch 16.
Reported: generated tokens/s, time to first token, and whether the greedy tokens equal the seed
path's. The table comes last. Runs on CPU too (slowly) with `--device cpu`, for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.generate import BatchGeneration, Generation, Sampling  # noqa: E402
from chatlora.lora import attach  # noqa: E402
from chatlora.model import load_model, prepare_base  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def seed_path(model, prompts, new_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=None, pad_token_id=0)
    sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def chatlora_path(model, prompts, new_tokens: int, device: str) -> tuple[float, float, list[list[int]]]:
    s = Sampling(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    sync(device)
    start = time.perf_counter()
    first = None
    tokens: list[list[int]] = [[] for _ in prompts]
    gen = Generation(model, prompts[0], [], s) if len(prompts) == 1 else BatchGeneration(model, prompts, [], [s] * len(prompts))
    for item in gen:
        row, token = (0, item) if len(prompts) == 1 else item
        if first is None:
            sync(device)
            first = time.perf_counter() - start
        tokens[row].append(token)
    sync(device)
    return time.perf_counter() - start, first, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    torch.manual_seed(0)
    model = attach(load_model(prepare_base(args.model_dir), dtype, args.device), load_config().lora).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 3000, (40,), generator=g).tolist() for _ in range(args.batch)]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "new_tokens": args.new_tokens, "rows": []}
    seed_path(model, prompts[:1], 8, args.device)  # warm-up
    chatlora_path(model, prompts[:1], 8, args.device)
    for batch in (1, args.batch):
        seconds, seed_tokens = seed_path(model, prompts[:batch], args.new_tokens, args.device)
        ours, ttft, our_tokens = chatlora_path(model, prompts[:batch], args.new_tokens, args.device)
        total = batch * args.new_tokens
        results["rows"].append({"batch": batch, "seed_tokens_per_s": total / seconds,
                                "chatlora_tokens_per_s": total / ours, "chatlora_ttft_s": ttft,
                                "same_greedy_tokens": seed_tokens == our_tokens})
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n{'batch':>5}{'seed tok/s':>12}{'chatlora tok/s':>16}{'x seed':>8}{'TTFT s':>8}{'same':>6}")
    for r in results["rows"]:
        print(f"{r['batch']:>5}{r['seed_tokens_per_s']:>12.1f}{r['chatlora_tokens_per_s']:>16.1f}"
              f"{r['chatlora_tokens_per_s'] / r['seed_tokens_per_s']:>8.2f}{r['chatlora_ttft_s']:>8.3f}"
              f"{str(r['same_greedy_tokens']):>6}")


if __name__ == "__main__":
    main()
