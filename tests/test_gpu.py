"""GPU checks (run on the accelerator machine: pytest -m gpu). Skipped without CUDA."""

import json
from contextlib import nullcontext

import pytest
import torch

from chatlora.config import load_config
from chatlora.models.load import load_model, prepare_base
from chatlora.models.lora import attach, trainable_parameters
from chatlora.train.gradients import accumulate_gradients
from chatlora.train.loop import train
from chatlora.train.steps import pack, pad

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


PROMPTS = [[1, 17, 230, 99, 42, 4], [1, 5, 3], [3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 4]]   # rows of 3 lengths


def greedy_reference(model, prompts, steps: int = 20) -> list[list[int]]:
    """transformers' own greedy tokens for each prompt alone (the reference for the captured decoder)."""
    out = []
    for p in prompts:
        ids = model.generate(torch.tensor([p], device="cuda"), attention_mask=torch.ones(1, len(p), device="cuda"),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def lora_model(index_dir, dtype, quantize="none"):
    torch.manual_seed(0)
    model = attach(load_model(prepare_base(str(index_dir)), dtype, "cuda", quantize),
                   load_config(overrides=["lora.dropout=0"]).lora)
    for name, p in trainable_parameters(model):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.train()


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_packed_equals_padded_on_cuda(index_dir, index_tok, huanhuan_rows, dtype, tol):
    from helpers import examples_for

    model = lora_model(index_dir, dtype)
    examples = examples_for(index_tok, huanhuan_rows[:8])
    results = []
    for collate in (lambda ex: pack(ex, "cuda"), lambda ex: pad(ex, 0, "cuda")):
        model.zero_grad(set_to_none=True)
        loss = accumulate_gradients(model, examples, 4, collate).item()
        grads = torch.cat([p.grad.float().flatten() for _, p in trainable_parameters(model)])
        results.append((loss, grads))
    (a, ga), (b, gb) = results
    assert abs(a - b) / abs(b) < tol
    assert ((ga - gb).norm() / gb.norm()).item() < tol * 10


def test_train_and_chat_on_cuda_in_bf16(index_dir, huanhuan_rows, tmp_path):
    from chatlora.chat import open_chat

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:64]))
    cfg = load_config(overrides=["train.max_steps=4", "train.save_every=2"],
                      flags={"model.path": str(index_dir), "data.path": str(data), "data.system_prompt": "S"})
    train(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("loss", 1.0) == r.get("loss", 1.0) for r in rows) and len([r for r in rows if "loss" in r]) == 4
    chat = open_chat(str(tmp_path / "run"), temperature=0, max_new_tokens=5)
    assert next(chat.model.parameters()).dtype == torch.bfloat16
    assert isinstance(chat.reply("你好"), str)


def test_batched_generation_on_cuda_equals_single(index_dir):
    from chatlora.decode.engine import BatchGeneration, Sampling, generate_ids

    model = load_model(prepare_base(str(index_dir)), "float32", "cuda")
    prompts = [[0, 17, 230, 3, 999, 42, 4], [0, 5, 3, 6, 4], [3, 77, 78, 79, 80, 81, 82, 83, 4]]
    s = Sampling(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    singles = [generate_ids(model, p, [2], s)[0] for p in prompts]
    got = [[] for _ in prompts]
    for row, token in BatchGeneration(model, prompts, [2], [s] * 3):
        got[row].append(token)
    assert got == singles


def losses_and_gradients(make_model, steps, modes) -> dict[str, list]:
    """For each mode ("peft": the plain peft model; "eager", "graphs", "graphs+checkpoint": the fused
    pass), a fresh model from `make_model()` trained on each step's examples from zeroed gradients:
    [(loss, every LoRA gradient flattened)] per step. 300 tokens per pass: 3-4 passes per step."""
    from chatlora.train.fused_step import FusedStep

    results = {}
    for mode in modes:
        model = make_model()
        fast = None if mode == "peft" else FusedStep(model, "cuda", graphs=mode != "eager",
                                                    checkpoint=mode == "graphs+checkpoint", capture_at_use=1)
        out = []
        for examples in steps:
            if fast:
                fast.zero_grad()
                loss = fast.accumulate(examples, 16, 300).item()
            else:
                model.zero_grad(set_to_none=True)
                loss = accumulate_gradients(model, examples, 16, lambda ex: pack(ex, "cuda"), 300).item()
            out.append((loss, torch.cat([p.grad.float().flatten() for _, p in trainable_parameters(model)])))
        results[mode] = out
    return results


def assert_close_steps(results, mode, ref_mode, limit) -> None:
    for (a, ga), (b, gb) in zip(results[mode], results[ref_mode]):
        assert abs(a - b) / abs(b) < limit, (mode, a, b)
        assert ((ga - gb).norm() / gb.norm()).item() < limit * 10, mode


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("bfloat16", 2e-2)])
def test_fast_pass_graphs_equal_eager_and_peft_on_cuda(index_dir, index_tok, huanhuan_rows, dtype, tol):
    """Captured CUDA-graph passes (several bucket shapes, several replays with new data) give the
    eager fused pass's loss and gradients, which give the plain peft model's."""
    from helpers import examples_for

    steps = [examples_for(index_tok, huanhuan_rows[i:i + 16]) for i in (0, 16, 32, 0)]
    results = losses_and_gradients(lambda: lora_model(index_dir, dtype), steps,
                                   ("peft", "eager", "graphs", "graphs+checkpoint"))
    assert_close_steps(results, "graphs", "eager", 1e-5)
    assert_close_steps(results, "graphs+checkpoint", "eager", 1e-5)
    assert_close_steps(results, "eager", "peft", tol)


