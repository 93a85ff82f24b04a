"""The fast training pass computes the peft model's loss and LoRA gradients (CPU, float32).

The CUDA-graph replay of the same pass is compared with its eager run in tests/test_gpu.py."""

import pytest
import torch
from helpers import examples_for

from chatlora.config import load_config
from chatlora.models.load import load_model, prepare_base
from chatlora.models.lora import attach, trainable_parameters
from chatlora.templates import IGNORE
from chatlora.testing import make_index_dir
from chatlora.train.fused import unsupported_reason
from chatlora.train.fused_step import FusedStep
from chatlora.train.gradients import accumulate_gradients
from chatlora.train.packed_row import PassShape, host_row, pass_shape, row_parts
from chatlora.train.steps import pack


def lora_model(index_dir, targets=None, dropout=0.0, rslora=False):
    torch.manual_seed(0)
    overrides = [f"lora.dropout={dropout}", f"lora.rslora={str(rslora).lower()}"]
    if targets:
        overrides.append("lora.targets=[" + ",".join(targets) + "]")
    cfg = load_config(overrides=overrides)
    model = attach(load_model(prepare_base(str(index_dir)), "float32", "cpu"), cfg.lora)
    for name, p in trainable_parameters(model):  # B starts at zero: give it values so every grad flows
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train(), cfg


@pytest.fixture(scope="module")
def gqa_index_dir(tmp_path_factory, sp_model_file):
    return make_index_dir(tmp_path_factory.mktemp("Index-gqa"), sp_model_file, num_key_value_heads=2)


def reference_and_fast(model, examples, micro_batch_examples=16, max_tokens=None):
    """(loss, gradients) of the eager peft path, then of the fast path, on the same model."""
    ref_loss = accumulate_gradients(model, examples, micro_batch_examples, lambda ex: pack(ex)).item()
    ref = {n: p.grad.clone() for n, p in trainable_parameters(model)}
    model.zero_grad(set_to_none=True)
    fast = FusedStep(model, "cpu")
    fast.zero_grad()
    loss = fast.accumulate(examples, micro_batch_examples, max_tokens).item()
    return ref_loss, ref, loss, {n: p.grad.clone() for n, p in trainable_parameters(model)}


def assert_same(ref_loss, ref, loss, grads, tol=1e-5):
    assert loss == pytest.approx(ref_loss, rel=tol)
    assert ref.keys() == grads.keys() and len(ref) > 0
    for name in ref:
        err = (grads[name] - ref[name]).norm() / ref[name].norm()
        assert err < tol * 10, (name, float(err))


@pytest.mark.parametrize("case", ["the self-llm targets", "q,v only", "grouped query attention", "rsLoRA"])
def test_fast_pass_equals_peft(case, index_dir, gqa_index_dir, index_tok, huanhuan_rows):
    directory = gqa_index_dir if case == "grouped query attention" else index_dir
    model, cfg = lora_model(directory, targets=["q_proj", "v_proj"] if case == "q,v only" else None,
                            rslora=case == "rsLoRA")
    assert unsupported_reason(model, cfg.lora) is None
    examples = examples_for(index_tok, huanhuan_rows[:12])
    assert_same(*reference_and_fast(model, examples))


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_fast_pass_equals_peft_for_each_family(family, family_dir, index_tok, huanhuan_rows):
    """Llama 3 (RoPE scaling, tied embeddings, own head_dim), Qwen2 (q/k/v biases), Qwen3 (q/k norms),
    Mistral (a sliding window of 8 tokens, which most examples here are longer than)."""
    model, cfg = lora_model(family_dir(family))
    assert unsupported_reason(model, cfg.lora) is None
    examples = examples_for(index_tok, huanhuan_rows[:12])
    assert sum(len(e.input_ids) > 8 for e in examples) >= 6
    assert_same(*reference_and_fast(model, examples))


def test_passes_split_by_tokens_accumulate_like_one_pass(index_dir, index_tok, huanhuan_rows):
    """Several passes per step (token cap), each padded to its bucket: the step's loss normalization
    (sum / supervised tokens of the whole step) is kept."""
    model, _ = lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[20:36])
    assert_same(*reference_and_fast(model, examples, micro_batch_examples=5, max_tokens=300))


