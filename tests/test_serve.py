"""`chatlora serve`: the OpenAI API (with the official client), the tutorial endpoint, keys and limits."""

import json
import threading
import time

import pytest
import torch
from helpers import KEY, Slow, chat_body, free_port, local_client, make_client, running

from chatlora.config import ServeConfig
from chatlora.decode.engine import Sampling, generate_ids
from chatlora.errors import UserError
from chatlora.rundir import load_tuned_model
from chatlora.serve.app import Server, build_app
from chatlora.serve.guard import check_bind, resolve_api_key
from chatlora.serve.worker import StopStrings


def test_chat_completion_equals_plain_greedy_generate(loaded):
    run, model = loaded
    with make_client(loaded) as client:
        res = client.post("/v1/chat/completions", json=chat_body())
    assert res.status_code == 200
    body = res.json()
    prompt = run.fmt.prompt([{"role": "system", "content": run.system_prompt}, {"role": "user", "content": "你是谁？"}])
    ids, finish = generate_ids(model, prompt, run.fmt.stop_ids, Sampling(max_new_tokens=8, temperature=0))
    assert body["choices"][0]["message"]["content"] == run.tok.decode(ids).rstrip("\ufffd")
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                             "total_tokens": len(prompt) + len(ids)}


def test_streaming_sse_matches_non_streaming(loaded):
    with make_client(loaded) as client:
        whole = client.post("/v1/chat/completions", json=chat_body()).json()["choices"][0]["message"]["content"]
        with client.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as res:
            lines = [line for line in res.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "usage" in chunks[-1]


def test_tutorial_endpoint_contract(loaded):
    with make_client(loaded) as client:
        res = client.post("/", json={"prompt": "你好", "history": [["你是谁？", "臣妾甄嬛。"]], "max_length": 200,
                                     "top_p": 0.8, "top_k": 5, "temperature": 0, "repetition_penalty": 1.1})
    body = res.json()
    assert res.status_code == 200 and body["status"] == 200 and isinstance(body["response"], str)
    assert body["history"] == [["你是谁？", "臣妾甄嬛。"], ["你好", body["response"]]]
    assert len(body["time"]) == 19


def test_models_health_and_page(loaded):
    with make_client(loaded) as client:
        assert client.get("/health").json()["status"] == "ok"
        assert client.get("/v1/models").json()["data"][0]["id"] == "run"
        page = client.get("/")
    assert page.status_code == 200 and "现在你要扮演皇帝身边的女人--甄嬛" in page.text
    assert "http://" not in page.text and "https://" not in page.text, "the page loads no external asset"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    (chat_body(temperature=-1), "temperature"),
    (chat_body(top_p=0), "top_p"),
    (chat_body(max_tokens=0), "max_tokens"),
    (chat_body(max_tokens=5000), "max_tokens"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
    (chat_body(seed=2 ** 64), "seed"),
    (chat_body(seed=-(2 ** 63) - 1), "seed"),
    (chat_body(top_k=-3), "top_k"),
    (chat_body(repetition_penalty=0), "repetition_penalty"),
    (chat_body(temperature=2.5), "temperature"),
])
def test_bad_parameters_are_400_naming_the_field(loaded, body, param):
    with make_client(loaded) as client:
        res = client.post("/v1/chat/completions", json=body)
    assert res.status_code == 400, res.text
    assert res.json()["error"]["param"] == param


def test_context_length_is_checked_with_numbers(loaded):
    with make_client(loaded, max_tokens_cap=10_000) as client:
        res = client.post("/v1/chat/completions", json=chat_body(max_tokens=9000))
    assert res.status_code == 400 and "more than the model's context of 256" in res.json()["error"]["message"]


def test_body_limit_is_413(loaded):
    with make_client(loaded, max_body_bytes=2000) as client:
        res = client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "x" * 5000}]))
    assert res.status_code == 413


