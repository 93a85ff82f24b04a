"""Load on CPU: more concurrent clients than the queue holds. Only 200s and 429s, no 5xx, flat memory."""

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import running

from chatlora.config import ServeConfig
from chatlora.rundir import load_run, load_tuned_model
from chatlora.serve.app import Server

CLIENTS, REQUESTS, QUEUE = 16, 300, 4


def rss_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.mark.slow
def test_overload_gives_only_200_and_429_and_memory_stays_flat(tiny_run):
    run = load_run(tiny_run)
    server = Server(run, load_tuned_model(run, device="cpu"), ServeConfig(queue_size=QUEUE))
    body = {"messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0.7}
    statuses: Counter = Counter()
    memory = []

    def one(i):
        with httpx.Client(timeout=60) as client:
            status = client.post(f"{base}/v1/chat/completions", json=body).status_code
        statuses[status] += 1
        if i % 50 == 0:
            memory.append(rss_mib())

    with running(server) as base, ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(REQUESTS)))
    assert sum(statuses.values()) == REQUESTS
    assert set(statuses) <= {200, 429}, statuses
    assert statuses[200] > 0 and statuses[429] > 0, statuses  # the queue really overflowed
    growth = memory[-1] - memory[1]  # after the first 50 requests have warmed everything up
    assert growth < 50, f"RSS grew {growth:.1f} MiB over {REQUESTS} requests: {memory}"
