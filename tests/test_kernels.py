"""The Triton decode kernels (kernels.py) against the torch operations they replace, on CPU under
Triton's interpreter, in float32 (tests/helpers.py; tests/test_gpu.py runs the same check
compiled on a GPU, in bf16 too).

The interpreter is chosen when the kernels are defined, so the check runs in its own process with
TRITON_INTERPRET=1."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
from helpers import run_interpreted

if os.environ.get("CI"):  # CI installs the test extras: a missing triton is a set-up bug, not a skip
    importlib.import_module("triton")
else:
    pytest.importorskip("triton")

TESTS = os.path.dirname(os.path.abspath(__file__))
CHECK = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    from helpers import check_kernels
    from chatlora.decode import kernels

    assert kernels.available(torch.device("cpu"))
    BREAK = None
    check_kernels("cpu", torch.float32, 1e-5, head_dim=16)
    print("kernels match")
""")


def run(script: str) -> subprocess.CompletedProcess:
    return run_interpreted(script)


def test_decode_kernels_equal_the_torch_operations_under_the_interpreter():
    done = run(CHECK)
    assert done.returncode == 0 and "kernels match" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("breakage", [
    # RoPE's sin sign flipped by the caller
    "rope = kernels.rope_to_cache; kernels.rope_to_cache = lambda y, c, s, *a: rope(y, c, -s, *a)",
    # linear's gated path taking SiLU of the up half instead of the gate half
    "lin = kernels.linear; kernels.linear = lambda x, w, **kw: lin(x.roll(x.shape[1] // 2, 1) "
    "if kw.get('gated') else x, w, **kw)",
])
def test_a_broken_kernel_is_caught(breakage):
    """The check above fails when a kernel computes something else."""
    done = run(CHECK.replace("BREAK = None", breakage))
    assert done.returncode != 0 and "kernels match" not in done.stdout
    assert "relative error" in done.stderr


@pytest.mark.slow
def test_the_decoder_with_the_kernels_equals_generate_under_the_interpreter():
    """The kernels composed into the decoder's one-token step (`DecodeModel.fused_step`): the
    Index, Qwen2 (biases around the kernels), Qwen3 (q/k norms, head_dim 32) and Mistral (a sliding
    window over the attention kernel's valid columns) cases of tests/test_fastdecode.py (greedy
    tokens equal `generate` over rows of different lengths and chunked attention; teacher-forced
    logits within 1e-5 of a full forward; picks on the decoder) with the kernels on, where each
    decoder asserts that it uses them.
    Requests joining a running batch are left to the plain run and the GPU (tests/test_gpu.py): under
    the interpreter they take minutes; the kernel they rely on, each row writing its own cache
    column, is checked in kernel_cases."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           os.path.join(TESTS, "test_fastdecode.py"),
                           "-k", "(index or qwen2 or qwen3 or mistral) and not failing and not joining"],
                          capture_output=True, text=True, timeout=1800,
                          env=dict(os.environ, TRITON_INTERPRET="1", CHATLORA_TRITON="1", CHATLORA_TEST_KERNELS="1"))
    assert done.returncode == 0 and " passed" in done.stdout, done.stdout[-3000:] + done.stderr[-2000:]


NF4_CHECK = textwrap.dedent("""
    import torch
    from chatlora.models import quantize, triton_kernels

    assert triton_kernels.enabled(torch.device("cpu"))
    nf4 = quantize._torchao_nf4()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for shape in [(256, 512), (192, 576), (96, 64)]:
            w = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(dtype)
            q = nf4.NF4Tensor.from_tensor(w, quantize.BLOCK, quantize.scaler_block_size(w.numel()))
            BREAK = None
            got = quantize.dequantize(q)
            assert torch.equal(got, q.get_original_weight()), (dtype, shape)
    print("nf4 kernel matches")
