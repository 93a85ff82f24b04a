"""A base model read straight from its safetensors files, with LoRA adapters laid out as peft lays them
out: what the fused training pass (train/fused.py) reads, without importing transformers or peft.

Why: the fused pass computes the whole function itself (models/arch.py); of transformers and peft it
only uses the module tree that holds the weights. Their model classes take seconds to import (on an
H200 host 5.5 s, half of a cached start), and building the model through them costs more. Here the
tree is plain torch modules with the same names and attributes (`model.layers.N.self_attn.q_proj
.lora_A.default.weight`, `base_layer`, `scaling`, `lora_dropout`), so parameter names, checkpoints and
the adapter directory are the ones peft makes and reads (tests/test_native.py loads them with peft).

    reason = unsupported_reason(directory)               # None: this module reads that model exactly
    model = load(directory, lora_cfg, torch.bfloat16, "cuda")
    model.save_pretrained(out)                           # adapter_config.json + adapter_model.safetensors

The adapters start as peft starts them (A: Kaiming-uniform, B: zeros, drawn in the same order from the
same generator), so a seed gives the same initial adapter on either path. What this module cannot
read exactly (a RoPE type it does not compute, a config that leaves a field to transformers' default
for the family, unknown weights) it names in `unsupported_reason`, and the caller loads through
transformers and peft instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from chatlora.atomic import write_text
from chatlora.models.arch import FAMILIES, PROJECTIONS
from chatlora.models.lora import ADAPTER, saved_name

ROPE_TYPES = ("default", "linear", "llama3")
# Config fields whose absence would leave the value to transformers' per-family defaults.
REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "rms_norm_eps")


def weight_files(directory: Path) -> list[Path]:
    """The model's safetensors files, as transformers picks them: those of the shard index, else
    model.safetensors (a repository may hold other formats' files beside them, e.g. Mistral's
    consolidated.safetensors)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            return []
        return [directory / name for name in shards]
    return [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else []


def read_config(directory: Path) -> SimpleNamespace | str:
    """config.json as the attributes the model layer reads, or why this module cannot read it exactly."""
    try:
        raw = json.loads((Path(directory) / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return f"config.json unreadable ({e})"
    kind = raw.get("model_type")
    if kind not in FAMILIES:
        return f"model type {kind!r}"
    missing = [k for k in REQUIRED if k not in raw]
    if kind == "qwen3" and "head_dim" not in raw:
        missing.append("head_dim")
    if kind == "mistral" and "sliding_window" not in raw:
        missing.append("sliding_window")
    if missing:
        return f"config.json leaves {', '.join(missing)} to transformers' defaults"
    c = SimpleNamespace(**raw)
    c._name_or_path = str(directory)
    c.num_key_value_heads = raw["num_key_value_heads"] or c.num_attention_heads   # null: as many as the heads
    c.head_dim = raw.get("head_dim") or c.hidden_size // c.num_attention_heads
    c.hidden_act = raw.get("hidden_act", "silu")
    c.tie_word_embeddings = bool(raw.get("tie_word_embeddings", False))
    c.sliding_window = raw.get("sliding_window")
    c.layer_types = raw.get("layer_types")
    if kind in ("qwen2", "qwen3") and c.layer_types is None:
        if raw.get("use_sliding_window"):
            return "a sliding window on some layers (max_window_layers), left to transformers to lay out"
        c.layer_types = ["full_attention"] * c.num_hidden_layers
    return c


def rope(config: SimpleNamespace) -> tuple[torch.Tensor, str] | str:
    """RoPE's inverse frequencies [head_dim / 2] (fp32) and type, as transformers computes them for
    the types in ROPE_TYPES (each with attention scaling 1), or why not."""
    raw = vars(config)
    params = raw.get("rope_parameters") or {**(raw.get("rope_scaling") or {}), "rope_theta": raw.get("rope_theta")}
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta") or raw.get("rope_theta")
    if kind not in ROPE_TYPES:
        return f"RoPE type {kind!r}"
    if theta is None:
        return "config.json leaves rope_theta to transformers' defaults"
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        return "RoPE on part of each head"
    dim = config.head_dim
    inv_freq = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind == "llama3":   # Llama 3's long-context scaling: low frequencies / factor, a smooth band between
        factor, low, high = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
        original = params["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        middle = (wavelength >= original / high) & (wavelength <= original / low)
        inv_freq = torch.where(middle, smoothed, scaled)
    return inv_freq, kind


def biased(config: SimpleNamespace) -> set[str]:
    """The projections with a bias, as each family's transformers class builds them."""
    attention, mlp = {"q_proj", "k_proj", "v_proj", "o_proj"}, {"gate_proj", "up_proj", "down_proj"}
    if config.model_type == "qwen2":
        return {"q_proj", "k_proj", "v_proj"}
    if config.model_type == "mistral":
        return set()
    out = attention if getattr(config, "attention_bias", False) else set()
    return out | (mlp if config.model_type == "llama" and getattr(config, "mlp_bias", False) else set())


def expected_weights(config: SimpleNamespace) -> dict[str, tuple[int, ...]]:
    """Every weight of this config's model (as transformers' class for the family builds it) and its shape."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    outs_ins = {"q_proj": (q, c.hidden_size), "k_proj": (kv, c.hidden_size), "v_proj": (kv, c.hidden_size),
                "o_proj": (c.hidden_size, q), "gate_proj": (c.intermediate_size, c.hidden_size),
                "up_proj": (c.intermediate_size, c.hidden_size), "down_proj": (c.hidden_size, c.intermediate_size)}
    names = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        names["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    with_bias = biased(c)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        names[p + "input_layernorm.weight"] = names[p + "post_attention_layernorm.weight"] = (c.hidden_size,)
        for parent, modules in PROJECTIONS.values():
            for m in modules:
                names[f"{p}{parent}.{m}.weight"] = outs_ins[m]
                if m in with_bias:
                    names[f"{p}{parent}.{m}.bias"] = outs_ins[m][:1]
        if c.model_type == "qwen3":
            names[p + "self_attn.q_norm.weight"] = names[p + "self_attn.k_norm.weight"] = (c.head_dim,)
    return names


def unsupported_reason(directory: Path) -> str | None:
    """None when `load` builds exactly the model that transformers would, else why not. Reads
    config.json and the safetensors headers only (which adapters the fused pass covers is its own
    question: train/fused.adapter_reason)."""
    from safetensors import safe_open

    config = read_config(directory)
    if isinstance(config, str):
        return config
    rotary = rope(config)
    if isinstance(rotary, str):
        return rotary
    files = weight_files(directory)
    if not files or not all(f.is_file() for f in files):
        return "no model.safetensors or complete shard index"
    present: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                present.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:   # safetensors' own error type: a damaged file is transformers' to report
            return f"{path.name} unreadable ({e})"
    # old files keep RoPE's table; transformers ties a tied head to the embeddings whatever the file has
    present = {k: v for k, v in present.items() if not k.endswith("rotary_emb.inv_freq")
               and not (config.tie_word_embeddings and k == "lm_head.weight")}
    expected = expected_weights(config)
    odd = sorted(set(present) ^ set(expected)) or sorted(k for k in expected if present[k] != expected[k])
    if odd:
        return f"weights other than the model layer's ({', '.join(odd[:3])}{'...' if len(odd) > 3 else ''})"
    return None


class Weight(nn.Module):
    """A module holding one frozen weight (norms, embeddings, the head); given a parameter, that
    parameter itself (a tied head)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)


class Linear(nn.Module):
    """A frozen linear layer's weight [out, in] and bias (None where it has none)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)


class LoraLinear(nn.Module):
    """A linear layer with one LoRA adapter, in peft's layout: `base_layer`, `lora_A[ADAPTER]`
    [r, in], `lora_B[ADAPTER]` [out, r], `lora_dropout[ADAPTER]`, `scaling[ADAPTER]`. The update is
    computed by the fused pass; this module only holds it."""

    def __init__(self, base: Linear, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        out_features, in_features = base.weight.shape
        self.base_layer = base
        # peft's order of draws: A's and B's own initialisation as nn.Linear, then A again (Kaiming
        # uniform) and B set to zero
        a, b = nn.Linear(in_features, r, bias=False), nn.Linear(r, out_features, bias=False)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        # peft moves new adapters to the base weight's device and dtype, then back to float32
        # (autocast_adapter_dtype): a 16-bit base's adapters start rounded to 16 bits
        place = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ModuleDict({ADAPTER: a.to(**place).float()})
        self.lora_B = nn.ModuleDict({ADAPTER: b.to(**place).float()})
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(dropout) if dropout > 0 else nn.Identity()})
        self.scaling = {ADAPTER: alpha / math.sqrt(r) if rslora else alpha / r}

    @property
    def weight(self) -> torch.Tensor:   # as peft's layers: the base layer's, for whoever inspects the model
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias


class NativeCausalLM(nn.Module):
    """The decoder's weights under transformers' names: `model.embed_tokens`, `model.layers[i]
    .self_attn.q_proj`, ..., `model.norm`, `model.rotary_emb`, `lm_head`, and `config`."""

    def __init__(self, config: SimpleNamespace, weights: dict[str, torch.Tensor], inv_freq: torch.Tensor,
                 rope_type: str):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = Weight(weights["model.embed_tokens.weight"])
        self.model.norm = Weight(weights["model.norm.weight"])
        self.model.rotary_emb = nn.Module()
        self.model.rotary_emb.register_buffer("inv_freq", inv_freq.to(weights["model.norm.weight"].device),
                                              persistent=False)
        self.model.rotary_emb.rope_type, self.model.rotary_emb.attention_scaling = rope_type, 1.0
        self.model.layers = nn.ModuleList()
        for i in range(config.num_hidden_layers):
            p = f"model.layers.{i}."
            layer = nn.Module()
            layer.input_layernorm = Weight(weights[p + "input_layernorm.weight"])
            layer.post_attention_layernorm = Weight(weights[p + "post_attention_layernorm.weight"])
            for parent, modules in PROJECTIONS.values():   # q, k, v, o, then gate, up, down: transformers' order
                if not hasattr(layer, parent):
                    setattr(layer, parent, nn.Module())
                for m in modules:
                    setattr(getattr(layer, parent), m,
                            Linear(weights[f"{p}{parent}.{m}.weight"], weights.get(f"{p}{parent}.{m}.bias")))
            for n in ("q_norm", "k_norm"):
                if p + f"self_attn.{n}.weight" in weights:
                    setattr(layer.self_attn, n, Weight(weights[p + f"self_attn.{n}.weight"]))
            self.model.layers.append(layer)
        # a tied head is the embeddings' tensor itself, as transformers ties them
        self.lm_head = Weight(self.model.embed_tokens.weight if config.tie_word_embeddings
                              else weights["lm_head.weight"])


class NativeLoraModel(nn.Module):
    """`NativeCausalLM` with LoRA adapters, under peft's names (`base_model.model.` + the model's)."""

    def __init__(self, lm: NativeCausalLM, lora_cfg):
        super().__init__()
        self.lora_cfg = lora_cfg
        self.base_model = nn.Module()
        self.base_model.model = lm
        for layer in lm.model.layers:   # in peft's order: each layer's modules as the model lists them
            for parent in (layer.self_attn, layer.mlp):
                for name, module in list(parent.named_children()):
                    if name in lora_cfg.targets:
                        setattr(parent, name, LoraLinear(module, lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout,
                                                         lora_cfg.rslora))

    def get_base_model(self) -> NativeCausalLM:
        return self.base_model.model

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The adapter weights under the names peft saves them with (the adapter's name left out)."""
        return {saved_name(n): p for n, p in self.named_parameters() if p.requires_grad}

    def save_pretrained(self, directory: str, safe_serialization: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The adapter directory peft writes: adapter_config.json and adapter_model.safetensors.
        `state_dict`: the adapter weights to write, under the parameters' names (a snapshot)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = ({saved_name(n): t for n, t in state_dict.items()} if state_dict is not None
                   else self.adapter_tensors())
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()},
                  str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
        write_text(directory / "adapter_config.json", json.dumps(self.adapter_config(), indent=2) + "\n",
                   overwrite=True)

    def adapter_config(self) -> dict:
        """peft's LoraConfig fields for this adapter (peft fills every other field with its default)."""
        c = self.lora_cfg
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM",
                "base_model_name_or_path": self.get_base_model().config._name_or_path,
                "r": c.r, "lora_alpha": c.alpha, "lora_dropout": c.dropout, "target_modules": sorted(c.targets),
                "bias": "none", "use_rslora": c.rslora, "use_dora": False, "fan_in_fan_out": False,
                "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "lora_bias": False}

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Copy saved adapter weights (peft's names) into the adapters; every one must fit."""
        params = self.adapter_tensors()
        if set(tensors) != set(params):
            odd = sorted(set(tensors) ^ set(params))
            raise RuntimeError(f"{source}: adapter weights do not fit the model: {odd[:3]}")
        for name, p in params.items():
            p.copy_(tensors[name])


def load(directory: Path, lora_cfg, dtype: torch.dtype, device: str) -> NativeLoraModel:
    """The model in `directory` (see `unsupported_reason`) in `dtype` on `device`, with fresh adapters
    (float32, as peft keeps the adapters of a 16-bit model), ready to train."""
    from safetensors.torch import load_file

    config = read_config(directory)
    inv_freq, rope_type = rope(config)
    place = torch.device(device)
    if place.type == "cuda" and place.index is None:
        place = torch.device("cuda", torch.cuda.current_device())
    weights: dict[str, torch.Tensor] = {}
    for path in weight_files(directory):   # straight to the device: no host copy of the whole model
        for name, tensor in load_file(str(path), device=str(place)).items():
            weights[name] = tensor.to(dtype)
    return NativeLoraModel(NativeCausalLM(config, weights, inv_freq, rope_type), lora_cfg)
