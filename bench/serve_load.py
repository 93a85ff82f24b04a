"""Load test of `chatlora serve` on a GPU: tokens/s, time to first token and per-token latency at
several numbers of concurrent streaming clients.

    python bench/make_index_model.py /tmp/idx
    python bench/serve_load.py /tmp/idx --clients 1,4,16,64 --json results.json

Trains a 2-step adapter on the model (a run directory like any other), serves it with a real uvicorn
server on loopback, and for each client count runs that many clients, each sending `--requests`
streaming chat requests one after another (greedy, or with `--sampled` the run's sampling settings;
`--max-tokens` tokens). The clients run in
`--processes` separate processes (threads within each), so that parsing their streams does not
compete with the server for this process's interpreter lock, as real clients would not. Reported
per client count: HTTP statuses, aggregate generated tokens/s over the round (first request sent to
last reply ended), time to first token (p50/p95) and the gap between streamed tokens
(p50/p95/p99). The table comes last.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from load_clients import client_group, percentile, start_processes  # noqa: E402  (bench/: light, for the client processes)

from chatlora.config import (
    ServeConfig,  # noqa: E402
    load_config,  # noqa: E402
)
from chatlora.decode.static import static_decoder  # noqa: E402
from chatlora.rundir import load_run, load_tuned_model  # noqa: E402
from chatlora.serve.app import Server, in_background  # noqa: E402
from chatlora.train.loop import train  # noqa: E402


def round_of(url: str, clients: int, requests: int, max_tokens: int, processes, count: int,
             sampled: bool = False) -> dict:
    """`clients` clients spread over `count` processes of the pool `processes`."""
    groups = [list(range(clients))[p::count] for p in range(count)]
    futures = [processes.submit(client_group, url, g, requests, max_tokens, sampled) for g in groups if g]
    flat = [r for f in futures for r in f.result()]
    wall = max(r["ended"] for r in flat) - min(r["began"] for r in flat)
    ttft = [r["stamps"][0] for r in flat if r["stamps"]]
    gaps = [b - a for r in flat for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(len(r["stamps"]) for r in flat)
    return {"clients": clients, "requests": len(flat), "statuses": dict(Counter(r["status"] for r in flat)),
            "streamed_chunks": tokens, "tokens_per_s": tokens / wall, "wall_s": wall,
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p95_s": percentile(ttft, 0.95),
            "token_gap_p50_ms": 1e3 * percentile(gaps, 0.5), "token_gap_p95_ms": 1e3 * percentile(gaps, 0.95),
            "token_gap_p99_ms": 1e3 * percentile(gaps, 0.99)}


def short_run(model_dir: str, steps: int):
    """A run directory like any other, from a `steps`-step training of the model (a temporary one)."""
    run_dir = Path(tempfile.mkdtemp()) / "run"
    train(load_config(overrides=[f"train.max_steps={steps}", "train.eval_every=0", "train.save_every=0"],
                      flags={"model.path": model_dir}), run_dir)
    return load_run(run_dir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--processes", type=int, default=8, help="client processes")
    parser.add_argument("--sampled", action="store_true", help="the run's sampling settings instead of greedy")
    parser.add_argument("--json")
    args = parser.parse_args()
    run = short_run(args.model_dir, steps=2)
    model = load_tuned_model(run)
    # Random weights pick ids beyond the small test tokenizer's vocabulary (they decode to no text):
    # keep their logits at 0 so the replies stream text, as a trained model's would.
    vocab = getattr(run.tok, "vocab_size", None)
    if vocab:
        head = (model.get_base_model() if hasattr(model, "get_base_model") else model).lm_head.weight
        with torch.no_grad():
            head[vocab:] = 0
    server = Server(run, model, ServeConfig(queue_size=256, max_batch=16))
    spawn = multiprocessing.get_context("spawn")   # no CUDA state in the clients
    with in_background(server) as url, ProcessPoolExecutor(args.processes, mp_context=spawn) as processes:
        start_processes(processes, args.processes)
        rounds(args, url, processes, model)


def rounds(args, url: str, processes, model) -> None:
    for clients in (1, 16):  # warm-up: starts the client processes, captures the decode steps
        round_of(url, clients, 1, args.max_tokens, processes, args.processes, args.sampled)
    decoder = static_decoder(model)   # the worker's (made by now)
    rows = []
    for n in args.clients.split(","):
        before = (decoder.steps, decoder.row_steps) if decoder else (0, 0)
        rows.append(round_of(url, int(n), args.requests, args.max_tokens, processes, args.processes, args.sampled))
        if decoder:   # how full the decode batch was, and how much of the round the steps took
            steps, row_steps = decoder.steps - before[0], decoder.row_steps - before[1]
            rows[-1].update(decode_steps=steps, mean_rows_per_step=row_steps / max(steps, 1),
                            steps_per_s=steps / rows[-1]["wall_s"])
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "max_tokens": args.max_tokens, "max_batch": 16, "client_processes": args.processes,
           "sampling": "the run's (temperature 0.3, top-k 5, top-p 0.8, penalty 1.1)" if args.sampled else "greedy",
           "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"{'clients':>7}{'requests':>9}{'statuses':>16}{'tokens/s':>10}{'TTFT p50':>9}{'p95':>7}"
          f"{'gap p50 ms':>11}{'p95':>7}{'p99':>7}{'rows/step':>10}{'steps/s':>8}")
    for r in rows:
        print(f"{r['clients']:>7}{r['requests']:>9}{str(r['statuses']):>16}{r['tokens_per_s']:>10.0f}"
              f"{r['ttft_p50_s']:>9.3f}{r['ttft_p95_s']:>7.3f}{r['token_gap_p50_ms']:>11.2f}"
              f"{r['token_gap_p95_ms']:>7.2f}{r['token_gap_p99_ms']:>7.2f}"
              f"{r.get('mean_rows_per_step', float('nan')):>10.1f}{r.get('steps_per_s', float('nan')):>8.0f}")


if __name__ == "__main__":
    main()
