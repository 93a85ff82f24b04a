"""Time to the first training step, the model read from its weights (models/native.py) against built by
transformers and peft (CHATLORA_NATIVE_MODEL=0), each run a fresh `chatlora train` process.

    python bench/startup.py MODEL [--repeat 3] [--fast-path eager] [--json out.json]

Both loaders run `--repeat` times in alternation (one data check first warms the tokenized-data cache
and the model's cached copy, as a previous run would). Reported per run: the process's wall time to
its first metrics row's step (from the process's start: Python, torch and chatlora's imports
included), the run's own time to the first step (`elapsed_s`, from the training function's start),
its time to `ready` (the set-up before the first step: data, model, optimizer) and its `startup_s`
phases; then the medians per loader. On CPU the first step's own arithmetic dwarfs the set-up:
compare `ready` there. On a GPU the default path (fused pass +
CUDA graphs) runs; on CPU pass `--fast-path eager` (the plain path loads through transformers
either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

LOADERS = {"native": "1", "transformers": "0"}   # CHATLORA_NATIVE_MODEL for each
KEYS = ("process_to_first_step_s", "time_to_first_step_s", "ready_s")


def one_run(model: str, loader: str, fast_path: str | None, workdir: Path, number: int) -> dict:
    run = workdir / f"{loader}-{number}"
    command = [sys.executable, "-m", "chatlora", "train", "--model", model, "--output", str(run),
               "--set", "train.max_steps=1", "--set", "train.eval_every=0", "--set", "data.held_out_fraction=0"]
    if fast_path:
        command += ["--set", f"train.fast_path={fast_path}"]
    env = dict(os.environ, CHATLORA_NATIVE_MODEL=LOADERS[loader])
    began = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics, first_row_s = run / "metrics.jsonl", None
    while process.poll() is None:   # the first row appears when the first step has ended
        if first_row_s is None and metrics.is_file() and metrics.read_text().strip():
            first_row_s = time.perf_counter() - began
        time.sleep(0.01)
    if process.returncode != 0:
        raise SystemExit(f"{loader} run failed:\n{process.stderr.read()[-3000:]}")
    row = next(json.loads(x) for x in metrics.read_text().splitlines() if '"loss"' in x)
    return {"loader": loader, "process_to_first_step_s": round(first_row_s or float("nan"), 2),
            "time_to_first_step_s": row["elapsed_s"], "ready_s": row["startup_s"]["ready"],
            "startup_s": row["startup_s"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fast-path", help="train.fast_path for every run (CPU: eager)")
    parser.add_argument("--json")
    args = parser.parse_args()
    subprocess.run([sys.executable, "-m", "chatlora", "data", "check", "--model", args.model], check=True,
                   stdout=subprocess.DEVNULL)
    workdir = Path(tempfile.mkdtemp())
    runs = [one_run(args.model, loader, args.fast_path, workdir, i)
            for i in range(args.repeat) for loader in LOADERS]
    medians = {loader: {key: statistics.median(r[key] for r in runs if r["loader"] == loader)
                        for key in KEYS} for loader in LOADERS}
    result = {"date": str(date.today()), "model": args.model, "fast_path": args.fast_path or "default",
              "runs": runs, "medians": medians}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    for r in runs:
        print(json.dumps(r))
    print(f"\nmedians of {args.repeat} runs each")
    print(f"{'loader':<14}{'process to first step (s)':>28}{'run to first step (s)':>24}{'run to ready (s)':>19}")
    for loader, m in medians.items():
        print(f"{loader:<14}{m['process_to_first_step_s']:>28.2f}{m['time_to_first_step_s']:>24.2f}"
              f"{m['ready_s']:>19.2f}")


if __name__ == "__main__":
    main()