""")


@pytest.mark.parametrize("breakage", [None, "q.scaler_mean = q.scaler_mean * 1.01"])
def test_nf4_dequantize_kernel_equals_torchao_under_the_interpreter(breakage):
    """The fused pass's NF4 kernel gives torchao's de-quantised weights bit for bit (bf16, fp16, fp32,
    second-level blocks of 256, 64 and 32), and the check fails when the kernel reads a wrong scale
    (the broken case changes only what the kernel reads, after torchao's reference is fixed)."""
    if not os.environ.get("CI"):   # CI installs torchao (test extras): there the check must run
        pytest.importorskip("torchao")
    script = NF4_CHECK if breakage is None else NF4_CHECK.replace(
        "BREAK = None\n        got = quantize.dequantize(q)",
        "expected = q.get_original_weight()\n        " + breakage +
        "\n        got = quantize.dequantize(q)\n        q.get_original_weight = lambda: expected")
    assert breakage is None or script != NF4_CHECK
    done = run(script)
    if breakage is None:
        assert done.returncode == 0 and "nf4 kernel matches" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0 and "nf4 kernel matches" not in done.stdout


TRAINING_CHECK = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    import json
    from pathlib import Path
    import chatlora
    from helpers import examples_for
    from chatlora.config import load_config
    from chatlora.models.load import load_model, load_tokenizer, prepare_base
    from chatlora.models.lora import attach, trainable_parameters
    from chatlora.train import kernels, lora_kernels
    from chatlora.train.fused_step import FusedStep
    from chatlora.train.gradients import accumulate_gradients
    from chatlora.train.steps import pack

    # the kernels against float64 torch, forward and backward
    torch.manual_seed(0)
    for rows, n in [(5, 64), (3, 200)]:
        x = torch.randn(rows, n, requires_grad=True)
        w = torch.randn(n) * 0.1 + 1
        dy = torch.randn(rows, n)
        dy_kernel = dy
        (dx,) = torch.autograd.grad(kernels.rms_norm(x, w, 1e-6), x, dy_kernel)
        x64 = x.detach().double().requires_grad_(True)
        (dx64,) = torch.autograd.grad(torch.nn.functional.rms_norm(x64, (n,), w.double(), 1e-6), x64, dy.double())
        assert (dx.double() - dx64).norm() / dx64.norm() < 1e-6, "rms_norm backward"
        gu = torch.randn(rows, 2 * n, requires_grad=True)
        do = torch.randn(rows, n)
        (dgu,) = torch.autograd.grad(kernels.silu_mul(gu), gu, do)
        g64 = gu.detach().double().requires_grad_(True)
        a, b = g64.chunk(2, -1)
        (dg64,) = torch.autograd.grad(torch.nn.functional.silu(a) * b, g64, do.double())
        assert (dgu.double() - dg64).norm() / dg64.norm() < 1e-6, "silu_mul backward"

    # the cross-entropy kernel, as train/head.py's GPU path runs it (vocabularies below, at and past
    # a multiple of its row alignment; chunks of rows), against float64 torch
    from chatlora.templates import IGNORE
    from chatlora.train.head import chunked_cross_entropy
    for vocab, chunk in [(150, 5), (50, 64), (128, 7)]:
        x = torch.randn(37, 16, requires_grad=True)
        w = torch.randn(vocab, 16)
        targets = torch.randint(0, vocab, (37,))
        targets[[3, 30]] = IGNORE
        targets_kernel = targets
        loss = chunked_cross_entropy(x, w, targets_kernel, kernel=True, rows=chunk)
        (grad,) = torch.autograd.grad(loss / 7, x)
        x64 = x.detach().double().requires_grad_(True)
        ref = torch.nn.functional.cross_entropy(x64 @ w.double().t(), targets, ignore_index=IGNORE, reduction="sum")
        (ref_grad,) = torch.autograd.grad(ref / 7, x64)
        assert abs(loss.item() - ref.item()) / ref.item() < 1e-6, "cross_entropy loss"
        assert (grad.double() - ref_grad).norm() / ref_grad.norm() < 1e-6, "cross_entropy gradient"

    # RoPE on q and k with v split off (grouped-query heads), forward and backward
    from chatlora.models.arch import rope_tables
    from helpers import check_rope_qkv
    cos, sin = rope_tables(torch.arange(7), 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16), 1.0, torch.float32)
    check_rope_qkv(torch.randn(7, (4 + 2 * 2) * 16, requires_grad=True), cos, sin, 4, 2, 1e-6)
    # with Qwen3's q/k norm in the same kernel
    check_rope_qkv(torch.randn(7, (4 + 2 * 2) * 16, requires_grad=True), cos, sin, 4, 2, 1e-6,
                   norms=(torch.randn(16) * 0.1 + 1, torch.randn(16) * 0.1 + 1))

    # the LoRA updates with dropout (lora_kernels.py) against float64 torch given the same keep flags
    # (the last case: more rows and outputs than one tile or span of the B kernels, the input in three spans)
    for n, outs, p, rank, t, d in [(3, [24, 16, 16], 0.3, 8, 37, 104), (1, [40], 0.1, 12, 37, 104),
                                   (2, [16, 16], 0.0, 8, 37, 104), (2, [520, 8], 0.2, 8, 70, 1048)]:
        x = torch.randn(t, d, requires_grad=True)
        a = (torch.randn(n, rank, d) * 0.1).requires_grad_(True)
        bs = [(torch.randn(o, rank) * 0.1).requires_grad_(True) for o in outs]
        columns = [sum(outs[:i]) for i in range(n)]
        seed = torch.tensor([12345])
        y = torch.randn(t, sum(outs))
        # one adapter covering the output: a layer's residual is added after the update, in its kernel
        residual = torch.randn(t, sum(outs), requires_grad=True) if n == 1 else None
        out = lora_kernels.adapted_update(y.clone(), x, a, torch.cat(bs), columns, outs, seed, 8, p, residual)
        dy = torch.randn(t, sum(outs))
        grads = torch.autograd.grad(out, [x, a, *bs] + ([residual] if n == 1 else []), dy)
        keeps = [lora_kernels.keep_flags(seed, 8 + i, (t, d), p) for i in range(n)]
        if p:
            fraction = torch.stack(keeps).float().mean().item()
            assert abs(fraction - (1 - p)) < 0.02 and (keeps[0] != keeps[-1]).any() == (n > 1), "keep flags"
            assert abs(1 / lora_kernels.keep_scale(p) - (1 - p)) < 2 ** -16, "keep probability"
        keeps_reference = keeps
        x64, a64 = x.detach().double().requires_grad_(True), a.detach().double().requires_grad_(True)
        b64 = [b.detach().double().requires_grad_(True) for b in bs]
        scale = lora_kernels.keep_scale(p)   # 1 / the realised keep probability
        updates = [(x64 * k * scale) @ a64[i].t() @ b64[i].t() for i, k in enumerate(keeps_reference)]
        ref = y.double() + torch.cat(updates, 1)
        wanted = torch.autograd.grad(ref, [x64, a64, *b64], dy.double())
        if n == 1:
            ref, wanted = ref + residual.detach().double(), (*wanted, dy.double())
        assert (out.double() - ref).norm() / ref.norm() < 1e-6, "lora update"
        for got, want in zip(grads, wanted):
            assert (got.double() - want).norm() / want.norm() < 1e-6, "lora gradient"

    # the base product computed inside (16-bit weight, no bias): backward's dx is the base's plus the
    # adapters', added in the dx kernel
    x, w = torch.randn(37, 104, requires_grad=True), torch.randn(40, 104) * 0.1
    a, b = (torch.randn(1, 8, 104) * 0.1).requires_grad_(True), (torch.randn(40, 8) * 0.1).requires_grad_(True)
    residual, seed, dy = torch.randn(37, 40, requires_grad=True), torch.tensor([77]), torch.randn(37, 40)
    out = lora_kernels.adapted_update(None, x, a, b, [0], [40], seed, 8, 0.2, residual, weight=w)
    grads = torch.autograd.grad(out, [x, a, b, residual], dy)
    keep = lora_kernels.keep_flags(seed, 8, (37, 104), 0.2)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (x, a, b))
    ref = (x64 @ w.double().t() + (x64 * keep * lora_kernels.keep_scale(0.2)) @ a64[0].t() @ b64.t()
           + residual.detach().double())
    wanted = (*torch.autograd.grad(ref, [x64, a64, b64], dy.double()), dy.double())
    assert (out.double() - ref).norm() / ref.norm() < 1e-6, "lora update on the base product"
    for got, want in zip(grads, wanted):
        assert (got.double() - want).norm() / want.norm() < 1e-6, "lora gradient with the base product's"

    # a small update on a large residual (half precision: the interpreter's bfloat16 is not numpy's)
    # is kept on average: added to the projection's output before the residual, never to the
    # residual's rounded sum, where each element below half a unit in the last place would be dropped
    x, y = torch.rand(64, 64).half(), torch.randn(64, 64).half()
    a, b = torch.full((1, 8, 64), 1 / 64).half(), torch.full((64, 8), 0.02).half()
    big = (1000 + 10 * torch.randn(64, 64)).half()   # its unit in the last place: 0.5; the update: ~0.08
    out = lora_kernels.adapted_update(y.clone(), x, a, b, [0], [64], torch.zeros(1, dtype=torch.int64), 0, 0.0, big)
    update = (x.double() @ a[0].double().t()) @ b.double().t()
    bias = (out.double() - (y.double() + update + big.double())).mean().item()
    assert abs(bias) < 0.1 * update.mean().item(), ("lora update lost on the residual", bias)
    # rounded as peft rounds: the projection's output first, where an update below half its unit in
    # the last place is lost as on the plain path, then its sum with the residual. Here each sum
    # of output and residual is a tie (1.25 + a multiple of 0.5): the tiny update would break every
    # tie upwards if both were rounded once, where peft's order rounds half of them to even
    y, b = torch.full((64, 64), 1.25).half(), torch.full((64, 8), 2e-5).half()   # update ~8e-5
    big = (1000 + 10 * torch.randn(64, 64)).half()
    out = lora_kernels.adapted_update(y.clone(), x, a, b, [0], [64], torch.zeros(1, dtype=torch.int64), 0, 0.0, big)
    assert torch.equal(out, y + big), "lora update and residual not rounded as peft rounds them"

    print("training kernels match")