def test_peft_parameters_stay_live_views(index_dir, index_tok, huanhuan_rows):
    """After the fast path takes over, an optimizer step on the peft parameters changes what the fast
    pass computes, and the eager model (evaluation, saving) sees the same weights."""
    model, _ = lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[:8])
    fast = FusedStep(model, "cpu")
    params = [p for _, p in trainable_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2)
    fast.zero_grad()
    before = fast.accumulate(examples, 16, None).item()
    opt.step()
    fast.zero_grad()
    after = fast.accumulate(examples, 16, None).item()
    assert after < before
    model.zero_grad(set_to_none=True)
    eager = accumulate_gradients(model, examples, 16, lambda ex: pack(ex)).item()
    assert eager == pytest.approx(after, rel=1e-5)


def test_dropout_is_active_and_per_module(index_dir, index_tok, huanhuan_rows):
    """With dropout the loss changes from draw to draw, stays finite, and each module of a stacked
    group (q, k, v) draws its own mask: feeding identical adapters gives different updates."""
    model, cfg = lora_model(index_dir, dropout=0.5)
    examples = examples_for(index_tok, huanhuan_rows[:8])
    fast = FusedStep(model, "cpu")
    losses = []
    for _ in range(2):
        fast.zero_grad()
        losses.append(fast.accumulate(examples, 16, None).item())
    assert losses[0] != losses[1] and all(torch.isfinite(torch.tensor(losses)))
    net = fast.net
    group = net.layers[0].projections["qkv"]
    assert group.stacked and len(group.adapters) == 3
    w = net.adapter_weights(torch.ones(net.flat.numel()))  # all adapter entries equal: updates differ only by mask
    x = torch.randn(7, net.arch.hidden)
    y = net._linear(group, x, w) - x @ group.base.weight.t()
    q, k, v = y.chunk(3, dim=1)
    assert not torch.allclose(q, k) and not torch.allclose(k, v)


def test_host_row_layout_and_padding(index_tok, huanhuan_rows):
    examples = examples_for(index_tok, huanhuan_rows[:2])
    n = sum(len(e.input_ids) for e in examples)
    shape = PassShape(256, 128, 16)
    row = host_row(examples, shape)
    parts = row_parts(row, shape)
    ids, pos, seg, sup, tgt = (parts[k] for k in ("ids", "positions", "segments", "supervised", "targets"))
    assert [len(parts[k]) for k in parts] == [256, 256, 256, 128, 128, 17]
    assert ids[:n].tolist() == examples[0].input_ids + examples[1].input_ids
    assert pos[:len(examples[0].input_ids) + 1].tolist() == list(range(len(examples[0].input_ids))) + [0]
    assert set(seg[n:].tolist()) == {-1} and set(seg[:n].tolist()) == {0, 1}
    real = int((tgt != IGNORE).sum())
    assert real == sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)
    assert (sup[real:] == 0).all() and (tgt[real:] == IGNORE).all()
    lengths = [len(e.input_ids) for e in examples]   # two examples, the padding, empty slots
    assert parts["starts"].tolist() == [0, lengths[0], n] + [256] * 14


def test_unsupported_models_are_named(smollm2_base, index_dir, family_dir):
    model, cfg = lora_model(index_dir)
    cfg.lora.dora = True
    assert "DoRA" in unsupported_reason(model, cfg.lora)
    model, cfg = lora_model(family_dir("gemma2"))
    reason = unsupported_reason(model, cfg.lora)
    assert "gemma2" in reason and "GeGLU" in reason and "soft-capping" in reason


def test_training_loop_with_fast_path_matches_plain(tmp_path, index_dir, huanhuan_rows):
    """`chatlora train` with the fused pass (eager, CPU) logs the same per-step losses and writes the
    same adapter as the plain peft model (dropout off: both compute the same function)."""
    import json

    from safetensors.torch import load_file

    from chatlora.train.loop import train

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:40]), encoding="utf-8")
    losses, adapters = [], []
    for mode in ("plain", "eager"):
        cfg = load_config(overrides=["train.max_steps=3", "train.learning_rate=0.01", "lora.dropout=0",
                                     f"train.fast_path={mode}", "train.max_grad_norm=1.0"],
                          flags={"model.path": str(index_dir), "data.path": str(data)})
        final = train(cfg, tmp_path / mode)
        rows = [json.loads(x) for x in (tmp_path / mode / "metrics.jsonl").read_text().splitlines()]
        losses.append([r["loss"] for r in rows if "loss" in r])
        adapters.append(load_file(str(final / "adapter_model.safetensors")))
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and len(losses[0]) == 3
    for name, ref in adapters[0].items():
        assert torch.allclose(adapters[1][name], ref, atol=1e-5), name