def test_every_route_but_health_needs_the_key(loaded):
    app_routes = None
    with make_client(loaded, key=KEY) as client:
        app_routes = [(m, r.path) for r in client.app.routes for m in getattr(r, "methods", ()) if m != "HEAD"]
        assert {p for _, p in app_routes} >= {"/", "/health", "/v1/models", "/v1/chat/completions"}
        for method, path in app_routes:
            res = client.request(method, path, json=chat_body())
            if path == "/health":
                assert res.status_code == 200
            else:
                assert res.status_code == 401, (method, path)
                assert res.headers["www-authenticate"].startswith("Basic")
        wrong = client.get("/v1/models", headers={"Authorization": "Bearer wrong-key-000"})
        assert wrong.status_code == 401
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/", auth=("any", KEY)).status_code == 200  # the browser's login prompt


def test_bind_and_key_rules(tmp_path, monkeypatch):
    check_bind("127.0.0.1", None)
    check_bind("::1", None)
    with pytest.raises(UserError, match="refusing to listen on 0.0.0.0 without an API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", KEY)
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    assert resolve_api_key(None, str(key_file)) == KEY
    monkeypatch.setenv("CHATLORA_API_KEY", "from-env-000")
    assert resolve_api_key(None, None) == "from-env-000"
    with pytest.raises(UserError, match="at least 8"):
        resolve_api_key("short", None)


def stop_reference(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reply a whole text gives: cut at the first completed stop string (earliest end, then
    earliest start), by brute force."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if s and text[:end].endswith(s)]
        if starts:
            return text[:min(starts)], True
    return text, False


def test_stop_strings_hold_back_and_cut_like_a_brute_force_search():
    import random

    matcher = StopStrings(["world"])
    assert matcher.push("hello wor") == "hello " and matcher.held == "wor"
    assert matcher.push("ld!") == "" and matcher.found
    rng = random.Random(0)
    for _ in range(400):
        stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(0, 3))]
        pieces = ["".join(rng.choice("abc") for _ in range(rng.randint(0, 4))) for _ in range(rng.randint(1, 8))]
        matcher = StopStrings(stops)
        shown = "".join(matcher.push(p) for p in pieces) + matcher.flush()
        assert (shown, matcher.found) == stop_reference("".join(pieces), stops), (stops, pieces)


def test_a_megabyte_stop_string_costs_no_more_than_the_text():
    """Matching is linear in the text generated: with a 1,000,000-character stop string, 20,000
    characters of text that keep matching its beginning are handled in one pass (a quadratic
    search took 73 s for a 4-token reply)."""
    stop = "a" * 1_000_000
    matcher = StopStrings([stop, "b" * 999_999 + "c"])
    shown = [matcher.push("a" * 5) for _ in range(4000)]
    assert "".join(shown) == "" and len(matcher.held) == 20_000 and not matcher.found
    assert matcher.push("x") == "a" * 20_000 + "x" and matcher.held == ""
    assert len(matcher.table[0]) <= 20_001   # its table grew with the text, not with the stop string


def test_full_queue_answers_429_with_retry_after(loaded):
    """One request held by the worker and one waiting fill a queue of one: the next is answered 429
    with Retry-After, and the two accepted ones finish. Each step waits for the one before it (a
    worker that took its first job only after every request had arrived left the queue empty)."""
    run, model = loaded
    server = Server(run, model, ServeConfig(queue_size=1, max_batch=1))
    gate, held = threading.Event(), threading.Event()
    original = server.worker._run_batch
    server.worker._run_batch = lambda batch: (held.set(), gate.wait(120), original(batch))[2]  # hold the worker busy
    with local_client(build_app(server)) as client:
        results = []

        def post():
            results.append(client.post("/v1/chat/completions", json=chat_body()).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        threads[0].start()
        assert held.wait(60), "the worker never took the first request"
        threads[1].start()
        deadline = time.time() + 60
        while not server.worker.jobs.full() and time.time() < deadline:
            time.sleep(0.05)
        assert server.worker.jobs.full(), "the second request never reached the queue"
        busy = client.post("/v1/chat/completions", json=chat_body())
        gate.set()
        for t in threads:
            t.join(60)
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert results == [200, 200]


# ---------------------------------------------------------------- a real server and the official client


@pytest.fixture(scope="module")
def live_server(loaded):
    run, model = loaded
    with running(Server(run, model, ServeConfig()), KEY) as url:
        yield url


def test_official_openai_client_works_unchanged(live_server):
    from openai import AuthenticationError, OpenAI

    client = OpenAI(base_url=f"{live_server}/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["run"]
    reply = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "你好"}],
                                           max_tokens=6, temperature=0, seed=1)
    text = reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 6
    stream = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "你好"}],
                                            max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    with pytest.raises(AuthenticationError):
        OpenAI(base_url=f"{live_server}/v1", api_key="wrong-key-0000").models.list()


