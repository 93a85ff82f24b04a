"""The static-cache decoder computes transformers' forward: greedy tokens equal `generate`'s (CPU,
float32, graphs off; tests/test_gpu.py checks the captured steps on a GPU).

tests/test_kernels.py runs the Index-model cases again under Triton's CPU interpreter with
CHATLORA_TEST_KERNELS=1, where every decoder must run its one-token steps through the Triton kernels
(`StaticDecoder._fused_step`); in a plain run the kernels are off on CPU."""

import os

import pytest
import torch

import chatlora.generate as generate
from chatlora.fastdecode import StaticDecoder
from chatlora.generate import BatchGeneration, Sampling
from chatlora.model import load_model, prepare_base


@pytest.fixture(params=["index", "smollm2"])
def model(request, index_dir, smollm2_base):
    base = prepare_base(str(index_dir)) if request.param == "index" else smollm2_base
    return load_model(base, "float32", "cpu")


def make_decoder(model) -> StaticDecoder:
    decoder = StaticDecoder(model, graphs=False)
    if os.environ.get("CHATLORA_TEST_KERNELS") == "1":
        assert decoder.kernels and decoder._fused(1)
    return decoder


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_static_decoder_greedy_equals_generate(model, monkeypatch):
    """Rows of different lengths (left padding, dummy rows up to the batch bucket of 4), a cache
    bucket, and steps across several attention buckets (ATTEND_BUCKET lowered to 8)."""
    monkeypatch.setattr("chatlora.fastdecode.ATTEND_BUCKET", 8)
    monkeypatch.setattr("chatlora.fastdecode.CACHE_BUCKET", 16)
    monkeypatch.setattr("chatlora.kernels.ATTENTION_CHUNK", 8)   # with the kernels: chunks merged
    decoder = make_decoder(model)
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    prompts = [[1, 17, 230, 99, 42, 4], [1, 5, 3], [3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 4]]
    s = Sampling(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    got = [[] for _ in prompts]
    for row, token in BatchGeneration(model, prompts, [], [s] * 3):
        got[row].append(token)
    assert got == [hf_greedy(model, p, 20) for p in prompts]


def test_generation_delegates_to_the_decoder(model, monkeypatch):
    decoder = make_decoder(model)
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    s = Sampling(max_new_tokens=12, temperature=0, repetition_penalty=1.3)
    fast = generate.generate_ids(model, [1, 17, 230, 99, 42, 4], [], s)
    monkeypatch.setattr(generate, "static_decoder", lambda m: None)
    assert fast == generate.generate_ids(model, [1, 17, 230, 99, 42, 4], [], s)


def test_teacher_forced_logits_equal_a_full_forward(model):
    decoder = make_decoder(model)
    prompt, tokens = [1, 17, 230, 99, 42, 4], [5, 77, 300, 12, 8, 8, 41]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    ours = decoder.teacher_forced(prompt, tokens)
    assert ours.shape == full.shape
    assert ((ours - full).norm(dim=-1) / full.norm(dim=-1)).max().item() < 1e-5


def test_greedy_picks_on_the_decoder_equal_the_host_loop(model, monkeypatch):
    """All-greedy batches pick on the decoder and run a step ahead (`StaticDecoder.greedy`): same
    tokens and finish reasons as the plain loop, with a repetition penalty, per-row limits, a stop
    id met mid-way and a row dropped by `should_stop`."""
    monkeypatch.setattr("chatlora.fastdecode.ATTEND_BUCKET", 8)
    monkeypatch.setattr("chatlora.fastdecode.CACHE_BUCKET", 16)
    prompts = [[1, 17, 230, 99, 42, 4], [1, 5, 3], [3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 4]]
    limits = [Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.3) for n in (14, 9, 20)]

    def run(decoder):
        monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
        probe = [[] for _ in prompts]
        for row, token in BatchGeneration(model, prompts, [], limits):
            probe[row].append(token)
        stop = probe[2][5]   # an id row 2 meets mid-way
        got = [[] for _ in prompts]
        gen = BatchGeneration(model, prompts, [stop], limits, should_stop=lambda r: r == 1 and len(got[1]) >= 4)
        for row, token in gen:
            got[row].append(token)
        return probe, got, gen.finish_reasons

    decoder, used = make_decoder(model), []
    picks = decoder.greedy
    decoder.greedy = lambda *a: used.append(1) or picks(*a)
    fast = run(decoder)
    plain = run(None)
    assert used and fast == plain
    assert fast[2] == [fast[2][0], "length", "stop"] and len(fast[1][1]) == 4


def test_failing_kernels_leave_the_torch_operations(model, monkeypatch, capsys):
    """Where the Triton kernels cannot compile or disagree, the decoder says so and decodes with
    torch operations (same tokens as `generate`)."""
    import chatlora.kernels as kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "available", lambda device: True)
    monkeypatch.setattr(kernels, "rope_to_cache", broken)
    decoder = StaticDecoder(model, graphs=False)
    assert not decoder.kernels
    assert "fused decode kernels are off (RuntimeError: no compiler here)" in capsys.readouterr().out
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    s = Sampling(max_new_tokens=10, temperature=0, repetition_penalty=1.0)
    assert generate.generate_ids(model, [1, 17, 230, 99, 42, 4], [], s)[0] == hf_greedy(model, [1, 17, 230, 99, 42, 4], 10)
