"""4-bit NF4 bases (QLoRA): quantisation at load, the fused pass against peft on torchao's 4-bit
layers, training, resume, and merges that come from the 16-bit base (CPU, float32)."""

import importlib
import os
import shutil

import pytest
import torch
from helpers import config_for, examples_for, max_adapter_diff, step_losses

from chatlora.config import load_config
from chatlora.errors import UserError
from chatlora.models.arch import TARGETS
from chatlora.models.load import load_model, prepare_base
from chatlora.models.lora import attach, trainable_parameters
from chatlora.models.quantize import describe, is_nf4, is_quantized, scaler_block_size
from chatlora.train.fused import unsupported_reason
from chatlora.train.fused_step import FusedStep
from chatlora.train.gradients import accumulate_gradients
from chatlora.train.loop import train
from chatlora.train.steps import pack

if os.environ.get("CI"):  # CI installs the test extras: a missing torchao is a set-up bug, not a skip
    importlib.import_module("torchao")
else:
    pytest.importorskip("torchao")


def nf4_lora_model(directory, dropout=0.0):
    torch.manual_seed(0)
    cfg = load_config(overrides=[f"lora.dropout={dropout}"])
    model = attach(load_model(prepare_base(str(directory)), "float32", "cpu", quantize="nf4"), cfg.lora)
    for name, p in trainable_parameters(model):  # B starts at zero: give it values so every grad flows
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model.train(), cfg


def test_scaler_blocks_fit_the_weight():
    assert scaler_block_size(4096 * 4096) == 256            # QLoRA's own
    assert scaler_block_size(192 * 576) == 64               # SmolLM2's k_proj: 1,728 blocks
    assert scaler_block_size(96 * 64) == 32
    assert scaler_block_size(64 * 3) is None                # fewer than 64 x 8 weights
    assert scaler_block_size(100 * 64 + 32) is None         # not whole blocks of 64


def test_load_quantizes_every_projection_and_nothing_else(family_dir):
    directory = family_dir("qwen2")
    plain = load_model(prepare_base(str(directory)), "float32", "cpu")
    model = load_model(prepare_base(str(directory)), "float32", "cpu", quantize="nf4")
    found = describe(model, TARGETS)
    layers = model.config.num_hidden_layers
    assert found.quantized == 7 * layers and not found.kept
    assert found.bytes_nf4 < found.bytes_16bit * 4.5 / 32   # ~4.1-4.3 bits per float32 weight
    for (name, p), (_, ref) in zip(model.named_parameters(), plain.named_parameters()):
        projection = name.rsplit(".", 2)[-2] in TARGETS and name.endswith("weight")
        assert is_nf4(p) == projection, name
        if projection:   # NF4's error, not another weight's
            assert ((p.get_original_weight() - ref).norm() / ref.norm()) < 0.15, name
        else:
            assert torch.equal(p, ref), name
    assert "4-bit NF4 base: 14 projection weights" in found.line()


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral"])
def test_fused_pass_on_nf4_equals_peft_on_torchaos_layers(family, family_dir, index_tok, huanhuan_rows):
    """The fused pass de-quantises each projection itself; peft's LoRA layers over torchao's NF4
    `F.linear` are the reference, on the same quantised weights: loss and every LoRA gradient."""
    model, cfg = nf4_lora_model(family_dir(family))
    assert is_quantized(model) and unsupported_reason(model, cfg.lora) is None
    examples = examples_for(index_tok, huanhuan_rows[:12])
    ref_loss = accumulate_gradients(model, examples, 16, lambda ex: pack(ex)).item()
    ref = {n: p.grad.clone() for n, p in trainable_parameters(model)}
    model.zero_grad(set_to_none=True)
    fast = FusedStep(model, "cpu")
    fast.zero_grad()
    loss = fast.accumulate(examples, 16, None).item()
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for name, p in trainable_parameters(model):
        assert ((p.grad - ref[name]).norm() / ref[name].norm()) < 1e-4, name