@pytest.mark.parametrize("family, dtype, tol", [("index", "float32", 1e-4), ("index", "bfloat16", 2e-2),
                                               ("qwen3", "float32", 1e-4), ("qwen2", "bfloat16", 2e-2),
                                               ("llama3", "bfloat16", 2e-2), ("mistral", "float32", 1e-4)])
def test_nf4_captured_pass_equals_peft_on_torchaos_layers_on_cuda(family, dtype, tol, index_dir, family_dir,
                                                                  index_tok, huanhuan_rows):
    """A 4-bit base on the GPU: the captured pass (the Triton kernel de-quantising inside the graph,
    forward and backward, with and without checkpointing) gives the eager pass's loss and gradients,
    which give peft's over torchao's NF4 layers (bf16: within bf16 rounding)."""
    from helpers import examples_for

    from chatlora.models.quantize import is_quantized

    directory = index_dir if family == "index" else family_dir(family)
    assert is_quantized(lora_model(directory, dtype, quantize="nf4"))
    steps = [examples_for(index_tok, huanhuan_rows[i:i + 16]) for i in (0, 16, 0)]
    results = losses_and_gradients(lambda: lora_model(directory, dtype, quantize="nf4"), steps,
                                   ("peft", "eager", "graphs", "graphs+checkpoint"))
    assert_close_steps(results, "graphs", "eager", 1e-5)
    assert_close_steps(results, "graphs+checkpoint", "eager", 1e-5)
    assert_close_steps(results, "eager", "peft", tol)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_each_familys_captured_pass_equals_peft_on_cuda(family, family_dir, index_tok, huanhuan_rows):
    """Float32: each family's captured pass (replayed with new data) gives the plain peft model's
    loss and gradients (tests/test_fastpath.py checks the eager pass on CPU)."""
    from helpers import examples_for

    steps = [examples_for(index_tok, huanhuan_rows[i:i + 16]) for i in (0, 16, 0)]
    results = losses_and_gradients(lambda: lora_model(family_dir(family), "float32"), steps, ("peft", "graphs"))
    assert_close_steps(results, "graphs", "peft", 1e-5)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_per_sequence_attention_is_as_close_to_float32_as_the_mask_pass(family, family_dir, index_tok, huanhuan_rows):
    """bf16 passes attend within each example, by torch's flash kernel and by the packed-row kernel
    (rows with padding, empty sequence slots and, for Mistral, examples longer than its window of 8):
    their loss and gradients are as close to the float32 pass as the mask path's, captured and
    replayed with new data."""
    from helpers import examples_for

    from chatlora.train.fused_step import FusedStep

    steps = [examples_for(index_tok, huanhuan_rows[i:i + 12]) for i in (0, 12)]

    def run(dtype, flash, kernel=False):
        fast = FusedStep(lora_model(family_dir(family), dtype), "cuda", graphs=dtype != "float32", capture_at_use=1)
        fast.net.flash, fast.net.attention_kernel = flash, kernel
        assert fast.net.uses_flash("cuda") == (flash and dtype != "float32")
        out = []
        for examples in steps:
            fast.zero_grad()
            out.append((fast.accumulate(examples, 16, 300).item(), fast.net.flat.grad.float().clone()))
        return out

    reference, masked = run("float32", False), run("bfloat16", False)
    for per_sequence in (run("bfloat16", True), run("bfloat16", True, kernel=True)):   # torch's flash, ours
        for (l32, g32), (lm, gm), (lf, gf) in zip(reference, masked, per_sequence):
            loss_error, mask_loss_error = abs(lf - l32) / l32, abs(lm - l32) / l32
            grad_error, mask_grad_error = ((gf - g32).norm() / g32.norm()).item(), ((gm - g32).norm() / g32.norm()).item()
            assert loss_error < max(2 * mask_loss_error, 2e-3), (loss_error, mask_loss_error)
            assert grad_error < max(1.5 * mask_grad_error, 2e-2), (grad_error, mask_grad_error)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_each_familys_captured_decoder_equals_generate_on_cuda(family, family_dir):
    """Float32, captured steps and kernels: greedy tokens of rows of different lengths equal
    transformers' for 20 steps (Mistral's window of 8 crossed), first run and replay."""
    from chatlora.decode.engine import BatchGeneration, Sampling
    from chatlora.decode.static import static_decoder

    model = load_model(prepare_base(str(family_dir(family))), "float32", "cuda")
    prompts = PROMPTS
    expected = greedy_reference(model, prompts)
    decoder = static_decoder(model)
    assert decoder is not None and decoder.kernels
    s = Sampling(max_new_tokens=20, temperature=0, repetition_penalty=1.0)
    for _ in range(2):
        got = [[] for _ in prompts]
        for row, token in BatchGeneration(model, prompts, [], [s] * 3):
            got[row].append(token)
        assert got == expected


