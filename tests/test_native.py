"""The model built without transformers and peft (models/native.py) is the model they build: the same
parameter names, weights and initial adapter for a seed, the same architecture as the fused pass reads
it; its adapter directory loads in peft; a training run on it imports neither library and resumes
exactly; whatever it cannot read exactly is named and left to transformers."""

import json
import subprocess
import sys

import pytest
import torch

from chatlora.config import LoraConfig, load_config
from chatlora.models import native
from chatlora.models.arch import Architecture
from chatlora.models.load import BaseModel, load_model, prepare_base
from chatlora.models.lora import attach

LORA = LoraConfig(r=4, alpha=8.0, dropout=0.1)


def both(directory, lora=LORA, seed=5, dtype="float32"):
    """(native model, peft model) of `directory`, each made right after seeding with `seed`."""
    torch.manual_seed(seed)
    mine = native.load(directory, lora, getattr(torch, dtype), "cpu")
    torch.manual_seed(seed)
    theirs = attach(load_model(BaseModel("m", directory, "hf"), dtype, "cpu"), lora)
    return mine, theirs


def test_a_16_bit_native_model_keeps_its_adapters_in_float32_as_peft_does(family_dir):
    mine, theirs = both(family_dir("qwen3"), dtype="bfloat16")
    peft_params = dict(theirs.named_parameters())
    for name, p in mine.named_parameters():
        assert p.dtype == peft_params[name].dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
        assert torch.equal(p, peft_params[name]), name
    assert torch.equal(Architecture.of(mine.get_base_model()).inv_freq, Architecture.of(theirs.get_base_model()).inv_freq)


@pytest.mark.parametrize("family", ["llama3", "qwen2", "qwen3", "mistral", "index"])
def test_native_model_is_the_transformers_and_peft_model(family, family_dir, index_dir):
    """Every family the model layer covers (Llama 3's RoPE scaling and tied head, Qwen2's biases, Qwen3's
    q/k norms and head_dim, Mistral's window, Index converted to Llama): same names, bit-equal
    tensors (base weights and the seeded initial adapters), same dropout and scale, same architecture."""
    directory = prepare_base(str(index_dir)).dir if family == "index" else family_dir(family)
    assert native.unsupported_reason(directory) is None
    mine, theirs = both(directory)
    ours, peft_params = dict(mine.named_parameters()), dict(theirs.named_parameters())
    assert sorted(ours) == sorted(peft_params)
    for name, p in peft_params.items():
        assert torch.equal(ours[name], p), name
        assert ours[name].requires_grad == p.requires_grad, name
    assert any(p.abs().sum() > 0 for n, p in ours.items() if "lora_A" in n)   # a real initialisation
    q = mine.get_base_model().model.layers[0].self_attn.q_proj
    peft_q = theirs.get_base_model().model.layers[0].self_attn.q_proj
    assert q.scaling == peft_q.scaling and q.lora_dropout["default"].p == peft_q.lora_dropout["default"].p
    a, b = Architecture.of(mine.get_base_model()), Architecture.of(theirs.get_base_model())
    assert torch.equal(a.inv_freq, b.inv_freq)
    fields = ("hidden", "heads", "kv_heads", "head_dim", "vocab", "eps", "rope_scale", "window")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


@pytest.mark.parametrize("family, change", [
    # configs as the hub's files write them, before transformers 5's rope_parameters and layer_types
    ("llama3", lambda c: c.update(rope_theta=c["rope_parameters"].pop("rope_theta"),
                                  rope_scaling=c.pop("rope_parameters"))),
    ("qwen2", lambda c: c.update(rope_theta=c.pop("rope_parameters")["rope_theta"], rope_scaling=None,
                                 layer_types=None, sliding_window=4096, use_sliding_window=False)),
])
def test_hub_config_layouts_read_as_transformers_reads_them(family, change, family_dir, tmp_path):
    import shutil

    directory = tmp_path / family
    shutil.copytree(family_dir(family), directory)
    config = json.loads((directory / "config.json").read_text())
    change(config)
    config = {k: v for k, v in config.items() if v is not None or k == "rope_scaling"}
    (directory / "config.json").write_text(json.dumps(config))
    assert native.unsupported_reason(directory) is None
    mine, theirs = both(directory)
    a, b = Architecture.of(mine.get_base_model()), Architecture.of(theirs.get_base_model())
    assert torch.equal(a.inv_freq, b.inv_freq) and a.window == b.window and a.rope_scale == b.rope_scale