def test_fused_pass_on_nf4_with_checkpointing_equals_without(index_dir, index_tok, huanhuan_rows):
    """The lowmem preset's recompute de-quantises again in backward: same loss and gradients."""
    model, _ = nf4_lora_model(index_dir, dropout=0.1)
    examples = examples_for(index_tok, huanhuan_rows[:8])
    results = []
    for checkpoint in (False, True):
        torch.manual_seed(3)
        step = FusedStep(model, "cpu", checkpoint=checkpoint)
        step.net.packed_dropout = True   # masks drawn up front on both, so the same masks apply
        step.zero_grad()
        loss = step.accumulate(examples, 16, None).item()
        results.append((loss, [p.grad.clone() for _, p in trainable_parameters(model)]))
    (a, ga), (b, gb) = results
    assert a == pytest.approx(b, rel=1e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def test_nf4_is_refused_with_dora_and_sharding():
    with pytest.raises(UserError, match="lora.dora cannot be trained on a 4-bit base"):
        load_config(overrides=["model.quantize=nf4", "lora.dora=true"])
    with pytest.raises(UserError, match="cannot shard a 4-bit base"):
        load_config(overrides=["model.quantize=nf4", "train.distributed=shard"])


def nf4_config(directory, data, **train):
    cfg = config_for(directory, data, **train)
    cfg.model.quantize = "nf4"
    cfg.lora.dropout = 0.0    # the fused and plain passes draw dropout masks differently
    return cfg


def test_nf4_training_fused_equals_plain_and_resumes_exactly(index_dir, tiny_data, tmp_path):
    """Three steps on a 4-bit base through the fused pass and through peft on torchao's layers: the
    same losses. Resumed from its step-2 checkpoint, the fused run repeats step 3 exactly (the base
    is quantised again from the same weights: the same NF4 tensors)."""
    runs = {}
    for path in ("eager", "plain"):
        runs[path] = tmp_path / path
        train(nf4_config(index_dir, tiny_data, max_steps=3, save_every=2, fast_path=path), runs[path])
    fused, plain = step_losses(runs["eager"]), step_losses(runs["plain"])
    assert len(fused) == len(plain) == 3
    assert fused == pytest.approx(plain, rel=1e-5)
    assert "quantize: nf4" in (runs["eager"] / "config.yaml").read_text()
    resumed = tmp_path / "resumed"   # the run as it stood after step 2's checkpoint
    shutil.copytree(runs["eager"], resumed)
    shutil.rmtree(resumed / "final")
    train(nf4_config(index_dir, tiny_data, max_steps=3, save_every=2, fast_path="eager"), resumed, resume=True)
    assert step_losses(resumed) == fused
    assert max_adapter_diff(runs["eager"] / "final", resumed / "final") == 0


def test_resume_refuses_another_base_precision(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(nf4_config(index_dir, tiny_data, max_steps=1, save_every=1), run)
    cfg = nf4_config(index_dir, tiny_data, max_steps=2)
    cfg.model.quantize = "none"
    with pytest.raises(UserError, match="model.quantize: 'nf4' -> 'none'"):
        train(cfg, run, resume=True)


def test_merge_and_export_of_an_nf4_run_come_from_the_16bit_base(family_dir, tiny_data, tmp_path, capsys):
    """The merged weight, and the GGUF's, is the 16-bit base weight plus the LoRA update, not the
    de-quantised NF4 weight plus it; each command says which base it used. Merging into NF4 weights
    is refused."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from chatlora.export import export_gguf, merge_run
    from chatlora.models.lora import merge

    directory = family_dir("qwen2")
    run = tmp_path / "run"
    cfg = nf4_config(directory, tiny_data, max_steps=2, learning_rate=1e-2)
    train(cfg, run)
    capsys.readouterr()
    merged = load_file(str(merge_run(run, tmp_path / "merged") / "model.safetensors"))
    assert "trained on a 4-bit base; the adapter is applied to its 16-bit base" in capsys.readouterr().err
    base = load_model(prepare_base(str(directory)), "float32", "cpu")
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    name = "model.layers.0.self_attn.q_proj"
    a = adapter[f"base_model.model.{name}.lora_A.weight"]
    b = adapter[f"base_model.model.{name}.lora_B.weight"]
    expected = base.get_submodule(name).weight + (cfg.lora.alpha / cfg.lora.r) * b @ a
    assert (b @ a).abs().max() > 1e-4                      # the update is there to be seen
    torch.testing.assert_close(merged[f"{name}.weight"], expected, rtol=1e-5, atol=1e-6)
    path = export_gguf(run, tmp_path / "m.gguf", "f16")     # the GGUF too: llama.cpp's copy of the merge
    assert "applied to its 16-bit base" in capsys.readouterr().err
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32)
    exported = back.get_submodule(name).weight
    quantized = load_model(prepare_base(str(directory)), "float32", "cpu", quantize="nf4")
    from_nf4 = quantized.get_submodule(name).weight.get_original_weight() + (cfg.lora.alpha / cfg.lora.r) * b @ a
    assert (exported - expected).norm() / expected.norm() < 1e-3                  # f16 rounding
    assert (exported - from_nf4).norm() / expected.norm() > 0.03                  # NF4's error is not in it
    with pytest.raises(UserError, match="refusing to merge an adapter into 4-bit NF4 weights"):
        merge(attach(quantized, cfg.lora))


def test_chat_of_an_nf4_run_takes_the_16bit_base_unless_it_does_not_fit(index_dir, tiny_data, tmp_path,
                                                                       monkeypatch, capsys):
    """On a GPU whose free memory holds the 16-bit base, chat and serve load it (the fast decoder then
    merges the adapter into 16-bit weights); otherwise the 4-bit base with the adapter unmerged, and
    they say which. Runs trained on a 16-bit base are not asked."""
    from chatlora.chat import open_chat
    from chatlora.rundir import base_precision, load_base_model, load_run, load_tuned_model

    run_dir = tmp_path / "run"
    train(nf4_config(index_dir, tiny_data, max_steps=1), run_dir)
    run = load_run(run_dir)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    assert base_precision(run, "cuda", "bfloat16") == "none"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 8 * 2**30))
    assert base_precision(run, "cuda", "bfloat16") == "nf4"
    assert "does not fit this GPU's 1.0 GiB free" in capsys.readouterr().err
    load_base_model(run, device="cpu")   # eval's base beside the tuned model: the tuned load says it, once
    assert "4-bit base" not in capsys.readouterr().err
    monkeypatch.setattr("chatlora.rundir.base_precision", lambda run, device, dtype, say=True: "nf4")
    model = load_tuned_model(run, device="cpu")
    assert is_quantized(model) and hasattr(model, "peft_config")
    chat = open_chat(str(run_dir), temperature=0, max_new_tokens=4)
    assert isinstance(chat.reply("你好"), str)
    plain_run = tmp_path / "plain"
    train(config_for(index_dir, tiny_data, max_steps=1), plain_run)
    assert base_precision(load_run(plain_run), "cuda", "bfloat16") == "none"
    assert "4-bit" not in capsys.readouterr().err