def test_a_shape_is_captured_on_its_second_pass_and_held_out_passes_replay(index_dir, index_tok, huanhuan_rows):
    """Float32. By default a bucket shape's first pass runs eagerly and its second is captured, then
    replayed: the same losses and gradients as the eager pass's every time. A held-out pass's shape
    (forward only, the same examples at every evaluation) is captured at its second use; every
    evaluation gives the eager pass's sum and leaves the gradients alone."""
    from collections import Counter

    from helpers import examples_for

    from chatlora.train.fused_step import FusedStep, GraphKey
    from chatlora.train.packed_row import pass_shape
    from chatlora.train.steps import micro_batches

    step, held_out = examples_for(index_tok, huanhuan_rows[:16]), examples_for(index_tok, huanhuan_rows[16:40])
    eager = FusedStep(lora_model(index_dir, "float32"), "cuda")
    eager.zero_grad()
    loss, grad = eager.accumulate(step, 16, None).item(), eager.net.flat.grad.clone()
    held = eager.held_out_loss_sum(held_out, 16, 300).item()

    fast = FusedStep(lora_model(index_dir, "float32"), "cuda", graphs=True)
    key = GraphKey(pass_shape(step), backward=True)
    for use in (1, 2, 3):
        fast.zero_grad()
        got = fast.accumulate(step, 16, None).item()
        assert (key in fast._captured) == (use > 1), use
        assert abs(got - loss) / loss < 1e-5, (use, got, loss)
        assert ((fast.net.flat.grad - grad).norm() / grad.norm()).item() < 1e-4, use
    before = fast.net.flat.grad.clone()
    # Forward passes: tokens alone bound them. Two passes of one evaluation may share a shape, and
    # then the second is that shape's second use: captured already in the first evaluation.
    passes_per_shape = Counter(pass_shape(c) for c in micro_batches(held_out, len(held_out), 300))
    for evaluation in (1, 2, 3):
        got = fast.held_out_loss_sum(held_out, 16, 300).item()
        assert abs(got - held) / held < 1e-5, (evaluation, got, held)
        used_twice = sum(1 for n in passes_per_shape.values() if n * evaluation >= 2)
        assert sum(not k.backward for k in fast._captured) == used_twice, evaluation
    assert torch.equal(fast.net.flat.grad, before)
    assert fast.capture_failures == []