def test_client_disconnect_stops_generation(loaded):
    """A client that goes away mid-stream stops its generation within a few tokens."""
    import httpx

    run, model = loaded

    server = Server(run, Slow(model), ServeConfig())
    finished = []
    original = server.worker._run_batch
    server.worker._run_batch = lambda batch: (finished.extend(batch), original(batch))[1]
    body = chat_body(max_tokens=200, temperature=1.0, seed=0)
    with running(server) as url:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=dict(body, stream=True), timeout=30) as res:
            for i, _ in enumerate(res.iter_lines()):
                if i >= 3:
                    break
        time.sleep(1.0)  # 50 tokens' worth of time: a generation that ignored the disconnect runs on
    assert finished and finished[0].cancel.is_set()
    assert finished[0].generated < 15, finished[0].generated


def test_concurrent_requests_are_batched_with_unchanged_replies(loaded):
    run, model = loaded
    server = Server(run, model, ServeConfig())
    questions = ["你是谁？", "皇上驾到！", "今日天气很好，我们去御花园走走吧。"]
    with local_client(build_app(server)) as client:
        alone = [client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": q}],
                                                                    max_tokens=10)).json() for q in questions]
        gate, sizes = threading.Event(), []
        original = server.worker._run_batch
        server.worker._run_batch = lambda batch: (gate.wait(10), sizes.append(len(batch)), original(batch))[2]
        together = [None] * len(questions)

        def post(i):
            body = chat_body(messages=[{"role": "user", "content": questions[i]}], max_tokens=10)
            together[i] = client.post("/v1/chat/completions", json=body).json()

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        gate.set()
        for t in threads:
            t.join(30)
    assert max(sizes) >= 2, sizes  # some of them ran as one batch
    for a, b in zip(alone, together):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"] == b["usage"]


def test_a_request_joins_a_running_generation(loaded, monkeypatch):
    """With the decoder (a GPU's path; here uncaptured on CPU), a request that arrives while another
    generates joins it: it ends first although it came second, and both replies are unchanged."""
    import chatlora.decode.engine as generate
    from chatlora.decode.static import StaticDecoder

    run = loaded[0]
    model = load_tuned_model(run, device="cpu")   # its own copy: the adapter is merged for the decoder
    model.merge_adapter()
    decoder = StaticDecoder(model.get_base_model(), graphs=False)
    step = decoder.advance
    monkeypatch.setattr(decoder, "advance", lambda: (time.sleep(0.02), step())[1])   # ~20 ms a token
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    long, short = (chat_body(messages=[{"role": "user", "content": q}], max_tokens=n)
                   for q, n in (("今日天气很好，我们去御花园走走吧。", 40), ("你是谁？", 4)))
    with make_client((run, model)) as client:
        alone = [client.post("/v1/chat/completions", json=b).json() for b in (long, short)]
        assert alone[0]["usage"]["completion_tokens"] == 40   # long enough to be joined
        done = {}

        def post(name, body):
            done[name] = (client.post("/v1/chat/completions", json=body).json(), time.monotonic())

        first = threading.Thread(target=post, args=("long", long))
        first.start()
        time.sleep(0.3)
        post("short", short)
        first.join(30)
    assert done["short"][1] < done["long"][1]
    for a, (b, _) in zip(alone, (done["long"], done["short"])):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
        assert a["usage"] == b["usage"]