def test_sharded_weights_read_by_their_index_and_other_files_left_alone(family_dir, tmp_path):
    """A sharded checkpoint is read through model.safetensors.index.json, and a safetensors file of
    another format beside it (Mistral's repositories ship consolidated.safetensors) is ignored, as
    transformers ignores it."""
    from safetensors.torch import save_file

    directory = tmp_path / "sharded"
    load_model(BaseModel("m", family_dir("mistral"), "hf"), "float32", "cpu").save_pretrained(
        directory, max_shard_size="100KB")
    assert len(native.weight_files(directory)) > 1
    save_file({"layers.0.attention.wq.weight": torch.ones(2, 2)}, str(directory / "consolidated.safetensors"))
    assert native.unsupported_reason(directory) is None
    mine, theirs = both(directory)
    peft_params = dict(theirs.named_parameters())
    assert all(torch.equal(p, peft_params[n]) for n, p in mine.named_parameters())


def test_fused_pass_on_the_native_model_equals_it_on_the_peft_model(family_dir):
    """The fused pass's loss and every adapter gradient on one packed row, dropout off."""
    from chatlora.data.dataset import Example
    from chatlora.train.fused_step import FusedStep

    mine, theirs = both(family_dir("qwen3"), LoraConfig(r=4, alpha=8.0, dropout=0.0))
    g = torch.Generator().manual_seed(1)
    examples = [Example(ids, [-100] * 3 + ids[3:], 0) for ids in
                (torch.randint(0, 4000, (n,), generator=g).tolist() for n in (9, 14, 6))]
    results = []
    for model in (mine, theirs):
        with torch.no_grad():   # B is zero at the start: give the adapters something to say
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        step = FusedStep(model, "cpu")
        step.zero_grad()
        loss = step.accumulate(examples, 16, 2048, sum(len(e.input_ids) - 3 for e in examples))
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, grad in results[1][1].items():
        assert torch.allclose(results[0][1][name], grad, rtol=1e-5, atol=1e-7), name


def test_native_adapter_directory_loads_in_peft(family_dir, tmp_path):
    """save_pretrained writes what peft writes: peft loads it into the transformers model with the same
    weights, and reads the same LoRA settings as from its own directory."""
    from chatlora.models.lora import load_adapter

    lora = LoraConfig(r=4, alpha=8.0, dropout=0.1, rslora=True)
    mine, theirs = both(family_dir("llama3"), lora)
    with torch.no_grad():
        for n, p in mine.named_parameters():
            if p.requires_grad:
                p.normal_()
    mine.save_pretrained(str(tmp_path / "native"))
    theirs.save_pretrained(str(tmp_path / "peft"), safe_serialization=True)
    loaded = load_adapter(load_model(BaseModel("m", family_dir("llama3"), "hf"), "float32", "cpu"), tmp_path / "native")
    ours = dict(mine.named_parameters())
    for name, p in loaded.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, ours[name]), name
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("native", "peft")]
    for key in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora",
                "base_model_name_or_path"):
        assert configs[0][key] == configs[1][key], key
    assert sorted(configs[0]["target_modules"]) == sorted(configs[1]["target_modules"])


@pytest.mark.parametrize("change, reason", [
    (lambda c: c["rope_parameters"].update(rope_type="yarn", factor=2.0), "RoPE type 'yarn'"),
    (lambda c: c.pop("rope_parameters"), "rope_theta"),
    (lambda c: c.pop("rms_norm_eps"), "rms_norm_eps"),
    (lambda c: c.update(model_type="gemma2"), "model type 'gemma2'"),
    (lambda c: c.update(layer_types=None, use_sliding_window=True), "sliding window"),
    (lambda c: c.update(num_hidden_layers=1), "weights other than the model layer's"),
    (lambda c: c.update(intermediate_size=128), "weights other than the model layer's"),   # shapes
    (lambda c: c.update(model_type="llama"), "weights other than the model layer's"),      # biases Llama lacks
    (lambda c: c.pop("num_key_value_heads"), "num_key_value_heads"),
])
def test_what_the_native_model_cannot_read_exactly_is_named(family_dir, tmp_path, change, reason):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(family_dir("qwen2"), directory)
    config = json.loads((directory / "config.json").read_text())
    change(config)
    (directory / "config.json").write_text(json.dumps(config))
    assert reason in (native.unsupported_reason(directory) or "")


