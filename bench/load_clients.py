"""The load test's clients (bench/serve_load.py), apart so that their processes import only httpx:
streaming chat requests sent one after another, each timed from sending it."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = ["嬛嬛，朕今日政务繁忙，你陪朕说说话。", "你是谁？", "皇上驾到，你该如何应对？", "说一说你入宫以来的见闻。"]


def percentile(values, q):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def one_request(client: httpx.Client, url: str, prompt: str, max_tokens: int, sampled: bool = False) -> dict:
    """One streaming request on an open client; times from sending it (building an httpx.Client takes
    20-35 ms on a small CPU, which the first version of this benchmark counted as time to first token).
    `began`, `ended`: time.monotonic(), comparable across processes."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True}
    if not sampled:   # else the run's sampling (the self-llm recipe's: temperature 0.3, top-k 5, top-p 0.8)
        body["temperature"] = 0
    began = time.monotonic()
    start = time.perf_counter()
    stamps = []
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "stamps": [], "began": began, "ended": time.monotonic()}
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter() - start)
    return {"status": 200, "stamps": stamps, "began": began, "ended": time.monotonic()}


def one_client(url: str, i: int, requests: int, max_tokens: int, sampled: bool) -> list[dict]:
    """A client sending `requests` requests one after another over one connection pool."""
    with httpx.Client(timeout=600) as client:
        return [one_request(client, url, PROMPTS[(i + k) % len(PROMPTS)], max_tokens, sampled)
                for k in range(requests)]


def client_group(url: str, clients: list[int], requests: int, max_tokens: int, sampled: bool) -> list[dict]:
    """Clients `clients` as threads of one process."""
    with ThreadPoolExecutor(len(clients)) as pool:
        return [r for rs in pool.map(lambda i: one_client(url, i, requests, max_tokens, sampled), clients)
                for r in rs]


def meet(barrier) -> None:
    """Waits in a client process until every client process waits (`start_processes`)."""
    barrier.wait(timeout=300)


def start_processes(pool, count: int) -> None:
    """Starts all `count` processes of a spawning ProcessPoolExecutor. The pool starts them on
    demand, and a round submitted before they are up queues its clients in the first ones: in one
    round 3 of 4 clients ran one after another in one process (bench/NOTES.md)."""
    import multiprocessing

    with multiprocessing.Manager() as manager:
        barrier = manager.Barrier(count)
        list(pool.map(meet, [barrier] * count))
