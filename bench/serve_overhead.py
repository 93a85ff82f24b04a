"""The server's own cost per streamed token, without a model: how many tokens a second `chatlora serve`
can stream to concurrent clients when generation is free (CPU).

    python bench/make_index_model.py /tmp/idx --layers 2
    python bench/serve_overhead.py /tmp/idx --clients 1,16 --max-tokens 512

A 1-step run directory is trained on the model (`serve_load.short_run`), then the worker's
`BatchGeneration` is replaced by one that yields every row's next token at once (ids that decode to
Chinese characters), so what is left is the worker's text handling, the hand-over to the event loop,
the SSE encoding and uvicorn. The clients run in a separate process (their parsing would otherwise
share this process's interpreter lock). The table comes last.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from serve_load import short_run  # noqa: E402  (bench/, the script's own folder)

import chatlora.serve.worker as worker  # noqa: E402
from chatlora.config import ServeConfig  # noqa: E402
from chatlora.rundir import load_tuned_model  # noqa: E402
from chatlora.serve.app import Server, in_background  # noqa: E402

CLIENTS = r'''
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import httpx

url, clients, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def one(_):
    body = {"messages": [{"role": "user", "content": "你是谁？"}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True}
    n = 0
    with httpx.Client(timeout=600) as c, c.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content": "' in line and '"content": ""' not in line:
                n += 1
    return n

start = time.perf_counter()
with ThreadPoolExecutor(clients) as pool:
    counts = list(pool.map(one, range(clients)))
print(json.dumps({"clients": clients, "events": sum(counts), "seconds": time.perf_counter() - start}))
'''


def free_generation(token_ids: list[int]):
    """A BatchGeneration that costs nothing: every row's next id at once, `max_new_tokens` of them."""

    class FreeGeneration:
        def __init__(self, model, prompts, stop_ids, samplings, pad_id=0, should_stop=lambda row: False,
                     admit=None, max_rows=None, on_finish=None):
            self.rows, self.samplings, self.should_stop = len(prompts), samplings, should_stop
            self.on_finish = on_finish or (lambda row, reason: None)
            self.finish_reasons = [None] * len(prompts)

        def __iter__(self):   # one batch, no joining (as without the GPU decoder)
            for step in range(max(s.max_new_tokens for s in self.samplings)):
                for r in range(self.rows):
                    if self.finish_reasons[r] is None and step < self.samplings[r].max_new_tokens:
                        if self.should_stop(r):
                            self.finish_reasons[r] = "length"
                            self.on_finish(r, "length")
                            continue
                        yield r, token_ids[step % len(token_ids)]
            for r, f in enumerate(self.finish_reasons):
                if f is None:
                    self.finish_reasons[r] = "length"
                    self.on_finish(r, "length")

    return FreeGeneration


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()
    run = short_run(args.model_dir, steps=1)
    model = load_tuned_model(run, device="cpu")
    ids = [i for i in run.tok.encode("嬛嬛朕今日政务繁忙你陪朕说说话") if run.tok.decode([i]).strip()]
    worker.BatchGeneration = free_generation(ids)
    server = Server(run, model, ServeConfig(queue_size=256, max_batch=16, max_tokens_cap=args.max_tokens))
    rows = []
    with in_background(server) as url:
        subprocess.run([sys.executable, "-c", CLIENTS, url, "1", "8"], check=True, capture_output=True)  # warm-up
        for n in map(int, args.clients.split(",")):
            done = subprocess.run([sys.executable, "-c", CLIENTS, url, str(n), str(args.max_tokens)], check=True,
                                  capture_output=True, text=True)
            rows.append(json.loads(done.stdout))
    print(f"{'clients':>7}{'text events':>13}{'seconds':>9}{'events/s':>10}")
    for r in rows:
        print(f"{r['clients']:>7}{r['events']:>13}{r['seconds']:>9.2f}{r['events'] / r['seconds']:>10.0f}")


if __name__ == "__main__":
    main()
