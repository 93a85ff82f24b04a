"""Helpers shared by the tests (no test module imports another; the tiny models come from
chatlora.testing, the fixtures from conftest.py).

The server's libraries (fastapi, starlette) are imported inside the helpers that need them: the GPU
tests use the kernel helpers here on machines that have no web stack installed."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from chatlora.config import ServeConfig, load_config
from chatlora.decode import kernels
from chatlora.models.load import load_model, prepare_base
from chatlora.models.lora import attach, trainable_parameters
from chatlora.templates import chat_format
from chatlora.train.gradients import accumulate_gradients

HUANHUAN_SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛"


def render_go_template(template: str, system: str | None, messages: list[dict]) -> str:
    """The subset of Go's text/template that Ollama templates written by chatlora use:
    {{ if .System }}...{{ end }}, {{ range .Messages }}...{{ end }}, {{ if eq .Role "user" }}...
    {{ else if eq .Role "assistant" }}...{{ end }}, and {{ .System }}, {{ .Role }}, {{ .Content }}."""
    tokens = re.split(r"({{.*?}})", template)
    pos = 0

    def block(scope: dict, stop: tuple[str, ...]) -> tuple[str, str]:
        """Renders until one of `stop` (returned) at this level."""
        nonlocal pos
        out = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if not tok.startswith("{{"):
                out.append(tok)
                continue
            action = tok[2:-2].strip()
            if action in stop or any(action.startswith(s) for s in stop if s.endswith(" ")):
                return "".join(out), action
            if action.startswith("if ") or action.startswith("range "):
                out.append(control(action, scope))
            else:
                out.append(str(scope[action.lstrip(".")]))
        return "".join(out), ""

    def truth(condition: str, scope: dict) -> bool:
        eq = re.fullmatch(r'eq \.(\w+) "(.*)"', condition)
        return scope[eq.group(1)] == eq.group(2) if eq else bool(scope[condition.lstrip(".")])

    def control(action: str, scope: dict) -> str:
        nonlocal pos
        if action.startswith("range "):
            start, rendered = pos, []
            for item in scope[action[6:].lstrip(".")]:
                pos = start
                text, _ = block(dict(scope, **{k.capitalize(): v for k, v in item.items()}), ("end",))
                rendered.append(text)
            if not scope[action[6:].lstrip(".")]:
                block(scope, ("end",))
            return "".join(rendered)
        chosen, condition = None, action[3:]
        while True:   # the branches in order: the first whose condition holds is the output
            text, ended = block(scope, ("end", "else if ", "else"))
            if chosen is None and (condition is None or truth(condition, scope)):
                chosen = text
            if ended == "end":
                return chosen or ""
            condition = None if ended == "else" else ended[len("else if "):]

    return block({"System": system or "", "Messages": messages}, ())[0]


# ---------------------------------------------------------------- serving


KEY = "test-key-123456"


class Slow(torch.nn.Module):
    """A model that takes ~20 ms a token, so that a disconnect or a deadline lands mid-reply."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, *a, **k):
        time.sleep(0.02)
        return self.inner(*a, **k)


