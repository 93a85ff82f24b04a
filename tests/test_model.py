"""Base-model loading: Index natively (NormHead folded, no remote code, no unsafe pickle), GGUF, hub ids."""

import fnmatch
import json
import os
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chatlora.errors import UserError
from chatlora.models import hub
from chatlora.models.load import load_model, pick_dtype, prepare_base
from chatlora.testing import REMOTE_CODE_MARKER, make_index_dir


def reference_index_logits(index_dir, ids: torch.Tensor) -> torch.Tensor:
    """Index's forward written out from docs/index-model.md, in float64: Llama blocks + NormHead."""
    config = json.loads((index_dir / "config.json").read_text())
    w = {k: v.double() for k, v in torch.load(index_dir / "pytorch_model.bin", weights_only=True).items()}
    eps, heads = config["rms_norm_eps"], config["num_attention_heads"]
    theta = config.get("rope_theta", 10000.0) * config.get("rope_ratio", 1)
    n, h = ids.shape[-1], config["hidden_size"]
    d = h // heads

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rope(x):  # rotate-half (NEOX) over the full head_dim
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = w["model.embed_tokens.weight"][ids]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = rms(x, w[p + "input_layernorm.weight"])
        q, k, v = (a @ w[p + f"self_attn.{m}_proj.weight"].T for m in "qkv")
        q, k, v = (t.view(n, heads, d).transpose(0, 1) for t in (q, k, v))
        q, k = rope(q), rope(k)
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + mask, -1) @ v
        x = x + att.transpose(0, 1).reshape(n, h) @ w[p + "self_attn.o_proj.weight"].T
        m = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = torch.nn.functional.silu(m @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (m @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    x = rms(x, w["model.norm.weight"])
    head = w["lm_head.weight"]
    return x @ (head / head.norm(dim=1, keepdim=True)).T  # NormHead


def test_index_logits_match_reference_normhead_forward(index_dir):
    model = load_model(prepare_base(str(index_dir)), dtype="float32", device="cpu")
    ids = torch.tensor([0, 17, 230, 3, 999, 42, 4, 5, 6, 2])
    with torch.no_grad():
        got = model(ids[None]).logits[0].double()
    torch.testing.assert_close(got, reference_index_logits(index_dir, ids), atol=1e-5, rtol=0)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_index_remote_code_never_runs(index_dir):
    base = prepare_base(str(index_dir))
    load_model(base, dtype="float32", device="cpu")
    from chatlora.models.load import load_tokenizer

    load_tokenizer(base).encode("hello")
    assert not (index_dir / REMOTE_CODE_MARKER).exists()
    assert not any("modeling_index" in m or "tokenization_index" in m for m in sys.modules)
    assert not list(base.dir.glob("*.py")), "remote code must not be copied into the converted directory"


def test_index_rope_ratio_scales_rope_base(tmp_path, sp_model_file):
    long_dir = make_index_dir(tmp_path / "Index-32K-tiny", sp_model_file, rope_ratio=32,
                              max_position_embeddings=512)
    model = load_model(prepare_base(str(long_dir)), dtype="float32", device="cpu")
    assert model.config.rope_parameters["rope_theta"] == 320000.0
    ids = torch.arange(5, 60)
    with torch.no_grad():
        got = model(ids[None]).logits[0].double()
    torch.testing.assert_close(got, reference_index_logits(long_dir, ids), atol=1e-5, rtol=0)


def test_index_from_safetensors_weights(tmp_path, index_dir):
    from safetensors.torch import save_file

    st_dir = tmp_path / "Index-st"
    st_dir.mkdir()
    for f in index_dir.iterdir():
        if f.name != "pytorch_model.bin" and f.is_file():
            (st_dir / f.name).write_bytes(f.read_bytes())
    state = torch.load(index_dir / "pytorch_model.bin", weights_only=True)
    save_file(state, str(st_dir / "model.safetensors"))
    a = load_model(prepare_base(str(index_dir)), dtype="float32", device="cpu")
    b = load_model(prepare_base(str(st_dir)), dtype="float32", device="cpu")
    ids = torch.tensor([[0, 5, 6, 7, 3, 8]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, atol=0, rtol=0)


def test_conversion_is_cached_and_reused(index_dir):
    first = prepare_base(str(index_dir)).dir
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = prepare_base(str(index_dir)).dir
    assert first == second and (second / "model.safetensors").stat().st_mtime_ns == mtime
    assert str(first).startswith(os.environ["CHATLORA_CACHE"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_without_running(tmp_path, index_dir):
    bad = tmp_path / "Index-evil"
    bad.mkdir()
    (bad / "config.json").write_text((index_dir / "config.json").read_text())
    (bad / "tokenizer.model").write_bytes((index_dir / "tokenizer.model").read_bytes())
    marker = tmp_path / "pwned"
    for proto_file in ("pytorch_model.bin",):
        (bad / proto_file).write_bytes(pickle.dumps({"lm_head.weight": _Evil(marker)}))
    with pytest.raises(UserError, match="refusing to load .*pytorch_model.bin"):
        prepare_base(str(bad))
    assert not marker.exists()
    assert not list((hub.cache_root() / "converted").glob("Index-evil*")), "no half-made conversion is left"


def test_index_weights_that_do_not_match_config_are_named(tmp_path, index_dir):
    bad = tmp_path / "Index-mismatch"
    bad.mkdir()
    config = json.loads((index_dir / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (bad / "config.json").write_text(json.dumps(config))
    (bad / "pytorch_model.bin").write_bytes((index_dir / "pytorch_model.bin").read_bytes())
    with pytest.raises(UserError, match="missing .*model.layers.2"):
        prepare_base(str(bad))


def test_smollm2_gguf_loads_and_answers(smollm2_base, smollm2_tok):
    from chatlora.templates import chat_format

    model = load_model(smollm2_base, device="cpu")
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    fmt = chat_format("auto", smollm2_tok)
    ids = fmt.prompt([{"role": "user", "content": "What is the capital of France?"}])
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "Paris" in smollm2_tok.decode(out[0, len(ids):].tolist())


def test_unknown_hub_id_says_how_to_get_it():
    with pytest.raises(UserError, match="chatlora download someone/not-here"):
        prepare_base("someone/not-here")


def test_missing_path_and_non_model_dir(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        prepare_base(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no config.json"):
        prepare_base(str(tmp_path))


def test_dtype_defaults():
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16


def test_plain_hf_directory_is_used_as_is(tmp_path, smollm2_base):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "plain")
    base = prepare_base(str(tmp_path / "plain"))
    assert (base.dir, base.family) == (tmp_path / "plain", "hf")
    assert load_model(base, device="cpu").config.vocab_size == 128
    again = prepare_base(str(smollm2_base.dir))  # a converted directory keeps its family
    assert (again.dir, again.family) == (smollm2_base.dir, "hf")


def fake_hub(monkeypatch, files):
    """huggingface_hub's listing and download, offline: the repository holds `files`."""
    import huggingface_hub

    calls = {}

    def snapshot_download(model_id, revision=None, local_dir=None, ignore_patterns=()):
        calls.update(model_id=model_id, ignore=list(ignore_patterns))
        fetched = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in ignore_patterns)]
        for name in fetched:
            (local_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (local_dir / name).write_text("{}")
        calls["fetched"] = sorted(fetched)

    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda model_id, revision=None: files)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_download_goes_to_cache_without_remote_code(monkeypatch):
    calls = fake_hub(monkeypatch, ["config.json", "pytorch_model.bin", "modeling_index.py", "tokenizer.model"])
    path = hub.download("IndexTeam/Index-1.9B-Chat")
    assert path == hub.cache_root() / "models" / "IndexTeam" / "Index-1.9B-Chat"
    assert calls["model_id"] == "IndexTeam/Index-1.9B-Chat"
    assert calls["fetched"] == ["config.json", "pytorch_model.bin", "tokenizer.model"]   # its only weights
    assert hub.resolve_model_path("IndexTeam/Index-1.9B-Chat") == path  # found offline afterwards


def test_download_takes_one_copy_of_the_weights(monkeypatch):
    """Llama 3.2's repository also holds Meta's own checkpoint under original/, Mistral's a
    consolidated one, some repositories pickle weights beside safetensors: only the safetensors come."""
    llama = ["config.json", "model.safetensors", "tokenizer.json", "original/consolidated.00.pth",
             "original/params.json", "original/tokenizer.model"]
    calls = fake_hub(monkeypatch, llama)
    hub.download("meta-llama/Llama-3.2-1B-Instruct")
    assert calls["fetched"] == ["config.json", "model.safetensors", "tokenizer.json"]
    calls = fake_hub(monkeypatch, ["config.json", "model-00001-of-00002.safetensors", "consolidated.safetensors",
                                   "pytorch_model-00001-of-00002.bin", "tokenizer.json"])
    hub.download("mistralai/Mistral-7B-Instruct-v0.3")
    assert calls["fetched"] == ["config.json", "model-00001-of-00002.safetensors", "tokenizer.json"]


def test_download_failures_say_what_to_do(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(model_id, revision=None):
        raise GatedRepoError("403 Client Error", response=SimpleNamespace(headers={}, status_code=403, request=None))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", gated)
    with pytest.raises(UserError, match="gated.*accept its license.*HF_TOKEN"):
        hub.download("meta-llama/Llama-3.2-1B-Instruct")


def test_download_says_what_each_family_gets():
    assert "fused training pass" in hub.describe_support({"model_type": "qwen3"})
    assert "loaded as a Llama model" in hub.describe_support({"model_type": "index"})
    gemma = hub.describe_support({"model_type": "gemma2"})
    assert "transformers' own forward" in gemma and "GeGLU" in gemma
    custom = hub.describe_support({"model_type": "internlm2", "auto_map": {"AutoModel": "modeling.X"}})
    assert "never runs" in custom


def test_concurrent_conversions_share_one_result(tmp_path, sp_model_file, monkeypatch):
    """Two processes converting the same model at once (two training ranks): the one that finishes
    second finds the directory in place and uses it instead of failing."""
    import chatlora.atomic as atomic
    import chatlora.models.load as model_mod
    from chatlora.testing import make_index_dir

    source = make_index_dir(tmp_path / "Index-race", sp_model_file)
    real_replace = atomic.os.replace

    def replace_after_a_rival(src, dst):
        if not Path(dst).name.startswith("index-"):   # other atomic writes (the fingerprint memo) go through
            return real_replace(src, dst)
        Path(dst).mkdir(parents=True)            # the rival's complete result lands first
        (Path(dst) / "config.json").write_text((Path(src) / "config.json").read_text())
        return real_replace(src, dst)             # now fails: directory not empty

    monkeypatch.setattr(atomic.os, "replace", replace_after_a_rival)
    base = model_mod.prepare_base(str(source))
    assert (base.dir / "config.json").is_file() and not list(base.dir.parent.glob(".tmp-*"))


def test_copies_of_the_same_model_share_one_conversion_and_the_cache_lists_and_cleans(tmp_path, sp_model_file,
                                                                                      monkeypatch):
    """The conversion is keyed on the files' content: a second clone (or virtual environment) with the
    same files reuses it instead of adding another copy; `chatlora cache` lists where it came from
    and `clean` removes conversions whose sources are gone."""
    import shutil

    from chatlora import cache
    from chatlora.cli import main
    from chatlora.models import hub
    from chatlora.testing import make_index_dir

    monkeypatch.setenv("CHATLORA_CACHE", str(tmp_path / "cache"))
    first = make_index_dir(tmp_path / "clone-a" / "Index-tiny", sp_model_file)
    second = tmp_path / "clone-b" / "Index-tiny"
    shutil.copytree(first, second)
    a, b = prepare_base(str(first)), prepare_base(str(second))
    assert a.dir == b.dir and len(list((hub.cache_root() / "converted").glob("index-*"))) == 1
    listed = cache.describe()
    assert str(first.resolve()) in listed and str(second.resolve()) in listed and "(in use)" in listed
    changed = make_index_dir(tmp_path / "clone-c" / "Index-tiny", sp_model_file, rms_norm_eps=1e-5)
    assert prepare_base(str(changed)).dir != a.dir   # other bytes: its own conversion
    shutil.rmtree(tmp_path / "clone-c")
    assert main(["cache", "clean"]) == 0
    assert [c.dir for c in cache.conversions()] == [a.dir]   # the one whose source is gone went


def test_16bit_weights_load_straight_onto_a_gpu(index_dir, monkeypatch):
    """On a GPU the 16-bit base goes from its file to the device (transformers' device_map), not
    through a CPU copy of the whole model; a 4-bit base loads on the CPU and is quantised weight by
    weight on its way (models/quantize.py), and CPU loads are plain."""
    from transformers import AutoModelForCausalLM

    import chatlora.models.load as load_module

    asked = []
    real = AutoModelForCausalLM.from_pretrained

    def recording(path, **kwargs):
        asked.append(kwargs.get("device_map"))
        return real(path, **{k: v for k, v in kwargs.items() if k != "device_map"})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    monkeypatch.setattr(load_module, "quantize_base", lambda model, targets, device: None)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **kw: self)   # no GPU here to move to
    base = prepare_base(str(index_dir))
    for device, quantize in (("cuda", "none"), ("cuda:1", "none"), ("cuda", "nf4"), ("cpu", "none")):
        load_model(base, dtype="float32", device=device, quantize=quantize)
    assert asked == ["cuda", "cuda:1", None, None]