def test_fast_path_on_request_without_support_is_an_error(tmp_path, smollm2_base):
    from chatlora.errors import UserError
    from chatlora.train.gradients import choose_fused_step

    cfg = load_config(overrides=["train.fast_path=graphs"])
    model, _ = lora_model_for(smollm2_base)
    with pytest.raises(UserError, match="fast_path=graphs"):
        choose_fused_step(model, cfg, "cpu")


def lora_model_for(base):
    cfg = load_config()
    return attach(load_model(base, "float32", "cpu"), cfg.lora), cfg


def test_checkpointed_pass_replays_dropout(index_dir, index_tok, huanhuan_rows):
    """The low-memory pass (recompute each layer and the head in backward) with dropout 0.1 gives the
    same loss and gradients as the stored-activation pass from the same RNG state: the recompute applies
    the same (stored, bit-packed) masks."""
    model, _ = lora_model(index_dir, dropout=0.1)
    examples = examples_for(index_tok, huanhuan_rows[:10])
    fast = FusedStep(model, "cpu")
    fast.net.packed_dropout = True  # both runs draw stored masks; only the checkpointed one recomputes
    results = []
    for checkpoint in (False, True):
        fast.checkpoint = checkpoint
        torch.manual_seed(123)
        fast.zero_grad()
        loss = fast.accumulate(examples, 16, None).item()
        results.append((loss, fast.net.flat.grad.clone()))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6)
    assert ((ga - gb).norm() / ga.norm()) < 1e-5


def test_flat_clipping_equals_torch(index_dir, index_tok, huanhuan_rows):
    model, _ = lora_model(index_dir)
    fast = FusedStep(model, "cpu")
    fast.zero_grad()
    fast.accumulate(examples_for(index_tok, huanhuan_rows[:8]), 16, None)
    params = [p for _, p in trainable_parameters(model)]
    before = [p.grad.clone() for p in params]
    norm = fast.clip_grad_norm_(0.01)
    clipped = [p.grad.clone() for p in params]
    for p, g in zip(params, before):
        p.grad.copy_(g)
    ref_norm = torch.nn.utils.clip_grad_norm_(params, 0.01)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6) and float(norm) > 0.01
    assert all(torch.allclose(a, p.grad, rtol=1e-6, atol=0) for a, p in zip(clipped, params))


def test_stored_masks_are_dropout(index_dir):
    """Bit-packed masks keep each element with probability 1 - p, independently, and scale by 1/(1-p)."""
    from chatlora.train.fused import _apply_mask

    model, _ = lora_model(index_dir, dropout=0.25)
    net = FusedStep(model, "cpu").net
    drops = net._draw_masks(net.layers[0], 128, torch.device("cpu"))
    x = torch.ones(3, 128, net.arch.hidden)
    y = _apply_mask(x, drops["qkv"][0], 0.25)   # the stacked q/k/v group
    kept = (y != 0).float()
    assert kept.mean().item() == pytest.approx(0.75, abs=0.01)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.75)]
    assert (kept[0] != kept[1]).float().mean().item() == pytest.approx(2 * 0.75 * 0.25, abs=0.01)
    assert len(drops) == 4 and all(d is not None for d in drops.values())


def test_checkpointed_pass_equals_peft_without_dropout(index_dir, index_tok, huanhuan_rows):
    model, _ = lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[:12])
    ref_loss = accumulate_gradients(model, examples, 16, lambda ex: pack(ex)).item()
    ref = {n: p.grad.clone() for n, p in trainable_parameters(model)}
    fast = FusedStep(model, "cpu", checkpoint=True)
    fast.zero_grad()
    loss = fast.accumulate(examples, 16, None).item()
    assert_same(ref_loss, ref, loss, {n: p.grad.clone() for n, p in trainable_parameters(model)})


def test_buckets_bound_padding_and_shapes():
    from chatlora.train.packed_row import bucket

    sizes = range(1, 8193)
    assert all(bucket(n, 128) >= n and bucket(n, 128) % 128 == 0 for n in sizes)
    assert all(bucket(n, 128) - n < max(128, n / 8) for n in sizes)
    assert len({bucket(n, 128) for n in sizes}) <= 40