def test_a_damaged_weight_file_is_left_to_transformers_to_report(family_dir, tmp_path):
    import shutil

    directory = tmp_path / "model"
    shutil.copytree(family_dir("qwen3"), directory)
    (directory / "model.safetensors").write_bytes(b"\xff" * 16)
    assert "model.safetensors unreadable" in native.unsupported_reason(directory)


def test_runs_that_need_transformers_say_why(index_dir):
    from chatlora.train.distributed import Ranks
    from chatlora.train.gradients import native_model_reason

    one, converted = Ranks(), prepare_base(str(index_dir)).dir

    def reason(*overrides, device="cpu"):
        return native_model_reason(converted, load_config(overrides=list(overrides)), device, one)
    assert reason("train.fast_path=eager") is None
    assert reason("train.fast_path=auto") == "the plain peft path"      # CPU: the plain path
    assert reason("train.fast_path=eager", "model.quantize=nf4") == "a 4-bit base"
    assert "DoRA" in reason("train.fast_path=eager", "lora.dora=true")
    assert reason("train.fast_path=eager", "train.packing=false") == "the plain peft path"


def test_graphs_asked_for_on_a_cpu_stay_the_users_error_on_the_model_read_directly(index_dir, tiny_data, tmp_path):
    """`train.fast_path=graphs` on a CPU picks the native model (a fused-pass run) and then cannot
    capture graphs: a UserError naming why, as with transformers' model, not an internal error."""
    from chatlora.errors import UserError
    from chatlora.train.distributed import Ranks
    from chatlora.train.gradients import native_model_reason
    from chatlora.train.loop import train

    cfg = load_config(overrides=["train.fast_path=graphs", "train.max_steps=1"],
                      flags={"model.path": str(index_dir), "data.path": str(tiny_data)})
    assert native_model_reason(prepare_base(str(index_dir)).dir, cfg, "cpu", Ranks()) is None
    with pytest.raises(UserError, match="train.fast_path=graphs is not available: CUDA graphs need a GPU"):
        train(cfg, tmp_path / "run")


def test_training_without_transformers_imports_neither_library_and_resumes_exactly(index_dir, tiny_data, tmp_path):
    """A fused-pass run (CPU, eager) on a model the native module reads imports neither transformers'
    model classes nor peft, nor torch._dynamo (torch.optim's import: seconds of a start); resumed from its step-2 checkpoint, it repeats step 3 exactly (dropout on:
    the masks' RNG state is restored too)."""
    prepare_base(str(index_dir))   # a cached model: the conversion, once per download, uses transformers
    script = f"""
import sys, json
from chatlora.config import load_config
from chatlora.train.loop import train
def cfg(steps):
    return load_config(overrides=["train.fast_path=eager", f"train.max_steps={{steps}}", "train.save_every=2",
                                  "train.examples_per_step=4", "data.held_out_fraction=0.1"],
                       flags={{"model.path": {str(index_dir)!r}, "data.path": {str(tiny_data)!r}}})
import shutil
train(cfg(3), {str(tmp_path / "straight")!r})
shutil.copytree({str(tmp_path / "straight")!r}, {str(tmp_path / "resumed")!r})   # as it stood after step 2
shutil.rmtree({str(tmp_path / "resumed" / "final")!r})
train(cfg(3), {str(tmp_path / "resumed")!r}, resume=True)
print(json.dumps([m for m in ("peft", "transformers.modeling_utils", "transformers.models.auto.modeling_auto",
                            "torch._dynamo") if m in sys.modules]))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == []
    assert "checkpoint-2 (step 2 of 3)" in run.stderr   # resumed, not started again
    from safetensors.torch import load_file

    straight = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "resumed" / "final" / "adapter_model.safetensors"))
    assert straight.keys() == resumed.keys() and straight
    for name, t in straight.items():
        assert torch.equal(t, resumed[name]), name
    rows = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    startup = next(r["startup_s"] for r in rows if "startup_s" in r)
    assert list(startup) == ["data", "device", "model", "optimizer", "ready"]   # no library import on the way