""")

FUSED_PASS_CHECK = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    import json
    from pathlib import Path
    import chatlora
    from helpers import examples_for
    from chatlora.config import load_config
    from chatlora.models.load import load_model, load_tokenizer, prepare_base
    from chatlora.models.lora import attach, trainable_parameters
    from chatlora.train import kernels, lora_kernels
    from chatlora.train.fused_step import FusedStep
    from chatlora.train.gradients import accumulate_gradients
    from chatlora.train.steps import pack
    # the fused pass with them, against peft (float32)
    base = prepare_base({{index_dir!r}})
    model = attach(load_model(base, "float32", "cpu"), load_config(overrides=["lora.dropout=0"]).lora).train()
    for name, p in trainable_parameters(model):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    rows = json.loads((Path(chatlora.__file__).parent / "assets" / "huanhuan.json").read_text(encoding="utf-8"))
    examples = examples_for(load_tokenizer(base), rows[:6])
    ref = accumulate_gradients(model, examples, 16, lambda ex: pack(ex)).item()
    grads = [p.grad.clone() for _, p in trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    fast = FusedStep(model, "cpu")
    from chatlora.models import triton_kernels
    assert triton_kernels.enabled(torch.device("cpu")) and fast.net.kernels   # the kernels are in the pass
    from chatlora.train import attention_kernels
    attended, packed = [], attention_kernels.packed_attention
    attention_kernels.packed_attention = lambda *a: attended.append(1) or packed(*a)
    fast.zero_grad()
    loss = fast.accumulate(examples, 16, None).item()
    assert abs(loss - ref) / ref < 1e-5, (loss, ref)
    assert attended   # the layers attend through the packed-row kernel
    for (_, p), g in zip(trainable_parameters(model), grads):
        assert (p.grad - g).norm() / g.norm() < 1e-4

    # with dropout, a checkpointed pass recomputes each layer with the same keep flags (the seed)
    for module in model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.1)
    got = []
    for checkpoint in (False, True):
        fast = FusedStep(model, "cpu", checkpoint=checkpoint)
        fast.zero_grad()
        torch.manual_seed(5)
        got.append((fast.accumulate(examples[:2], 16, None).item(), fast.net.flat.grad.clone()))
    (plain_loss, plain_grad), (ckpt_loss, ckpt_grad) = got
    assert abs(plain_loss - ckpt_loss) / plain_loss < 1e-6, (plain_loss, ckpt_loss)
    from chatlora.train.steps import supervised_count
    without = fast.held_out_loss_sum(examples[:2], 16, None).item() / supervised_count(examples[:2])
    # the dropout took effect: beyond float32 rounding (a tiny model's loss moves by ~5e-5 relative)
    assert abs(without - plain_loss) / plain_loss > 1e-6, (without, plain_loss)

    # a model the LoRA kernels do not fit keeps torch's dropout, its masks stored for the recompute
    lora_kernels.covers = lambda width: False
    got = []
    for checkpoint in (False, True):
        fast = FusedStep(model, "cpu", checkpoint=checkpoint)
        assert not fast.net.lora_kernels_fit
        fast.net.packed_dropout = True   # both passes draw their masks up front, alike
        fast.zero_grad()
        torch.manual_seed(5)
        got.append((fast.accumulate(examples[:2], 16, None).item(), fast.net.flat.grad.clone()))
    assert abs(got[0][0] - got[1][0]) / got[0][0] < 1e-6, got
    assert (got[0][1] - got[1][1]).norm() / got[0][1].norm() < 1e-5
    assert (plain_grad - ckpt_grad).norm() / plain_grad.norm() < 1e-5
    print("the fused pass matches")
""")