def local_client(app):
    """An in-process client that calls the server by a loopback name, as a local browser does."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1:8000")


def make_client(loaded, key=None, **limits):
    from chatlora.serve.app import Server, build_app

    run, model = loaded
    return local_client(build_app(Server(run, model, ServeConfig(**limits)), key))


def chat_body(**extra):
    return {"messages": [{"role": "user", "content": "你是谁？"}], "temperature": 0, "max_tokens": 8, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def running(server, key: str | None = None):
    """A real uvicorn server for `server` (a serve.app.Server) on a free loopback port, in a thread;
    yields its URL."""
    from chatlora.serve.app import in_background

    return in_background(server, key)


def worker_faults_and_cut(run, model) -> None:
    """The generation thread over the decoder (continuous batching): a step that raises fails only
    the requests of that batch; the next request is generated as `generate` would; `cut` (SIGTERM's
    path) ends running and queued requests with finish reason "shutdown" (4 rows: 2 of 6 wait)."""
    import asyncio

    import chatlora.decode.engine as generate
    from chatlora.decode.engine import Sampling, generate_ids
    from chatlora.serve.worker import Job, Worker

    prompt = run.fmt.prompt([{"role": "user", "content": "你是谁？"}])
    long, short = (Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.0) for n in (150, 20))

    async def reply(worker, job):
        worker.submit(job)
        text = ""
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                text += value
            else:
                return kind, value, job.generated, text

    async def scenario():
        loop = asyncio.get_running_loop()
        worker = Worker(model, run.tok, [], queue_size=8, max_batch=4)
        new = lambda s=long: Job(prompt, s, [], loop, time.monotonic() + 120)  # noqa: E731
        decoder = generate.static_decoder(model)
        assert worker.ready.wait(600)   # the warm-up steps are not the ones that fail
        step, calls = decoder.advance, {"n": 0}

        def failing_once():
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("a step failed")
            return step()

        decoder.advance = failing_once
        failed = await asyncio.gather(*(reply(worker, new()) for _ in range(2)))
        decoder.advance = step
        assert [f[0] for f in failed] == ["error", "error"] and worker.alive
        whole = await reply(worker, new(short))
        running = [asyncio.ensure_future(reply(worker, new())) for _ in range(6)]
        while sum(j.generated > 0 for j in list(worker.active)) < 2:
            await asyncio.sleep(0.01)
        worker.cut(0.0)
        ended = await asyncio.gather(*running)
        worker.close()
        worker.thread.join(60)   # the decoder is the thread's until it has stopped
        return whole, ended

    whole, ended = asyncio.run(scenario())
    assert whole[:3] == ("done", "length", 20)
    assert whole[3] == run.tok.decode(generate_ids(model, prompt, [], short)[0]).rstrip("\ufffd")
    assert [e[1] for e in ended] == ["shutdown"] * 6 and max(e[2] for e in ended) < 150


# ---------------------------------------------------------------- training


def config_for(index_dir, data, **train):
    overrides = [f"train.{k}={v}" for k, v in train.items()]
    return load_config(overrides=overrides, flags={"model.path": str(index_dir), "data.path": str(data),
                                                   "data.system_prompt": "现在你要扮演皇帝身边的女人--甄嬛"})


def examples_for(index_tok, rows):
    from chatlora.data.dataset import Example

    fmt = chat_format("index", index_tok)
    out = []
    for r in rows:
        ids, labels = fmt.render([{"role": "user", "content": r["instruction"]},
                                  {"role": "assistant", "content": r["output"]}])
        out.append(Example(ids, labels, 0))
    return out


def fresh_lora_model(index_dir, dropout=0.0, seed=0):
    torch.manual_seed(seed)
    cfg = load_config(overrides=[f"lora.dropout={dropout}"])
    model = attach(load_model(prepare_base(str(index_dir)), "float32", "cpu"), cfg.lora)
    for name, p in trainable_parameters(model):  # B starts at zero: give it values so grads flow everywhere
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


def grads(model):
    return {n: p.grad.clone() for n, p in trainable_parameters(model)}


def run_step(model, examples, micro, collate):
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, examples, micro, collate)
    return loss.item(), grads(model)


def cli_train(run, index_dir, data, *extra, env=None, wait=True, kill_at=None):
    """`chatlora train` in its own process; `kill_at=(step, micro)`: SIGKILLed there (kill_mid_step.py)."""
    command = [sys.executable, "-m", "chatlora"] if kill_at is None else \
        [sys.executable, str(Path(__file__).with_name("kill_mid_step.py")), *map(str, kill_at)]
    args = [*command, "train", "--model", str(index_dir), "--data", str(data),
            "--system", "现在你要扮演皇帝身边的女人--甄嬛", "--output", str(run), "--examples-per-step", "4",
            "--micro-batch-examples", "2", "--save-every", "2", "--eval-every", "0", "--max-steps", "12",
            "--set", "train.learning_rate=0.002", *extra]
    env = dict(os.environ, **(env or {}))
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def step_losses(run):
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def max_adapter_diff(a, b):
    ta, tb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert ta.keys() == tb.keys()
    return max((ta[k] - tb[k]).abs().max().item() for k in ta)


# ---------------------------------------------------------------- the decode kernels

# The Triton decode kernels (chatlora/decode/kernels.py) against the torch operations they replace: one
# check for both runs, compiled on a GPU (tests/test_gpu.py, fp32 and bf16) and on CPU under Triton's
# interpreter (tests/test_kernels.py, fp32). Errors are relative (norm of the difference over the norm
# of the reference) and must stay under `tol`.

# one configuration of each of `linear`'s code paths besides its defaults: small blocks so that the
# test shapes take several programs and several loop iterations, with a masked tail
CONFIGS = [None, {"BLOCK_N": 16, "BLOCK_K": 64, "MMA": True, "num_warps": 4, "num_stages": 2},
           {"BLOCK_N": 8, "BLOCK_K": 64, "MMA": False, "num_warps": 4, "num_stages": 2}]


def check_kernels(device: str, dtype: torch.dtype, tol: float, head_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    failures = []

    def expect(name, ours, ref):
        err = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < tol:
            failures.append(f"{name}: relative error {err:.2e}")

    # element-wise kernels (batch 3, GQA 4:2, cache of 16 columns, each row written at its own column)
    b, nq, nkv, hd, cap = 3, 4, 2, head_dim, 16
    y, cos, sin, w = rand(b, (nq + 2 * nkv) * hd), rand(b, hd), rand(b, hd), rand((nq + 2 * nkv) * hd)
    slot = torch.tensor([5, 0, 11], device=device)
    kc, vc = rand(b, nkv, cap, hd), rand(b, nkv, cap, hd)
    kc_ref, vc_ref, kc_before = kc.clone(), vc.clone(), kc.clone()
    expect("rope_to_cache q", kernels.rope_to_cache(y, cos, sin, slot, kc, vc, nq, nkv),
           kernels.rope_to_cache_reference(y, cos, sin, slot, kc_ref, vc_ref, nq, nkv))
    expect("rope_to_cache k", kc, kc_ref)
    if not torch.equal(vc, vc_ref):
        failures.append("rope_to_cache v: not copied exactly")
    written = torch.zeros(b, cap, dtype=torch.bool, device=device)
    written[torch.arange(b, device=device), slot] = True
    if not (torch.equal((kc != kc_before).any(-1).any(1), written)
            and torch.equal(vc.transpose(1, 2)[written].reshape(b, nkv * hd), y[:, (nq + nkv) * hd:])):
        failures.append("rope_to_cache: v not written at each row's own column")
    expect("rms_norm", kernels.rms_norm(y, w, 1e-6), F.rms_norm(y, (y.shape[1],), w, 1e-6))
    half = y.shape[1] // 2
    expect("silu_mul", kernels.silu_mul(y), F.silu(y[:, :half]) * y[:, half:])

    # linear: 40 outputs (not a multiple of the blocks), 300 inputs (a masked tail), 1, 3, 16 rows
    n, k = 40, 300
    weight, norm = rand(n, k), rand(k)
    for rows in (1, 3, kernels.LINEAR_ROWS):
        x, gu, res = rand(rows, k), rand(rows, 2 * k), rand(rows, n)
        for config in CONFIGS:
            if config and not config["MMA"] and rows > 1:
                continue
            tag = f"linear rows {rows} {config and config['BLOCK_N']}"
            expect(f"{tag} plain", kernels.linear(x, weight, config=config), x @ weight.t())
            expect(f"{tag} norm", kernels.linear(x, weight, norm=norm, eps=1e-6, config=config),
                   F.rms_norm(x, (k,), norm, 1e-6) @ weight.t())
            out = kernels.linear(gu, weight, gated=True, residual=res.clone(), config=config)
            expect(f"{tag} gated + residual", out - res, (F.silu(gu[:, :k]) * gu[:, k:]) @ weight.t())
            logits = kernels.linear(x, weight, norm=norm, eps=1e-6, out_dtype=torch.float32, config=config)
            if logits.dtype != torch.float32:
                failures.append(f"{tag}: logits are {logits.dtype}")
            expect(f"{tag} fp32 out", logits, F.rms_norm(x.float(), (k,), norm.float(), 1e-6) @ weight.float().t())

    # attention: 2 rows, GQA 4:2, in one program per head (100 columns) and in chunks merged by a
    # second kernel (192 columns: two chunks of 128); row 0's first 130 columns (its whole first
    # chunk) masked, row 1 with scattered valid columns
    cap = 200
    q, kc, vc = rand(2, nq, 1, hd), rand(2, nkv, cap, hd), rand(2, nkv, cap, hd)
    valid = torch.rand(2, cap, generator=g).to(device) > 0.3
    valid[0, :130] = False
    valid[:, 90] = valid[:, 150] = True
    for attend in (100, 192):
        mask = torch.zeros(2, 1, 1, attend, dtype=dtype, device=device).masked_fill_(
            ~valid[:, None, None, :attend], float("-inf"))
        want = F.scaled_dot_product_attention(q, kc[:, :, :attend].repeat_interleave(2, 1),
                                              vc[:, :, :attend].repeat_interleave(2, 1), attn_mask=mask,
                                              scale=hd ** -0.5)
        expect(f"decode_attention {attend}", kernels.decode_attention(q, kc, vc, valid, attend, hd ** -0.5),
               want.transpose(1, 2).reshape(2, nq * hd))
    assert not failures, "\n".join(failures)


def rope_qkv_reference(y, cos, sin, heads: int, kv_heads: int, norms=None, eps: float = 1e-6):
    """What train/kernels.rope_qkv computes, in torch's operations on `y`'s dtype: q and k rotated
    together (models.arch.rotate) and v, from the q/k/v projection's output y [T, width]; with
    `norms` (q_norm, k_norm weights), each q and k head RMS-normed first."""
    import torch

    from chatlora.models.arch import rotate

    hd = cos.shape[-1]
    width = (heads + kv_heads) * hd
    qk = y[:, :width].unflatten(-1, (heads + kv_heads, hd))
    if norms is not None:
        weights = torch.cat([norms[0].to(y.dtype).expand(heads, hd), norms[1].to(y.dtype).expand(kv_heads, hd)])
        qk = qk * torch.rsqrt(qk.pow(2).mean(-1, keepdim=True) + eps) * weights
    qk = rotate(qk, cos.to(y.dtype)[:, None], sin.to(y.dtype)[:, None])
    return qk, y[:, width:].unflatten(-1, (kv_heads, hd))


def check_rope_qkv(y, cos, sin, heads: int, kv_heads: int, tol: float, norms=None) -> None:
    """train/kernels.rope_qkv on `y` (requires grad), forward and backward, against
    `rope_qkv_reference` in float64; v must come out unchanged. `norms`: Qwen3's q/k norm weights."""
    import torch

    from chatlora.train import kernels

    qk, v = kernels.rope_qkv(y, cos, sin, heads, kv_heads, *(norms or ()))
    dqk, dv = torch.randn_like(qk), torch.randn_like(v)
    (dy,) = torch.autograd.grad([qk, v], [y], [dqk, dv])
    y64 = y.detach().double().requires_grad_(True)
    qk64, v64 = rope_qkv_reference(y64, cos, sin, heads, kv_heads, norms)
    (dy64,) = torch.autograd.grad([qk64, v64], [y64], [dqk.double(), dv.double()])
    assert ((qk.double() - qk64).norm() / qk64.norm()).item() < tol and torch.equal(v.double(), v64), "rope forward"
    assert ((dy.double() - dy64).norm() / dy64.norm()).item() < tol, "rope backward"