def test_serve_process_logs_no_prompt_or_key_and_stops_on_sigterm(tiny_run, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    proc = subprocess.Popen([sys.executable, "-m", "chatlora", "serve", str(tiny_run), "--port", str(port),
                             "--api-key-file", str(key_file)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        secret_prompt = "秘密的问题-7f3a"
        res = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                         headers={"Authorization": f"Bearer {KEY}"},
                         json={"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 3})
        assert res.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # uvicorn shuts down in order, then re-raises the signal: exit status -SIGTERM is the norm.
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out and "Finished server process" in out
    assert "POST /v1/chat/completions" in out  # the access log is there...
    assert secret_prompt not in out and KEY not in out  # ...without prompts or keys


def test_deadline_ends_a_long_generation(loaded):
    run, model = loaded

    with local_client(build_app(Server(run, Slow(model), ServeConfig(deadline_s=0.3)))) as client:
        started = time.time()
        body = client.post("/v1/chat/completions", json=chat_body(max_tokens=200, temperature=1.0, seed=0)).json()
    assert time.time() - started < 3
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] < 40


@pytest.mark.parametrize("raw", [b"{not json", b"[]", b'{"messages": [{"role": "user", "content": 5}]}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
                                 b'{"messages": [{"role": "user", "content": "x"}], "stop": [1, 2]}',
                                 b'{"messages": [{"role": "user"}]}', b"null"])
def test_malformed_bodies_are_400_never_500(loaded, raw):
    with make_client(loaded) as client:
        res = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
        tutorial = client.post("/", content=raw, headers={"Content-Type": "application/json"})
    assert res.status_code == 400 and res.json()["error"]["message"]
    assert tutorial.status_code == 400


# ---------------------------------------------------------------- the worker survives what fails


class Exploding(torch.nn.Module):
    """A model whose forward fails for prompts holding token `bad` (a stand-in for any fault while
    a batch is generated)."""

    def __init__(self, inner, bad: int):
        super().__init__()
        self.inner, self.config, self.bad = inner, inner.config, bad

    def forward(self, input_ids=None, **k):
        if (input_ids == self.bad).any():
            raise RuntimeError("boom")
        return self.inner(input_ids=input_ids, **k)


def test_a_failing_batch_answers_500_and_the_worker_serves_the_next(loaded, monkeypatch):
    import chatlora.serve.worker as worker

    run, model = loaded
    bad = run.tok.encode("毒")[-1]
    with make_client((run, Exploding(model, bad))) as client:
        poisoned = client.post("/v1/chat/completions", json=chat_body(messages=[{"role": "user", "content": "毒"}]))
        assert poisoned.status_code == 500 and "generation failed (RuntimeError)" in poisoned.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions",
                           json=chat_body(messages=[{"role": "user", "content": "毒"}], stream=True)) as res:
            lines = [line for line in res.iter_lines() if line]
        assert "generation failed" in lines[-2] and lines[-1] == "data: [DONE]"
        # A fault before any token (here: making the generation) is caught the same way.
        real = worker.BatchGeneration
        monkeypatch.setattr(worker, "BatchGeneration", lambda *a, **k: 1 / 0)
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 500
        monkeypatch.setattr(worker, "BatchGeneration", real)
        assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["failed_batches"] == 3


def test_health_is_503_once_the_worker_is_gone(loaded):
    run, model = loaded
    server = Server(run, model, ServeConfig())
    with local_client(build_app(server)) as client:
        assert client.get("/health").status_code == 200
        server.worker.close()
        server.worker.thread.join(10)
        res = client.get("/health")
    assert res.status_code == 503 and res.json()["status"] == "unavailable"