def test_pass_shape_covers_the_pass_with_few_supervised_buckets():
    """Supervised positions are padded to halves of the token bucket (at least BUCKET_SUPERVISED),
    never beyond it: every pass fits its shape, and a token bucket has at most 2 supervised sizes
    (each shape is one capture)."""
    from types import SimpleNamespace

    from chatlora.train.packed_row import BUCKET_SUPERVISED, SUPERVISED_PARTS, pass_shape

    shapes = set()
    for n in range(2, 3000, 37):
        for share in (0.05, 0.3, 0.7, 1.0):
            sup = max(1, int(n * share) - 1)
            ex = SimpleNamespace(input_ids=[5] * n, labels=[IGNORE] * (n - sup) + [7] * sup)
            tokens, s, sequences = pass_shape([ex])
            assert sequences == 16
            assert tokens >= n and sup <= s <= tokens
            assert s % max(BUCKET_SUPERVISED, tokens // SUPERVISED_PARTS) == 0 or s == tokens
            shapes.add((tokens, s))
    per_bucket = {}
    for t, s in shapes:
        per_bucket.setdefault(t, set()).add(s)
    assert max(len(v) for v in per_bucket.values()) <= 2


def test_shapes_are_captured_on_their_second_pass(index_dir, index_tok, huanhuan_rows, monkeypatch):
    """What FusedStep captures when (CUDA graphs stood in for on CPU by a "graph" that reruns the
    pass on its static row): a shape's first pass runs eagerly, its second is captured after the
    warm-up passes the first capture wants (its own eager pass counting as one, their gradients
    discarded), later ones replay; held-out passes are their own graphs, captured at the second
    evaluation, and never touch the gradients. Losses and gradients equal the eager step's throughout."""
    from collections import Counter

    from chatlora.train.fused_step import Captured, GraphKey
    from chatlora.train.steps import micro_batches

    model, _ = lora_model(index_dir)
    step, held_out = examples_for(index_tok, huanhuan_rows[:8]), examples_for(index_tok, huanhuan_rows[8:20])
    reference = FusedStep(model, "cpu")
    reference.zero_grad()
    loss, grad = reference.accumulate(step, 16, None).item(), reference.net.flat.grad.clone()
    held = reference.held_out_loss_sum(held_out, 16, 200).item()

    fast = FusedStep(model, "cpu")
    fast.graphs, captures, passes = True, [], []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: None)
    monkeypatch.setattr(fast, "_on_side_stream", lambda work: work())
    counting = fast._pass
    monkeypatch.setattr(fast, "_pass", lambda key, row: passes.append(key) or counting(key, row))

    class Rerun:   # a stand-in graph: replaying reruns the pass on the captured row
        def __init__(self, run):
            self.replay = run

    def capture(key, static):
        captures.append(key)
        out = torch.zeros(())
        return Captured(static, Rerun(lambda: out.copy_(counting(key, static))), out)

    monkeypatch.setattr(fast, "_capture", capture)
    key = GraphKey(pass_shape(step), backward=True)
    for use, eager_passes in ((1, 1), (2, 1), (3, 0)):   # second use: one warm-up (the first pass counts as the other)
        passes.clear()
        fast.zero_grad()
        got = fast.accumulate(step, 16, None).item()
        assert captures == ([key] if use > 1 else []) and len(passes) == eager_passes, (use, captures, passes)
        assert got == pytest.approx(loss, rel=1e-6)
        assert ((fast.net.flat.grad - grad).norm() / grad.norm()).item() < 1e-6, use
    before = fast.net.flat.grad.clone()
    uses = Counter(pass_shape(c) for c in micro_batches(held_out, len(held_out), 200))   # by tokens alone
    for evaluation in (1, 2, 3):
        assert fast.held_out_loss_sum(held_out, 16, 200).item() == pytest.approx(held, rel=1e-6)
        captured = {k.shape for k in captures if not k.backward}
        assert captured == {s for s, n in uses.items() if n > 1 or evaluation > 1}, (evaluation, uses)
    assert len(uses) > 1 and torch.equal(fast.net.flat.grad, before)