@pytest.mark.parametrize("breakage", [None, ("dy_kernel = dy", "dy_kernel = dy.flip(1)", "rms_norm backward"),
                                      ("targets_kernel = targets", "targets_kernel = targets.roll(1)",
                                       "cross_entropy loss"),
                                      ("keeps_reference = keeps", "keeps_reference = keeps[::-1]", "lora")])
def test_training_kernels_equal_torch(breakage):
    """The training pass's kernels (train/kernels.py, lora_kernels.py), forward and backward, against
    float64 torch under the interpreter. Each broken case feeds a kernel other input than the
    reference gets, and must be caught."""
    script = TRAINING_CHECK
    if breakage:
        line, broken, caught = breakage
        assert line + "\n" in script
        script = script.replace(line + "\n", broken + "\n")
    done = run(script)
    if breakage is None:
        assert done.returncode == 0 and "training kernels match" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0 and caught in done.stderr, done.stderr[-3000:]


@pytest.mark.slow
def test_the_fused_pass_with_the_training_kernels_equals_peft(index_dir):
    """The fused pass running the kernels under the interpreter (the packed-row attention among them):
    equal to peft (float32, no dropout);
    with dropout a checkpointed pass equals the uncheckpointed one (the keep flags drawn again) and
    the dropout takes effect; a model the LoRA kernels do not fit keeps stored masks, alike."""
    done = run(FUSED_PASS_CHECK.replace("{index_dir!r}", repr(str(index_dir))))
    assert done.returncode == 0 and "the fused pass matches" in done.stdout, done.stderr[-3000:]