def run_interpreted(script: str, **env) -> subprocess.CompletedProcess:
    """`script` in its own Python process under Triton's interpreter (chosen when kernels are
    defined, so never in this process), the kernels switched on."""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1", CHATLORA_TRITON="1", **env))


def packed_attention_reference(qk, v, starts: list[int], heads: int, scale: float, left: int):
    """What train/attention_kernels.packed_attention computes, by a mask over the whole row: causal,
    within each sequence between consecutive `starts` (and `left` keys back when >= 0)."""
    tokens, kv_heads = qk.shape[0], qk.shape[1] - heads
    sequence = torch.full((tokens,), -1, device=qk.device)
    for i, (lo, hi) in enumerate(zip(starts, starts[1:])):
        sequence[lo:hi] = i
    r = torch.arange(tokens, device=qk.device)
    allowed = (sequence[:, None] == sequence[None, :]) & (r[None, :] <= r[:, None])
    if left >= 0:
        allowed &= r[None, :] >= r[:, None] - left
    k = qk[:, heads:].repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("thd,shd->hts", qk[:, :heads], k) * scale
    p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
    return torch.einsum("hts,shd->thd", p, v.repeat_interleave(heads // kv_heads, 1))


# sequences (lengths; the rest of the row is one more, the padding, then empty slots), slots, heads,
# K/V heads, head size, window (`left`; -1: none): lengths across block boundaries, one-token
# sequences, grouped heads 2:1 and 6:1, a window shorter than the sequences
ATTENTION_CASES = [((5, 16, 17, 40, 1), 8, 4, 2, 16, -1), ((5, 16, 17, 40, 1), 8, 4, 2, 32, 7),
                   ((30, 3, 33), 4, 6, 1, 16, -1)]


def check_packed_attention(device: str, dtype: torch.dtype, tol: float, cases=ATTENTION_CASES,
                           attention=None) -> None:
    """train/attention_kernels.packed_attention (or `attention`, same arguments), forward and the
    gradients of q/k and v, against `packed_attention_reference` in float64."""
    from chatlora.train import attention_kernels

    attention = attention or attention_kernels.packed_attention
    g = torch.Generator().manual_seed(0)
    for lengths, slots, heads, kv_heads, dim, left in cases:
        tokens = sum(lengths) + 3
        starts = [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        starts = starts + [starts[-1]] * (slots - len(starts)) + [tokens]
        qk = torch.randn(tokens, heads + kv_heads, dim, generator=g).to(device, dtype).requires_grad_(True)
        v = torch.randn(tokens, kv_heads, dim, generator=g).to(device, dtype).requires_grad_(True)
        out = attention(qk, v, torch.tensor(starts, dtype=torch.int32, device=device), heads, dim ** -0.5, left)
        dout = torch.randn(out.shape, generator=g).to(device, dtype)
        dqk, dv = torch.autograd.grad(out, [qk, v], dout)
        qk64, v64 = (x.detach().double().requires_grad_(True) for x in (qk, v))
        want = packed_attention_reference(qk64, v64, starts, heads, dim ** -0.5, left)
        dqk64, dv64 = torch.autograd.grad(want, [qk64, v64], dout.double())
        for name, ours, ref in (("out", out, want), ("dqk", dqk, dqk64), ("dv", dv, dv64)):
            err = ((ours.double() - ref).norm() / ref.norm()).item()
            assert err < tol, f"packed attention {name} {lengths} left {left}: relative error {err:.2e}"
