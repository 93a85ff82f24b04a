"""The static-cache decoder computes transformers' forward: greedy tokens equal `generate`'s (CPU,
float32, graphs off; tests/test_gpu.py checks the captured steps on a GPU).

tests/test_kernels.py runs the Index-model cases again under Triton's CPU interpreter with
CHATLORA_TEST_KERNELS=1, where every decoder must run its one-token steps through the Triton kernels
(`DecodeModel.fused_step`); in a plain run the kernels are off on CPU."""

import os

import pytest
import torch

import chatlora.decode.engine as generate
from chatlora.decode.engine import BatchGeneration, Sampling
from chatlora.decode.static import StaticDecoder
from chatlora.models.load import load_model, prepare_base


@pytest.fixture(params=["index", "smollm2", "llama3", "qwen2", "qwen3", "mistral"])
def model(request, index_dir, smollm2_base, family_dir):
    """Index, SmolLM2 (tied embeddings), and tiny models of each family's difference: Llama 3's RoPE
    scaling and own head_dim, Qwen2's q/k/v biases, Qwen3's q/k norms, Mistral's sliding window of 8
    (which the tests' prompts and replies cross)."""
    base = prepare_base(str(index_dir)) if request.param == "index" else smollm2_base \
        if request.param == "smollm2" else prepare_base(str(family_dir(request.param)))
    return load_model(base, "float32", "cpu")


def make_decoder(model) -> StaticDecoder:
    decoder = StaticDecoder(model, graphs=False)
    if os.environ.get("CHATLORA_TEST_KERNELS") == "1":
        assert decoder.kernels and decoder.net.fused(1)
    return decoder


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_static_decoder_greedy_equals_generate(model, monkeypatch):
    """Rows of different lengths (left padding, dummy rows up to the batch bucket of 4), a cache
    bucket, and steps across several attention buckets (ATTEND_BUCKET lowered to 8)."""
    monkeypatch.setattr("chatlora.decode.static.ATTEND_BUCKET", 8)
    monkeypatch.setattr("chatlora.decode.static.CACHE_BUCKET", 16)
    monkeypatch.setattr("chatlora.decode.static.PREFILL_BUCKET", 4)
    monkeypatch.setattr("chatlora.decode.kernels.ATTENTION_CHUNK", 8)   # with the kernels: chunks merged
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


def test_more_prompts_than_rows_wait_for_a_free_row(model, monkeypatch):
    """BatchGeneration with max_rows below the number of prompts: the others join as rows free up."""
    decoder = make_decoder(model)
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    prompts = [[1, 17, 230], [1, 5, 3], [3, 77, 78, 79], [9, 8]]
    samplings = [Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.0) for n in (6, 3, 5, 4)]
    got, widest = [[] for _ in prompts], []
    for row, token in BatchGeneration(model, prompts, [], samplings, max_rows=2):
        got[row].append(token)
        widest.append(sum(decoder.live))
    assert max(widest) == 2
    assert got == [hf_greedy(model, p, s.max_new_tokens) for p, s in zip(prompts, samplings)]


def test_teacher_forced_logits_equal_a_full_forward(model):
    decoder = make_decoder(model)
    prompt, tokens = [1, 17, 230, 99, 42, 4], [5, 77, 300, 12, 8, 8, 41]
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
    ours = decoder.teacher_forced(prompt, tokens)
    assert ours.shape == full.shape
    assert ((ours - full).norm(dim=-1) / full.norm(dim=-1)).max().item() < 1e-5


def test_greedy_picks_on_the_decoder_equal_the_host_loop(model, monkeypatch):
    """Picks on the decoder, a step ahead of the host (`StaticDecoder.advance`, decode/loop.py): same
    tokens and finish reasons as the plain loop, with a repetition penalty, per-row limits, a stop
    id met mid-way and a row dropped by `should_stop`."""
    monkeypatch.setattr("chatlora.decode.static.ATTEND_BUCKET", 8)
    monkeypatch.setattr("chatlora.decode.static.CACHE_BUCKET", 16)
    monkeypatch.setattr("chatlora.decode.static.PREFILL_BUCKET", 4)
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
    picks = decoder.advance
    decoder.advance = lambda *a: used.append(1) or picks(*a)
    fast = run(decoder)
    plain = run(None)
    assert used and fast == plain
    assert fast[2] == [fast[2][0], "length", "stop"] and len(fast[1][1]) == 4


def test_failing_kernels_leave_the_torch_operations(model, monkeypatch, capsys):
    """Where the Triton kernels cannot compile or disagree, the decoder says so and decodes with
    torch operations (same tokens as `generate`)."""
    import chatlora.decode.kernels as kernels

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


def test_requests_joining_a_running_batch_equal_their_own_generation(model, monkeypatch):
    """Continuous batching (decode/loop.py): requests admitted while others decode, rows leaving, the
    cache growing in rows (1 -> 4) and columns (a long request) and shrinking again, a seeded
    sampling row among greedy ones. Every request's tokens equal its generation alone."""
    monkeypatch.setattr("chatlora.decode.static.ATTEND_BUCKET", 8)
    monkeypatch.setattr("chatlora.decode.static.CACHE_BUCKET", 16)
    monkeypatch.setattr("chatlora.decode.static.PREFILL_BUCKET", 4)
    decoder = make_decoder(model)
    monkeypatch.setattr(generate, "static_decoder", lambda m: decoder)
    greedy = lambda n: Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.3)  # noqa: E731
    seeded = Sampling(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=7)
    first = ([1, 17, 230, 99, 42, 4], greedy(14))
    later = {2: [([1, 5, 3], greedy(6)), ([3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 4], seeded)],
             9: [([9, 8, 7], greedy(30)),     # needs more columns than the cache has then (32)
                 ([2, 3], Sampling(max_new_tokens=8, temperature=1.2, top_k=0, top_p=0.7, seed=11))],
             12: [([4, 4, 2, 1], greedy(3))]}
    asked = [first] + [r for k in sorted(later) for r in later[k]]
    steps, shapes = [0], []
    fit = decoder.fit

    def watch_fit(rows, columns):
        moved = fit(rows, columns)
        shapes.append((decoder.batch, decoder.state.cap))
        return moved

    def admit(room):
        steps[0] += 1
        return later.pop(steps[0], [])[:room]

    monkeypatch.setattr(decoder, "fit", watch_fit)
    gen = BatchGeneration(model, [first[0]], [], [first[1]], admit=admit, max_rows=4)
    got, order = {}, []
    for row, token in gen:
        got.setdefault(row, []).append(token)
        order.append(row)
    last_of_first = len(order) - 1 - order[::-1].index(0)
    assert order.index(1) < last_of_first and order.index(3) < last_of_first   # they joined mid-way
    assert gen.finish_reasons == ["length"] * 6
    for i, (prompt, s) in enumerate(asked):
        alone = generate.generate_ids(model, prompt, [], s)[0]
        assert got[i] == alone, f"request {i}"
    batches = [b for b, _ in shapes]
    assert 4 in batches and batches[-1] < 4, shapes          # grew for the joiners, shrank at the end
    assert len({c for _, c in shapes}) > 1, shapes             # and took more columns for the long one