def test_captures_of_new_shapes_keep_no_memory(index_dir, index_tok, huanhuan_rows):
    """Each captured shape's memory goes back to the shared graph pool: after the first capture,
    capturing more shapes leaves allocated memory flat (a fresh warm-up stream per capture kept a
    cuBLAS workspace each: +64 MiB per shape at full size)."""
    from helpers import examples_for

    from chatlora.train.fused_step import FusedStep

    fast = FusedStep(lora_model(index_dir, "bfloat16"), "cuda", graphs=True, checkpoint=True, capture_at_use=1)
    after = []
    for n in (4, 8, 12, 16, 24):  # a new bucket shape each
        fast.accumulate(examples_for(index_tok, huanhuan_rows[:n]), 32, None)
        torch.cuda.synchronize()
        after.append(torch.cuda.memory_allocated())
    assert len(fast._captured) >= 4
    assert after[-1] - after[0] < 2 * 2 ** 20, [a / 2 ** 20 for a in after]


@pytest.mark.parametrize("failing_tries", [1, 2])
def test_a_failed_capture_is_undone_then_retried_or_run_eagerly(index_dir, index_tok, huanhuan_rows, failing_tries):
    """A capture invalidated midway (here a device-wide synchronize inside it; on fresh machines some
    other CUDA call did it) leaves nothing behind: failing once, the retry captures the shape; failing
    twice, that shape's passes run eagerly, with a warning. Either way the steps' losses and gradients
    equal the eager pass's, later shapes are captured, the current stream is the default one again
    and the RNG generator draws outside a capture."""
    from helpers import examples_for

    from chatlora.train.fused_step import FusedStep

    steps = [examples_for(index_tok, huanhuan_rows[i:i + 16]) for i in (0, 16, 0)]
    expected = []
    eager = FusedStep(lora_model(index_dir, "float32"), "cuda")
    for examples in steps:
        eager.zero_grad()
        expected.append((eager.accumulate(examples, 16, 300).item(), eager.net.flat.grad.clone()))

    fast = FusedStep(lora_model(index_dir, "float32"), "cuda", graphs=True, capture_at_use=1)
    original, left = fast._pass, [failing_tries]

    def invalidating(key, row):
        if torch.cuda.is_current_stream_capturing() and left[0] > 0:
            left[0] -= 1
            torch.cuda.synchronize()   # not permitted while capturing: the capture is invalidated
        return original(key, row)

    fast._pass = invalidating
    with pytest.warns(UserWarning, match="could not be captured") if failing_tries == 2 else nullcontext():
        for examples, (loss, grad) in zip(steps, expected):
            fast.zero_grad()
            got = fast.accumulate(examples, 16, 300).item()
            assert abs(got - loss) / loss < 1e-5
            assert ((fast.net.flat.grad - grad).norm() / grad.norm()).item() < 1e-4
    assert sum(not f.startswith("ending") for f in fast.capture_failures) == failing_tries, fast.capture_failures
    assert (None in fast._captured.values()) == (failing_tries == 2)
    assert sum(c is not None for c in fast._captured.values()) >= 2
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert torch.rand(4, device="cuda").isfinite().all()


def test_non_finite_step_on_cuda_applies_no_update_and_stops_naming_it(index_dir, huanhuan_rows, tmp_path,
                                                                       monkeypatch):
    """On one GPU the loop reads a step's figures one step late; a NaN gradient at step 3 must still
    apply no update (fused AdamW's found_inf, on the device) and stop the run naming step 3, leaving
    checkpoint-2 as the last thing written."""
    from chatlora.errors import UserError
    from chatlora.train.checkpoint import latest_checkpoint
    from chatlora.train.distributed import Ranks
    from chatlora.train.flat_optimizer import FlatAdamW
    from chatlora.train.gradients import FusedGradients, defers_read_back

    updates = []   # whether the adapter weights moved, per optimizer step
    real_step = FlatAdamW.step

    def watched(self):
        before = self.flat.detach().clone()
        real_step(self)
        updates.append(not torch.equal(before, self.flat.detach()))

    real = FusedGradients.clip_grad_norm_
    calls = {"n": 0}

    def poisoned(self, max_norm):
        calls["n"] += 1
        if calls["n"] == 3:   # the adapters' one flat gradient
            self.fast.net.flat.grad.fill_(float("nan"))
        return real(self, max_norm)

    monkeypatch.setattr(FusedGradients, "clip_grad_norm_", poisoned)
    monkeypatch.setattr(FlatAdamW, "step", watched)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:64]))
    cfg = load_config(overrides=["train.max_steps=6", "train.save_every=2", "train.eval_every=0"],
                      flags={"model.path": str(index_dir), "data.path": str(data)})
    assert defers_read_back("cuda", Ranks(0, 1))
    run = tmp_path / "run"
    with pytest.raises(UserError, match="step 3: loss .*gradient norm nan"):
        train(cfg, run)
    assert updates == [True, True, False]
    assert latest_checkpoint(run).name == "checkpoint-2" and not (run / "final").exists()


