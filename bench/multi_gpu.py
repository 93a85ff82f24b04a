"""Data-parallel scaling: the self-llm job with a larger global batch on 1 GPU and on N GPUs, one run.

    python bench/make_index_model.py /tmp/idx
    NCCL_NVLS_ENABLE=0 python bench/multi_gpu.py /tmp/idx --gpus 2 --json results.json

Runs `chatlora train` (64 examples per optimizer step, dropout off so both runs compute the same
function) with 1 process and with `--nproc N`, each for `--steps` optimizer steps (default: the
3 epochs), and reports real tokens/s (median over the steps after `--warmup`), the speed-up, and the
largest per-step loss difference between the two runs. The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SETTINGS = ["train.examples_per_step=64", "train.micro_batch_examples=64", "train.micro_batch_tokens=4096",
            "lora.dropout=0", "train.eval_every=0", "train.save_every=0", "data.held_out_fraction=0"]


def run(model_dir: str, nproc: int, steps: int, mode: str) -> list[dict]:
    out = Path(tempfile.mkdtemp()) / f"run-{nproc}"
    cmd = [sys.executable, "-m", "chatlora", "train", "--model", model_dir, "--output", str(out),
           "--max-steps", str(steps), *[x for s in SETTINGS + [f"train.distributed={mode}"] for x in ("--set", s)]]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    subprocess.run(cmd, check=True, env=dict(os.environ, NCCL_NVLS_ENABLE="0"))
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--gpus", type=int, default=2)
    # long enough for the captures of the bucket shapes to be behind the timed steps (bench/NOTES.md:
    # 66 shapes per rank over the 174 steps of 3 epochs at 64 examples per step with 2 processes)
    parser.add_argument("--steps", type=int, default=174)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--mode", default="replicate", choices=["replicate", "shard"])
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = {n: run(args.model_dir, n, args.steps, args.mode) for n in (1, args.gpus)}
    import torch
    import transformers

    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch": torch.__version__, "transformers": transformers.__version__,
              "gpus": args.gpus, "mode": args.mode, "steps": args.steps, "warmup": args.warmup, "settings": SETTINGS}
    for n, metrics in rows.items():
        timed = metrics[args.warmup:]
        result[f"{n}_gpu"] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                              "losses": [r["loss"] for r in metrics]}
    one, many = result["1_gpu"], result[f"{args.gpus}_gpu"]
    result["speedup"] = many["tokens_per_s"] / one["tokens_per_s"]
    result["max_relative_loss_difference"] = max(abs(a - b) / abs(a) for a, b in zip(one["losses"], many["losses"]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"{'processes':>9}{'tokens/s':>10}")
    for n in (1, args.gpus):
        print(f"{n:>9}{result[f'{n}_gpu']['tokens_per_s']:>10.0f}")
    print(f"speed-up {result['speedup']:.2f}x; largest per-step loss difference "
          f"{result['max_relative_loss_difference']:.2e} (relative)")


if __name__ == "__main__":
    main()
