"""The token engine against transformers' own generate, and the sampling filters."""

import pytest
import torch

from chatlora.decode.engine import Sampling, generate_ids, next_token
from chatlora.models.load import load_model, prepare_base


@pytest.fixture(scope="module")
def tiny_model(index_dir):
    return load_model(prepare_base(str(index_dir)), "float32", "cpu")


def reference_greedy(model, prompt, steps, penalty):
    """Greedy decoding without a KV cache: the whole sequence re-run every step, HF's penalty rule."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            seen = torch.tensor(sorted(set(seq)))
            logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            seq.append(int(logits.argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("penalty", [1.0, 1.1, 1.5])
def test_greedy_equals_uncached_reference(tiny_model, penalty):
    prompt = [0, 17, 230, 3, 999, 42, 4]
    ours, reason = generate_ids(tiny_model, prompt, [], Sampling(max_new_tokens=24, temperature=0,
                                                                 repetition_penalty=penalty))
    assert ours == reference_greedy(tiny_model, prompt, 24, penalty) and reason == "length"


def test_greedy_equals_transformers_generate_on_smollm2(smollm2_base, smollm2_tok):
    from chatlora.templates import chat_format

    model = load_model(smollm2_base, device="cpu")
    fmt = chat_format("auto", smollm2_tok)
    prompt = fmt.prompt([{"role": "user", "content": "Name three colours."}])
    ours, _ = generate_ids(model, prompt, fmt.stop_ids, Sampling(max_new_tokens=20, temperature=0,
                                                                 repetition_penalty=1.1))
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False,
                             repetition_penalty=1.1, eos_token_id=fmt.stop_ids, pad_token_id=0)
    ref = [t for t in ref[0, len(prompt):].tolist() if t not in fmt.stop_ids]
    assert ours == ref


def test_stop_token_ends_generation_and_is_not_returned(tiny_model):
    prompt = [0, 17, 230, 3, 999, 42, 4]
    first, _ = generate_ids(tiny_model, prompt, [], Sampling(max_new_tokens=5, temperature=0))
    tokens, reason = generate_ids(tiny_model, prompt, [first[2]], Sampling(max_new_tokens=5, temperature=0,
                                                                            repetition_penalty=1.0))
    assert reason == "stop" and tokens == first[:2] and first[2] not in tokens


def test_sampling_filters():
    logits = torch.tensor([4.0, 3.9, 1.0, 0.5, -1.0])
    g = torch.Generator().manual_seed(0)
    s = Sampling(temperature=1.0, top_k=2, top_p=1.0, repetition_penalty=1.0)
    picks = {next_token(logits.clone(), torch.tensor([], dtype=torch.long), s, g) for _ in range(200)}
    assert picks == {0, 1}
    # top-p: the first token alone holds 0.95 of the mass, so p=0.8 keeps only it.
    peaked = torch.tensor([10.0, 7.0, 0.0, 0.0])
    s = Sampling(temperature=1.0, top_k=0, top_p=0.8, repetition_penalty=1.0)
    assert {next_token(peaked.clone(), torch.tensor([], dtype=torch.long), s, g) for _ in range(100)} == {0}
    # repetition penalty (HF semantics): a positive logit is divided, a negative one multiplied.
    s = Sampling(temperature=0, repetition_penalty=2.0)
    assert next_token(torch.tensor([3.0, 2.0, -1.0]), torch.tensor([0]), s, g) == 1
    assert next_token(torch.tensor([-1.0, -1.5, -3.0]), torch.tensor([0]), s, g) == 1


def test_rows_sampled_together_draw_what_they_draw_alone():
    """RowSampler: rows with their own temperature, top-k (one of them none), top-p and generator
    pick the same ids together as one by one (`draw`), over many draws."""
    from chatlora.decode.sampling import RowSampler, draw

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)) * 3
    settings = [Sampling(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.0),
                Sampling(temperature=1.3, top_k=0, top_p=0.5, repetition_penalty=1.0),
                Sampling(temperature=1.0, top_k=20, top_p=1.0, repetition_penalty=1.0)]
    together = RowSampler(settings, [torch.Generator().manual_seed(i) for i in range(3)], 50, "cpu")
    alone = [torch.Generator().manual_seed(i) for i in range(3)]
    picks = [together.draw(logits).tolist() for _ in range(100)]
    assert picks == [[draw(logits[r], torch.tensor([], dtype=torch.long), s, g).item()
                      for r, (s, g) in enumerate(zip(settings, alone))] for _ in range(100)]
    assert len({p[1] for p in picks}) > 1 and all(p[0] in logits[0].topk(5).indices for p in picks)


def test_seeded_sampling_is_reproducible(tiny_model):
    prompt = [0, 17, 230, 3, 999, 42, 4]
    s = Sampling(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=3)
    assert generate_ids(tiny_model, prompt, [2], s) == generate_ids(tiny_model, prompt, [2], s)


def test_batched_greedy_equals_one_at_a_time(smollm2_base, smollm2_tok):
    from chatlora.decode.engine import BatchGeneration
    from chatlora.templates import chat_format

    model = load_model(smollm2_base, device="cpu")
    fmt = chat_format("auto", smollm2_tok)
    questions = ["Name three colours.", "What is 2+2? Answer briefly.", "Say hello in French, then explain why."]
    prompts = [fmt.prompt([{"role": "user", "content": q}]) for q in questions]
    samplings = [Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.1) for n in (12, 5, 12)]
    singles = [generate_ids(model, p, fmt.stop_ids, s) for p, s in zip(prompts, samplings)]
    batch = BatchGeneration(model, prompts, fmt.stop_ids, samplings)
    got = [[] for _ in prompts]
    for row, token in batch:
        got[row].append(token)
    assert len(set(map(len, prompts))) > 1, "the prompts differ in length: left padding is exercised"
    assert got == [ids for ids, _ in singles]
    assert batch.finish_reasons == [reason for _, reason in singles]


def test_batched_row_can_be_dropped(tiny_model):
    from chatlora.decode.engine import BatchGeneration

    prompts = [[0, 17, 230, 3, 999, 42, 4], [0, 5, 3, 6, 4]]
    s = Sampling(max_new_tokens=10, temperature=0)
    batch = BatchGeneration(tiny_model, prompts, [], [s, s], should_stop=lambda row: row == 1)
    rows = [row for row, _ in batch]
    assert rows == [0] * 10 and batch.finish_reasons == ["length", "length"]


def test_batched_sampling_follows_each_rows_own_settings(smollm2_base, smollm2_tok):
    """Rows with their own temperature, top-k/p, penalty and seed sample as they would alone."""
    from chatlora.decode.engine import BatchGeneration
    from chatlora.templates import chat_format

    model = load_model(smollm2_base, device="cpu")
    fmt = chat_format("auto", smollm2_tok)
    prompts = [fmt.prompt([{"role": "user", "content": q}]) for q in ("Tell me a story.", "List some fruits.")]
    samplings = [Sampling(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=5),
                 Sampling(max_new_tokens=10, temperature=0, repetition_penalty=1.3)]
    singles = [generate_ids(model, p, fmt.stop_ids, s)[0] for p, s in zip(prompts, samplings)]
    got = [[], []]
    for row, token in BatchGeneration(model, prompts, fmt.stop_ids, samplings):
        got[row].append(token)
    assert got == singles
