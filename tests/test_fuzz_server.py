"""A live server (loopback) under a few thousand random and malformed requests: no answer is a 5xx,
the generation thread stays alive, and a normal request still gets its reply afterwards."""

import json
import random
import socket
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import chat_body

from chatlora.config import ServeConfig
from chatlora.serve.app import Server, in_background

REQUESTS = 2400
PATHS = ["/v1/chat/completions", "/v1/chat/completions", "/v1/chat/completions", "/", "/", "/v1/models",
         "/health", "/v1/completions", "/%00", "/..%2f..%2fetc/passwd", "/v1/chat/completions?x=" + "a" * 3000]
FIELDS = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
          "stop", "seed", "stream", "n", "tools", "logprobs", "response_format", "model", "prompt", "history",
          "max_length", "stream_options", "user"]


def odd_value(rng: random.Random, depth: int = 0):
    pick = rng.randrange(14 if depth < 3 else 10)
    return [lambda: rng.choice([0, 1, -1, 2 ** 63, 2 ** 64, -(2 ** 70), 10 ** 400, 7]),
            lambda: rng.choice([0.0, -0.5, 1e308, 1e-320, 2.5, 0.3]),
            lambda: rng.choice([True, False, None]),
            lambda: rng.choice(["", "x", "你好", "\ud800", "<|im_start|>system", "reserved_0", "\x00", "a" * 5000]),
            lambda: rng.choice(["user", "assistant", "system", "tool", "USER"]),
            lambda: "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(20))),
            lambda: rng.choice([float("nan"), float("inf")]),
            lambda: {"role": "user", "content": "你好"},
            lambda: [{"role": "user", "content": "q"}] * rng.choice([0, 1, 300]),
            lambda: ["stop"] * rng.choice([1, 5]),
            lambda: {rng.choice(FIELDS + ["role", "content"]): odd_value(rng, depth + 1) for _ in range(rng.randrange(4))},
            lambda: [odd_value(rng, depth + 1) for _ in range(rng.randrange(4))],
            lambda: [{"role": odd_value(rng, depth + 1), "content": odd_value(rng, depth + 1)}],
            lambda: [[odd_value(rng, depth + 1), odd_value(rng, depth + 1)]]][pick]()


def odd_request(rng: random.Random) -> dict:
    """Method, path, headers and body of one random request."""
    body = dict(chat_body(max_tokens=rng.choice([1, 3, None])), prompt="你好") if rng.random() < 0.6 else {}
    for _ in range(rng.randrange(4)):
        body[rng.choice(FIELDS)] = odd_value(rng)
    if rng.random() < 0.2:
        body.pop(rng.choice(list(body)), None) if body else None
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    form = rng.randrange(10)
    if form == 0:
        raw = raw[:rng.randrange(len(raw) + 1)]                          # cut short
    elif form == 1:
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(64)))  # noise
    elif form == 2:
        raw = raw.replace(b'"', b"", 1)
    headers = {"Content-Type": rng.choice(["application/json", "application/json", "text/plain", "a/b; charset=xx"])}
    return {"method": rng.choice(["POST"] * 8 + ["GET", "PUT", "DELETE", "OPTIONS"]), "url": rng.choice(PATHS),
            "headers": headers, "content": raw}


def raw_garbage(url: str, rng: random.Random) -> None:
    """Bytes that are not HTTP at all, or HTTP that breaks its own rules."""
    host, port = url.removeprefix("http://").split(":")
    junk = rng.choice([b"\x16\x03\x01\x02\x00" + bytes(200), b"GET / HTTP/9.9\r\n\r\n",
                       b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzzzzz\r\n\r\n",
                       b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n",
                       b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " +
                       rng.choice([b"-1", b"abc", b"99999999999999999999", b"1, 2"]) + b"\r\n\r\n{}",
                       bytes(rng.randrange(256) for _ in range(300))])
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(junk)
        try:
            reply = s.recv(64)
        except OSError:   # reset: fine, as long as the server lives
            return
    assert not reply.startswith(b"HTTP/1.1 5"), reply


@pytest.mark.slow
def test_random_and_malformed_requests_get_no_5xx_and_the_worker_lives(tiny_run):
    from chatlora.rundir import load_run, load_tuned_model

    run = load_run(tiny_run)
    server = Server(run, load_tuned_model(run, device="cpu"), ServeConfig(max_tokens_cap=4, queue_size=64))
    rng = random.Random(20261130)
    requests = [odd_request(rng) for _ in range(REQUESTS)]
    statuses: Counter = Counter()
    with in_background(server) as url:
        def send(spec):
            with httpx.Client(base_url=url, timeout=30) as client:
                try:
                    return client.request(**spec).status_code
                except httpx.HTTPError:   # the server closed a connection it would not read further
                    return "closed"

        with ThreadPoolExecutor(8) as pool:
            statuses.update(pool.map(send, requests))
        for _ in range(50):
            raw_garbage(url, rng)
        assert server.worker.alive and server.worker.failures == 0
        health = httpx.get(url + "/health").json()
        normal = httpx.post(url + "/v1/chat/completions", json=chat_body(max_tokens=4), timeout=60)
    fivexx = {s: n for s, n in statuses.items() if isinstance(s, int) and s >= 500}
    assert not fivexx, statuses
    assert statuses[200] > 100 and statuses[400] > 500, statuses   # both paths were exercised
    assert health["status"] == "ok" and normal.status_code == 200
    assert normal.json()["choices"][0]["message"]["content"] is not None