QWEN3_PASS_CHECK = textwrap.dedent(f"""
    import sys, tempfile
    from pathlib import Path
    import torch
    sys.path.insert(0, {TESTS!r})
    from chatlora.config import load_config
    from chatlora.data.dataset import Example
    from chatlora.models.load import load_model, prepare_base
    from chatlora.models.lora import attach, trainable_parameters
    from chatlora.testing import make_family_dir
    from chatlora.train.fused_step import FusedStep
    from chatlora.train.gradients import accumulate_gradients
    from chatlora.train.steps import pack
    base = make_family_dir(Path(tempfile.mkdtemp()), "qwen3")
    model = attach(load_model(prepare_base(str(base)), "float32", "cpu"), load_config(overrides=["lora.dropout=0"]).lora).train()
    for name, p in trainable_parameters(model):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(0)
    examples = []
    for n in (9, 14, 6):
        ids = torch.randint(3, model.config.vocab_size, (n,), generator=g).tolist()
        examples.append(Example(ids, [-100] * 3 + ids[3:], 0))
    ref = accumulate_gradients(model, examples, 16, lambda ex: pack(ex)).item()
    grads = [p.grad.clone() for _, p in trainable_parameters(model)]
    model.zero_grad(set_to_none=True)
    fast = FusedStep(model, "cpu")
    fast.zero_grad()
    loss = fast.accumulate(examples, 16, None).item()
    assert abs(loss - ref) / ref < 1e-5, (loss, ref)
    for (_, p), want in zip(trainable_parameters(model), grads):
        assert (p.grad - want).norm() / want.norm() < 1e-4
    print("the qwen3 pass matches")
""")