def test_training_uses_graphs_by_default_on_cuda(index_dir, huanhuan_rows, tmp_path):
    from chatlora.train.gradients import choose_fused_step

    cfg = load_config(flags={"model.path": str(index_dir)})
    model = lora_model(index_dir, "bfloat16")
    step = choose_fused_step(model, cfg, "cuda")
    assert step is not None and step.graphs
    cfg = load_config(preset="lowmem", flags={"model.path": str(index_dir)})
    step = choose_fused_step(lora_model(index_dir, "bfloat16"), cfg, "cuda")
    assert step is not None and step.graphs and step.checkpoint


def test_captured_decoder_follows_the_model_on_cuda(index_dir):
    """Float32 on the GPU: captured decode steps (rows of different lengths padded to a bucket of 4,
    steps across attention buckets, first run capturing and second replaying) give transformers'
    greedy tokens for the first 20 steps, and teacher-forced logits within 1e-5 of one full forward
    over the whole sequence. (Over longer runs greedy picks of a random tiny model can flip at
    near-ties from rounding alone, as transformers' own incremental decoding does: bench/NOTES.md.)"""
    from chatlora.decode.engine import BatchGeneration, Sampling
    from chatlora.decode.static import static_decoder

    model = load_model(prepare_base(str(index_dir)), "float32", "cuda")
    prompts = PROMPTS
    expected = greedy_reference(model, prompts)
    decoder = static_decoder(model)
    assert decoder is not None and decoder.kernels   # the Triton kernels run (kernels.py)
    s = Sampling(max_new_tokens=150, temperature=0, repetition_penalty=1.0)
    for _ in range(2):  # first run captures, second replays
        got = [[] for _ in prompts]
        for row, token in BatchGeneration(model, prompts, [], [s] * 3):
            got[row].append(token)
        assert [g[:20] for g in got] == expected
    prompt, tokens = prompts[0], got[0]
    n = len(prompt)
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt + tokens[:-1]], device="cuda")).logits[0, n - 1:].float()
    ours = decoder.teacher_forced(prompt, tokens)
    assert ((ours - full).norm(dim=-1) / full.norm(dim=-1)).max().item() < 1e-5
    assert (ours.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.97


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_decode_kernels_equal_the_torch_operations(dtype, tol):
    """kernels.py compiled, against the torch operations the decoder uses without them
    (tests/helpers.py: RoPE + cache write, RMSNorm, SiLU*mul, linear's paths, attention)."""
    from helpers import check_kernels

    check_kernels("cuda", dtype, tol, head_dim=64)


def test_requests_join_a_running_captured_batch_on_cuda(index_dir):
    """Float32, captured steps and kernels: requests admitted while others decode (the cache growing
    from 1 to 4 rows and shrinking back, and growing in columns) give transformers' greedy tokens for
    their first 20 steps, as in the test above; a seeded sampling row gives what it gives alone."""
    from chatlora.decode.engine import BatchGeneration, Sampling, generate_ids
    from chatlora.decode.static import static_decoder

    model = load_model(prepare_base(str(index_dir)), "float32", "cuda")
    greedy = lambda n: Sampling(max_new_tokens=n, temperature=0, repetition_penalty=1.0)  # noqa: E731
    seeded = Sampling(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.1, seed=7)
    first = ([1, 17, 230, 99, 42, 4], greedy(60))
    later = {3: [([1, 5, 3], greedy(20)), ([3, 77, 78, 79, 80, 81, 82, 83, 84, 85, 4], seeded)],
             12: [([9, 8, 7], greedy(300))], 30: [([4, 4, 2, 1], greedy(20))]}
    asked = [first] + [r for k in sorted(later) for r in later[k]]
    decoder = static_decoder(model)
    assert decoder is not None and decoder.kernels and decoder.graphs
    for _ in range(2):   # first run captures, second replays
        calls, batches = [0], []

        def admit(room):
            calls[0] += 1
            batches.append(decoder.batch)
            return later.get(calls[0], [])[:room]

        got = {}
        gen = BatchGeneration(model, [first[0]], [], [first[1]], admit=admit, max_rows=4)
        for row, token in gen:
            got.setdefault(row, []).append(token)
        assert gen.finish_reasons == ["length"] * 5 and 4 in batches and batches[-1] < 4, batches
    for i, (prompt, s) in enumerate(asked):
        if s.temperature == 0:
            out = model.generate(torch.tensor([prompt], device="cuda"), attention_mask=torch.ones(1, len(prompt), device="cuda"),
                                 max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)
            assert got[i][:20] == out[0, len(prompt):].tolist(), f"request {i}"
        else:
            assert got[i] == generate_ids(model, prompt, [], s)[0]


def test_warm_up_captures_what_serving_meets(index_dir):
    """After `warm_up(4)`, requests of up to 64 prompt tokens joining and leaving a batch of up to 4
    rows, with replies reaching the cache's last attention bucket, capture nothing new."""
    from chatlora.decode.engine import BatchGeneration, Sampling
    from chatlora.decode.static import static_decoder

    model = load_model(prepare_base(str(index_dir)), "bfloat16", "cuda")
    decoder = static_decoder(model)
    decoder.warm_up(4)
    captured = lambda: {key: set(s.graphs) for key, s in decoder._states.items()}  # noqa: E731
    before = captured()
    assert {(b, 512) for b in (1, 2, 4)} <= set(before)
    s = Sampling(max_new_tokens=440, temperature=0, repetition_penalty=1.0)
    later = [[([5] * 60, s)], [([7, 8, 9], s), ([3] * 30, s)]]
    list(BatchGeneration(model, [[1, 2, 3]], [], [s], max_rows=4,
                         admit=lambda room: later.pop() if later else []))
    assert captured() == before


def test_worker_on_cuda_survives_a_failing_step_and_cuts_replies_on_shutdown(tiny_run):
    """The serving thread over the captured decoder (continuous batching): see
    test_serve_hardening.worker_faults_and_cut, which runs the same on CPU with the uncaptured decoder."""
    from helpers import worker_faults_and_cut

    from chatlora.rundir import load_run, load_tuned_model

    run = load_run(tiny_run)
    worker_faults_and_cut(run, load_tuned_model(run, device="cuda", dtype="float32"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nf4_dequantize_kernel_equals_torchao_on_cuda(dtype):
    """The Triton kernel that de-quantises NF4 weights in the fused pass gives torchao's weights bit
    for bit, for each compute dtype and for second-level blocks smaller than QLoRA's 256."""
    from chatlora.models import quantize

    nf4 = quantize._torchao_nf4()
    for shape in [(1024, 2048), (192, 576), (96, 64)]:
        w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to("cuda", dtype)
        q = nf4.NF4Tensor.from_tensor(w, quantize.BLOCK, quantize.scaler_block_size(w.numel()))
        assert torch.equal(quantize.dequantize(q), q.get_original_weight()), shape


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_packed_attention_kernels_equal_float64_torch_on_cuda(dtype, tol):
    """The packed-row attention kernels compiled, forward and the q/k and v gradients, against float64
    torch: the interpreter's cases with blocks of 16 rows, then real head shapes with the default
    blocks (Index's 16 heads of 128, Qwen2.5's 12 over 2 K/V heads, Llama's 64-wide heads with a
    window) at the self-llm job's lengths and beyond two blocks."""
    from helpers import check_packed_attention

    from chatlora.train import attention_kernels

    default = dict(attention_kernels.LAUNCH)
    try:
        attention_kernels.LAUNCH.update(BM=16, BN=16)
        check_packed_attention("cuda", dtype, tol)
    finally:
        attention_kernels.LAUNCH.update(default)
    cases = [((58, 61, 47, 200, 73), 16, 16, 16, 128, -1), ((58, 150, 67), 8, 12, 2, 128, -1),
             ((300, 90), 4, 32, 8, 64, 40)]
    check_packed_attention("cuda", dtype, tol, cases=cases)


def test_packed_attention_falls_back_from_tiles_too_large_for_shared_memory():
    """BM 128 / BN 64 at heads of 128 needs more shared memory than an H200 block has (242 of 227 KiB
    for the dk/dv kernel, bench/pass_sweep.py): with it as the first launch, the kernels that cannot
    take it run with a smaller one, match float64 torch, and the refused launch is remembered."""
    from helpers import check_packed_attention

    from chatlora.train import attention_kernels

    default = dict(attention_kernels.LAUNCH)
    try:
        attention_kernels.LAUNCH.update(BM=128, BN=64, num_warps=8)
        attention_kernels.too_large.clear()
        check_packed_attention("cuda", torch.bfloat16, 1e-2, cases=[((58, 61, 47, 200, 73), 16, 16, 16, 128, -1)])
        assert any(entry[0] == "_dkv_kernel" for entry in attention_kernels.too_large), attention_kernels.too_large
    finally:
        attention_kernels.LAUNCH.clear()
        attention_kernels.LAUNCH.update(default)
        attention_kernels.too_large.clear()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_training_kernels_equal_the_torch_operations_on_cuda(dtype, tol):
    """The fused pass's RMSNorm, SiLU * up and cross-entropy kernels compiled on the GPU, forward and
    backward, at real widths (the cross-entropy through train/head.py's GPU path, Index's unaligned
    vocabulary), against float64 torch (bf16: within its rounding)."""
    from chatlora.train import kernels

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 2048, device="cuda", generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(2048, device="cuda", generator=g) * 0.1 + 1).to(dtype)
    dy = torch.randn(300, 2048, device="cuda", generator=g).to(dtype)
    y = kernels.rms_norm(x, w, 1e-6)
    (dx,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_(True)
    y64 = torch.nn.functional.rms_norm(x64, (2048,), w.double(), 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, dy.double())
    for got, want in ((y, y64), (dx, dx64)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol
    gu = torch.randn(300, 2 * 5888, device="cuda", generator=g).to(dtype).requires_grad_(True)
    do = torch.randn(300, 5888, device="cuda", generator=g).to(dtype)
    out = kernels.silu_mul(gu)
    (dgu,) = torch.autograd.grad(out, gu, do)
    g64 = gu.detach().double().requires_grad_(True)
    a, b = g64.chunk(2, -1)
    o64 = torch.nn.functional.silu(a) * b
    (dg64,) = torch.autograd.grad(o64, g64, do.double())
    for got, want in ((out, o64), (dgu, dg64)):
        assert ((got.double() - want).norm() / want.norm()).item() < tol
    from chatlora.templates import IGNORE
    from chatlora.train.head import chunked_cross_entropy

    x = (torch.randn(300, 2048, device="cuda", generator=g) * 0.5).to(dtype).requires_grad_(True)
    w = (torch.randn(65029, 2048, device="cuda", generator=g) * 0.02).to(dtype)   # Index's vocabulary
    targets = torch.randint(0, 65029, (300,), device="cuda", generator=g)
    targets[::7] = IGNORE
    x64 = x.detach().double().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(x64 @ w.double().t(), targets, ignore_index=IGNORE, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x64)
    for rows in (None, 128):   # one chunk, three
        loss = chunked_cross_entropy(x, w, targets, kernel=True, rows=rows)
        (grad,) = torch.autograd.grad(loss, x)
        assert abs(loss.item() - ref.item()) / ref.item() < tol
        assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < tol

    from helpers import check_rope_qkv

    from chatlora.models.arch import rope_tables

    heads, kv_heads, hd = 16, 8, 128   # Qwen3-1.7B's attention
    inv = 1.0 / 1e6 ** (torch.arange(0, hd, 2, device="cuda") / hd)
    cos, sin = rope_tables(torch.arange(700, device="cuda"), inv, 1.0, dtype)
    y = torch.randn(700, (heads + 2 * kv_heads) * hd, device="cuda", generator=g).to(dtype).requires_grad_(True)
    check_rope_qkv(y, cos, sin, heads, kv_heads, tol)
    norms = tuple((torch.randn(hd, device="cuda", generator=g) * 0.1 + 1).to(dtype) for _ in range(2))
    check_rope_qkv(y, cos, sin, heads, kv_heads, tol, norms=norms)   # with Qwen3's q/k norm in the kernel

    from chatlora.train import lora_kernels

    # Index's q/k/v (3 x 2048 from 2048), down (2048 from 5888), gate/up without dropout
    for n, width, out, p in [(3, 2048, 2048, 0.1), (1, 5888, 2048, 0.1), (2, 2048, 5888, 0.0)]:
        x = torch.randn(700, width, device="cuda", generator=g).to(dtype).requires_grad_(True)
        a = (torch.randn(n, 8, width, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_(True)
        bs = [(torch.randn(out, 8, device="cuda", generator=g) * 0.02).to(dtype).requires_grad_(True)
              for _ in range(n)]
        y = (torch.randn(700, n * out, device="cuda", generator=g) * 0.01).to(dtype)   # bf16 rounds y + update
        seed = torch.tensor([777], device="cuda")
        got = lora_kernels.adapted_update(y.clone(), x, a, torch.cat(bs), [i * out for i in range(n)], [out] * n,
                                          seed, 4, p)
        dy = torch.randn(700, n * out, device="cuda", generator=g).to(dtype)
        grads = torch.autograd.grad(got, [x, a, *bs], dy)
        keeps = [lora_kernels.keep_flags(seed, 4 + i, (700, width), p) for i in range(n)]
        x64, a64 = x.detach().double().requires_grad_(True), a.detach().double().requires_grad_(True)
        b64 = [b.detach().double().requires_grad_(True) for b in bs]
        scale = lora_kernels.keep_scale(p)
        ref = y.double() + torch.cat([(x64 * k * scale) @ a64[i].t() @ b64[i].t() for i, k in enumerate(keeps)], 1)
        wanted = torch.autograd.grad(ref, [x64, a64, *b64], dy.double())
        delta, want_delta = got.double() - y.double(), ref - y.double()
        assert ((delta - want_delta).norm() / want_delta.norm()).item() < tol, (n, "update")
        for k, (grad, want) in enumerate(zip(grads, wanted)):
            assert ((grad.double() - want).norm() / want.norm()).item() < tol, (n, k)


def test_dropout_masks_change_with_every_replay_and_survive_a_recompute(index_dir, index_tok, huanhuan_rows):
    """With dropout, the LoRA kernels key their keep flags by a seed drawn inside the pass: replays of
    one captured pass on the same examples give different losses, and an eager pass with gradient
    checkpointing gives the same loss and gradients as without, from the same generator state."""
    from helpers import examples_for

    from chatlora.train.fused_step import FusedStep

    model = lora_model(index_dir, "float32")
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    examples = examples_for(index_tok, huanhuan_rows[:16])
    fast = FusedStep(model, "cuda", graphs=True)
    losses = {fast.accumulate(examples, 16, 300).item() for _ in range(4)}
    assert len(losses) == 4, losses
    got = []
    for checkpoint in (False, True):
        step = FusedStep(model, "cuda", checkpoint=checkpoint)
        step.zero_grad()
        torch.manual_seed(3)
        got.append((step.accumulate(examples, 16, 300).item(), step.net.flat.grad.clone()))
    assert abs(got[0][0] - got[1][0]) / got[0][0] < 1e-6
    assert ((got[0][1] - got[1][1]).norm() / got[0][1].norm()).item() < 1e-5


def test_a_run_on_the_model_read_without_transformers_trains_as_on_theirs_on_cuda(index_dir, huanhuan_rows,
                                                                                   tmp_path, monkeypatch):
    """The default run (bf16, fused pass, CUDA graphs) on the model read straight from the weights
    (models/native.py) logs the same losses and writes the same adapter as with the model built by
    transformers and peft (CHATLORA_NATIVE_MODEL=0), dropout off: the same weights, seeded adapters
    and kernels."""
    from safetensors.torch import load_file

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:48]), encoding="utf-8")
    runs = {}
    for loader in ("native", "transformers"):
        monkeypatch.setenv("CHATLORA_NATIVE_MODEL", "1" if loader == "native" else "0")
        cfg = load_config(overrides=["train.max_steps=3", "lora.dropout=0", "data.held_out_fraction=0"],
                          flags={"model.path": str(index_dir), "data.path": str(data)})
        final = train(cfg, tmp_path / loader)
        rows = [json.loads(x) for x in (tmp_path / loader / "metrics.jsonl").read_text().splitlines()]
        runs[loader] = ([r["loss"] for r in rows if "loss" in r], rows[0]["startup_s"],
                        load_file(str(final / "adapter_model.safetensors")))
    assert "libraries" not in runs["native"][1] and "libraries" in runs["transformers"][1]
    assert runs["native"][0] == pytest.approx(runs["transformers"][0], rel=1e-6) and len(runs["native"][0]) == 3
    for name, ref in runs["transformers"][2].items():
        assert torch.allclose(runs["native"][2][name], ref, rtol=1e-5, atol=1e-7), name