def test_held_out_loss_through_the_fused_pass_equals_peft_in_eval_mode(index_dir, index_tok, huanhuan_rows):
    """Evaluation through the fused forward pass (no dropout, no gradients) gives what the plain peft
    model gives in eval mode, and leaves no gradient behind; with dropout the pass would differ."""
    from chatlora.train.steps import held_out_loss, supervised_count

    model, _ = lora_model(index_dir, dropout=0.3)
    examples = examples_for(index_tok, huanhuan_rows[:12])
    ref = held_out_loss(model, examples, 4, "cpu", 300)
    assert model.training
    fast = FusedStep(model, "cpu")
    fast.zero_grad()
    got = fast.held_out_loss_sum(examples, 4, 300).item() / supervised_count(examples)
    assert got == pytest.approx(ref, rel=1e-5)
    assert fast.net.flat.grad.abs().sum() == 0
    shape = pass_shape(examples)
    row = host_row(examples, shape)
    with torch.no_grad():   # the same examples in one pass, dropout on
        dropped = fast.net.loss_sum(**row_parts(row, shape)).item() / supervised_count(examples)
    assert abs(dropped - ref) > 1e-3


def test_training_evaluates_through_the_fused_pass_as_the_plain_path_does(index_dir, tiny_data, tmp_path):
    """The loop's held-out losses (the base model's, every eval_every steps, the final one) are the
    same through the fused pass as through the plain peft model (dropout off: the same training)."""
    import json

    from helpers import config_for

    from chatlora.train.loop import train

    held = {}
    for path in ("plain", "eager"):
        cfg = config_for(index_dir, tiny_data, max_steps=4, eval_every=2, fast_path=path)
        cfg.lora.dropout, cfg.data.held_out_fraction = 0.0, 0.2
        train(cfg, tmp_path / path)
        rows = [json.loads(x) for x in (tmp_path / path / "metrics.jsonl").read_text().splitlines()]
        held[path] = [(r["step"], r["held_out_loss"]) for r in rows if "held_out_loss" in r]
    assert [s for s, _ in held["eager"]] == [s for s, _ in held["plain"]] == [0, 2, 4]
    for (_, a), (_, b) in zip(held["eager"], held["plain"]):
        assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_chunked_cross_entropy_equals_the_full_one(rows):
    """The fused pass's vocabulary projection + cross-entropy, a chunk of rows at a time with the input's
    gradient computed in the forward pass, against torch's over the whole logits in float64: the
    loss and the gradient (scaled as the pass scales the loss), ignored positions included; without
    gradients (evaluation) the same loss."""
    import torch.nn.functional as F

    from chatlora.train.head import chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (37,), generator=g)
    targets[[3, 7, 30]] = IGNORE
    loss = chunked_cross_entropy(x, w, targets, rows=rows)
    (grad,) = torch.autograd.grad(loss / 7, x)
    x64 = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(x64 @ w.double().t(), targets, ignore_index=IGNORE, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref / 7, x64)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < 1e-6
    with torch.no_grad():
        assert chunked_cross_entropy(x, w, targets, rows=rows).item() == pytest.approx(ref.item(), rel=1e-6)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_the_flat_optimizer_updates_and_saves_as_adamw_over_the_parameters(amsgrad):
    """AdamW on one flat tensor whose views are the parameters (train/flat_optimizer.py) moves every
    parameter exactly as torch's fused AdamW over the parameters does, bit for bit, over steps with
    new gradients and learning rates, and skips a step flagged not finite as it does (no update, not
    counted); its state dict is AdamW's, tensor for tensor (so checkpoints are the same files); and
    loaded from AdamW's state dict it goes on identically. With amsgrad, its third moment travels
    the same way."""
    from chatlora.train.flat_optimizer import FlatAdamW

    g = torch.Generator().manual_seed(0)
    shapes = [(8, 24), (40, 8), (8, 16), (16, 8)]
    flat = torch.randn(sum(a * b for a, b in shapes), generator=g).requires_grad_(True)
    flat.grad = torch.zeros_like(flat)
    starts = [0, 192, 512, 640]
    views = [flat.detach()[s:s + a * b].view(a, b) for s, (a, b) in zip(starts, shapes)]
    params = [torch.nn.Parameter(torch.empty(0)) for _ in shapes]
    for p, v, s, (a, b) in zip(params, views, starts, shapes):
        p.data = v
        p.grad = flat.grad[s:s + a * b].view(a, b)
    order = [2, 0, 3, 1]                                   # the optimizer's order is not the buffer's
    ours = FlatAdamW([params[i] for i in order], flat, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    reference = [torch.nn.Parameter(v.clone()) for v in views]
    theirs = torch.optim.AdamW([reference[i] for i in order], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad,
                             fused=True)
    for step in range(3):
        flat.grad.copy_(torch.randn(flat.shape, generator=g))
        for r, p in zip(reference, params):
            r.grad = p.grad.clone()
        for opt in (ours, theirs):
            opt.param_groups[0]["lr"] = 1e-2 / (step + 1)
            opt.step()
        assert all(torch.equal(p, r) for p, r in zip(params, reference))
    before = [p.clone() for p in params]
    for opt in (ours, theirs):   # a step whose figures were not finite: no update, not counted
        opt.found_inf = torch.ones(())
        opt.step()
        opt.found_inf = None
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    mine, want = ours.state_dict(), theirs.state_dict()
    assert mine["state"][0]["step"].item() == want["state"][0]["step"].item() == 3
    assert mine["param_groups"] == want["param_groups"] and mine["state"].keys() == want["state"].keys()
    for i in want["state"]:
        assert mine["state"][i].keys() == want["state"][i].keys()
        assert all(torch.equal(mine["state"][i][k], v) for k, v in want["state"][i].items())
    assert ("max_exp_avg_sq" in want["state"][0]) == amsgrad
    again = FlatAdamW([params[i] for i in order], flat, lr=1e-2, weight_decay=0.1, amsgrad=amsgrad)
    again.load_state_dict(want)
    flat.grad.copy_(torch.randn(flat.shape, generator=g))
    for r, p in zip(reference, params):
        r.grad = p.grad.clone()
    again.step()
    theirs.step()
    assert all(torch.equal(p, r) for p, r in zip(params, reference))


def test_host_copies_take_views_of_one_storage_in_one_copy_and_each_is_its_own(tmp_path):
    """A checkpoint's CPU copies: views into one storage (the fused pass's flat buffers) come over
    as one copy and are then separate tensors (safetensors refuses shared memory); others one by one."""
    from safetensors.torch import load_file, save_file

    from chatlora.train.checkpoint import host_copies

    flat = torch.arange(24, dtype=torch.float32)
    tensors = {"a": flat[:6].view(2, 3), "b": flat[6:24].view(3, 6), "alone": torch.ones(2), "step": torch.tensor(3.0)}
    copies = host_copies(tensors)
    assert all(torch.equal(copies[k], v) for k, v in tensors.items())
    flat.zero_()
    assert copies["a"].sum() == 15 and copies["b"].sum() == 261     # copies, not views
    assert copies["a"].untyped_storage().data_ptr() != copies["b"].untyped_storage().data_ptr()
    path = tmp_path / "t.safetensors"
    save_file(copies, str(path))
    assert torch.equal(load_file(str(path))["b"], copies["b"])


def test_a_small_lora_update_is_not_lost_on_the_residual_stream(index_dir):
    """In bfloat16 a layer's residual is large beside an adapter's early updates: the o and down
    projections' LoRA update must be added before the residual (as peft's output meets the
    decoder's residual add), not to the residual's rounded sum, where every element below half a
    unit in the last place is dropped. Averaged over the output, the fused projection keeps it."""
    model = attach(load_model(prepare_base(str(index_dir)), "bfloat16", "cpu"), load_config().lora)
    net = FusedStep(model, "cpu").net
    o = net.layers[0].projections["o"]
    d_in, d_out = o.base.weight.shape[1], o.base.weight.shape[0]
    with torch.no_grad():   # every adapter weight a constant: the update is about the same everywhere
        for name, p in trainable_parameters(model):
            if "layers.0.self_attn.o_proj" in name:
                p.fill_(1 / d_in if "lora_A" in name else 0.002)
        x = torch.rand(64, d_in).bfloat16()
        big = (16 + torch.randn(64, d_out)).bfloat16()   # its unit in the last place: 0.125
        w = net.adapter_weights(net.flat)
        out = net._linear(o, x, w, residual=big)
        a, b = o.weights(w)
        update = (x.double() @ a.double().t()) @ b.double().view(d_out, -1).t()
        assert 0.01 < update.mean().item() < 0.06, update.mean()   # below half a unit in the last place
        exact = x.double() @ o.base.weight.double().t() + update + big.double()
    bias = (out.double() - exact).mean().item()
    assert abs(bias) < 0.2 * update.mean().item(), (bias, update.mean().item())