@pytest.mark.slow
def test_the_fused_pass_with_the_q_k_norm_in_the_rope_kernel_equals_peft():
    """Qwen3's q/k norm inside the RoPE kernel (train/kernels.rope_qkv) in the whole fused pass under
    the interpreter, against peft in float32: loss and every adapter gradient."""
    done = run(QWEN3_PASS_CHECK)
    assert done.returncode == 0 and "the qwen3 pass matches" in done.stdout, done.stderr[-3000:]


def test_the_first_run_notice_looks_for_compiled_kernels_in_tritons_cache(tmp_path, monkeypatch):
    """`in_cache` finds a kernel's compiled copy (a folder holding `<name>.json`) in Triton's cache
    (TRITON_CACHE_DIR here) and reports a missing or unrelated cache as none; the kernels training
    asks for exist by those names."""
    from chatlora.models import triton_kernels
    from chatlora.train import gradients, kernels, lora_kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache"))
    assert triton_kernels.cache_dir() == tmp_path / "cache"
    assert not triton_kernels.in_cache(gradients.KERNELS)
    (tmp_path / "cache" / "1a2b").mkdir(parents=True)
    (tmp_path / "cache" / "1a2b" / "_other_kernel.json").write_text("{}")
    assert not triton_kernels.in_cache(gradients.KERNELS)
    (tmp_path / "cache" / "1a2b" / "_a_grad.json").write_text("{}")
    assert triton_kernels.in_cache(gradients.KERNELS)
    assert all(hasattr(kernels, name) or hasattr(lora_kernels, name) for name in gradients.KERNELS)


ATTENTION_CHECK = textwrap.dedent(f"""
    import sys
    import torch
    sys.path.insert(0, {TESTS!r})
    from helpers import ATTENTION_CASES, check_packed_attention
    from chatlora.models import triton_kernels
    from chatlora.train import attention_kernels

    assert triton_kernels.enabled(torch.device("cpu"))
    attention = attention_kernels.packed_attention
    BREAK = None
    # blocks of 16 rows: the cases' sequences take one to three blocks, most not full
    attention_kernels.LAUNCH.update(BM=16, BN=16)
    check_packed_attention("cpu", torch.float32, 1e-5, attention=attention)
    check_packed_attention("cpu", torch.float16, 2e-3, cases=ATTENTION_CASES[2:], attention=attention)
    # query and key blocks of different sizes, and the default blocks (one per sequence here)
    attention_kernels.LAUNCH.update(BM=32, BN=16)
    check_packed_attention("cpu", torch.float32, 1e-5, cases=ATTENTION_CASES[:2], attention=attention)
    attention_kernels.LAUNCH.update(BM=64, BN=64)
    check_packed_attention("cpu", torch.float32, 1e-5, cases=ATTENTION_CASES[1:2], attention=attention)
    print("attention kernels match")
""")


ATTENTION_SMALL_GPU = textwrap.dedent(f"""
    import sys
    import torch
    import triton
    sys.path.insert(0, {TESTS!r})
    from helpers import ATTENTION_CASES, check_packed_attention
    from chatlora.train import attention_kernels

    class SmallGPU:   # a kernel whose launches with tiles over `rows` rows need more shared memory than there is
        def __init__(self, kernel, rows):
            self.kernel, self.rows, self.__name__, self.refused = kernel, rows, kernel.__name__, []

        def __getitem__(self, grid):
            def run(*args, BM, BN, **constants):
                if max(BM, BN) > self.rows:
                    self.refused.append((BM, BN))
                    raise triton.runtime.errors.OutOfResources(300000, 101376, "shared memory")
                return self.kernel[grid](*args, BM=BM, BN=BN, **constants)
            return run

    names = ("_forward_kernel", "_dq_kernel", "_dkv_kernel")
    real = {{name: getattr(attention_kernels, name) for name in names}}
    small = {{name: SmallGPU(real[name], 16) for name in names}}
    for name in names:
        setattr(attention_kernels, name, small[name])
    check_packed_attention("cpu", torch.float32, 1e-5, cases=ATTENTION_CASES[:1])
    assert all(k.refused == [(64, 32), (32, 32)] for k in small.values()), [k.refused for k in small.values()]
    assert len(attention_kernels.too_large) == 6
    check_packed_attention("cpu", torch.float32, 1e-5, cases=ATTENTION_CASES[:1])
    assert all(len(k.refused) == 2 for k in small.values()), "a launch too large was tried again"
    # a GPU that holds none of the launches: the kernel's own error, not a silent wrong result
    for name in names:
        setattr(attention_kernels, name, SmallGPU(real[name], 8))
    attention_kernels.too_large.clear()
    try:
        check_packed_attention("cpu", torch.float32, 1e-5, cases=ATTENTION_CASES[:1])
        raise SystemExit("no error")
    except triton.runtime.errors.OutOfResources:
        pass
    print("smaller launches used")
""")


def test_packed_attention_takes_smaller_tiles_where_shared_memory_is_short():
    """On a GPU whose blocks cannot hold a kernel's tiles at LAUNCH (simulated: the launch raises
    Triton's OutOfResources, as it does there before launching), each kernel runs with the next
    smaller launch and still matches float64 torch; a launch that did not fit is not tried again for
    that shape, and where none fits the error is raised."""
    done = run_interpreted(ATTENTION_SMALL_GPU)
    assert done.returncode == 0 and "smaller launches used" in done.stdout, done.stderr[-3000:]


@pytest.mark.parametrize("breakage", [
    None,
    # a sequence boundary moved by one token
    "attention = lambda qk, v, s, *a: attention_kernels.packed_attention(qk, v, s + (s == s[1]).int(), *a)",
    # the window one key shorter than asked
    "attention = lambda qk, v, s, h, sc, left: attention_kernels.packed_attention(qk, v, s, h, sc, left - (left > 0))",
    # grouped heads: the K/V heads read in the wrong order
    "attention = lambda qk, v, s, h, *a: attention_kernels.packed_attention("
    "torch.cat([qk[:, :h], qk[:, h:].flip(1)], 1), v.flip(1), s, h, *a)",
])
def test_packed_attention_equals_float64_torch(breakage):
    """The packed-row attention kernels (train/attention_kernels.py) under the interpreter against
    float64 torch: output and the gradients of q/k and v, with sequences across block boundaries, one-token
    sequences, empty slots, grouped K/V heads and a sliding window; each broken case feeds the kernel
    other input than the reference gets, and must be caught."""
    script = ATTENTION_CHECK if breakage is None else ATTENTION_CHECK.replace("BREAK = None", breakage)
    done = run_interpreted(script)
    if breakage is None:
        assert done.returncode == 0 and "attention kernels match" in done.stdout, done.stderr[-3000:]
    else:
        assert done.returncode != 0 and "packed attention" in done.stderr, done.stderr[-3000:]


def test_packed_attention_takes_only_the_head_sizes_checked_on_a_gpu():
    """Power-of-two heads of 16 to 128 only (64 and 128 compiled and checked on the H200; 256 would
    outgrow shared memory), and on a GPU half precision only: other models keep torch's kernel."""
    import torch

    from chatlora.train.attention_kernels import fits

    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert [d for d in (8, 16, 32, 64, 96, 128, 256) if fits(d, torch.bfloat16, gpu)] == [16, 32, 64, 128]
    assert fits(128, torch.float16, gpu) and not fits(128, torch.float32, gpu)
    assert fits(128, torch.float32, cpu) and not fits(256, torch.float32, cpu)
