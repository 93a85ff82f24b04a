"""The decoder architecture that chatlora's fast paths compute, described once: the fused training
pass (train/fused.py) and the decoder (decode/arithmetic.py) both build on this module and neither
owns it.

    arch = Architecture.of(lm)          # the shape and RoPE, read once from the config
    layers = fused_layers(lm)           # per layer: the two norms and the four fused projections
    cos, sin = arch.rope(positions, dtype)
    h = block(arch, h, layers[0], attend, linear)   # one layer, with the caller's projections and attention

`unsupported_reason(lm)` says why a model is not one of these (the caller then keeps transformers'
own forward). A layer is: RMSNorm -> fused q/k/v projection -> RoPE on q and k -> attention -> o
projection added to the residual -> RMSNorm -> fused gate/up projection -> SiLU(gate) * up -> down
projection added to the residual. `PROJECTIONS` says which of the model's linear modules make each
fused projection. A model family is a small difference to this layer, read from the model itself,
not another copy of the forward (`FAMILIES`):
  - biases on projections (Qwen2's q/k/v; Llama's `attention_bias`/`mlp_bias`): `Projection.bias`;
  - RMSNorm on each head of q and k before RoPE (Qwen3): `Layer.q_norm`, `Layer.k_norm`;
  - attention within a sliding window (Mistral; Qwen2/3 with `use_sliding_window` on every layer):
    `Architecture.window`, which the training mask and the decoder's valid columns apply;
  - Llama 3's RoPE scaling, tied embeddings, a `head_dim` of its own: read as the model has them
    (its rotary embedding's frequencies, `lm_head.weight`, `config.head_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatlora.models.quantize import QuantizedWeight, is_nf4, quantized_matmul

# Each fused projection: the parent module of its linear layers, and their names in output order.
PROJECTIONS = {"qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
               "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",))}
TARGETS = {name for _, names in PROJECTIONS.values() for name in names}   # the modules LoRA may adapt


# The model types whose layer is this module's layer with the differences above.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# What the layer lacks for families people ask about (the message names it).
MISSING = {
    "gemma": "RMSNorm scaled by 1 + w, GeGLU, embeddings scaled by sqrt(hidden)",
    "gemma2": "RMSNorm scaled by 1 + w, norms after attention and MLP, GeGLU, embedding scaling, "
              "attention and logit soft-capping, alternating sliding-window layers",
    "gemma3_text": "RMSNorm scaled by 1 + w, norms after attention and MLP, GeGLU, embedding scaling, "
                   "alternating sliding-window layers with their own RoPE",
}


def unsupported_reason(lm) -> str | None:
    """None when this module's layer computes the transformers model `lm`'s function, else why not."""
    c = lm.config
    if c.model_type not in FAMILIES:
        lacks = MISSING.get(c.model_type)
        return (f"model type {c.model_type!r}: the model layer lacks {lacks}" if lacks else
                f"model type {c.model_type!r} (the fast paths cover {', '.join(FAMILIES)})")
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation {c.hidden_act!r}"
    rope = getattr(lm.model.rotary_emb, "rope_type", "default")
    if rope.startswith("dynamic") or rope == "longrope":
        return f"RoPE type {rope!r} depends on the sequence length"
    kinds = set(getattr(c, "layer_types", None) or [])
    if len(kinds) > 1:
        return f"layers with different attention ({', '.join(sorted(kinds))})"
    layer = lm.model.layers[0]
    for name, (parent, names) in PROJECTIONS.items():
        biased = {getattr(getattr(layer, parent), n).bias is not None for n in names}
        if len(biased) > 1:
            return f"biases on some of the {name} projection's modules but not all"
    if (getattr(layer.self_attn, "q_norm", None) is None) != (getattr(layer.self_attn, "k_norm", None) is None):
        return "a norm on q or k alone"
    return None


def sliding_window(config) -> int | None:
    """The attention window of every layer (None: the whole sequence). Mistral's `sliding_window`
    applies to every layer; Qwen2/3 say per layer (`layer_types`) and keep `sliding_window` set even
    where no layer uses it."""
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if kinds is not None and "sliding_attention" not in kinds:
        return None
    return window or None


@dataclass(frozen=True, eq=False)
class Architecture:
    """The shape of a supported model and its RoPE, read once from its config."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: torch.Tensor    # RoPE's inverse frequencies [head_dim / 2] (fp32), as the model computes them
    rope_scale: float         # the rotary embedding's attention scaling (1 for default RoPE)
    window: int | None = None   # a position attends to the `window` positions ending at itself

    @classmethod
    def of(cls, lm) -> "Architecture":
        c, rotary = lm.config, lm.model.rotary_emb
        heads = c.num_attention_heads
        return cls(hidden=c.hidden_size, heads=heads, kv_heads=c.num_key_value_heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   vocab=lm.lm_head.weight.shape[0], eps=c.rms_norm_eps, inv_freq=rotary.inv_freq.float(),
                   rope_scale=float(getattr(rotary, "attention_scaling", 1.0)), window=sliding_window(c))

    @property
    def qk_width(self) -> int:
        """Columns of the fused q/k/v projection's output that hold q and k."""
        return (self.heads + self.kv_heads) * self.head_dim

    def norm(self, x, weight):
        return F.rms_norm(x, (x.shape[-1],), weight, self.eps)

    @staticmethod
    def activation(gate_up):
        """SiLU(gate) * up over the fused gate/up projection's output."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rope(self, positions, dtype):
        """cos and signed sin for `positions` ([...] -> [..., head_dim]): see `rope_tables`."""
        return rope_tables(positions, self.inv_freq, self.rope_scale, dtype)

    def in_window(self, query_columns, key_columns):
        """Which keys each query may see for the window alone (column indices of one sequence, tensors
        or ints that broadcast; True without a window). Causality is the caller's."""
        if self.window is None:
            return True
        return query_columns - key_columns < self.window

    def normed_qk(self, y, layer: "Layer"):
        """The fused q/k/v projection's output [..., width] with each q and k head RMS-normed by the
        layer's q_norm / k_norm (Qwen3), or `y` itself for layers without them."""
        if layer.q_norm is None:
            return y
        qk, v = self.split_qkv(y)
        q = self.norm(qk[..., :self.heads, :], layer.q_norm)
        k = self.norm(qk[..., self.heads:, :], layer.k_norm)
        return torch.cat([q.flatten(-2), k.flatten(-2), v.flatten(-2)], dim=-1)

    def split_qkv(self, y):
        """The fused q/k/v projection's output [..., width] as q and k together [..., heads + kv_heads,
        head_dim] (RoPE rotates both at once) and v [..., kv_heads, head_dim]."""
        return (y[..., :self.qk_width].unflatten(-1, (self.heads + self.kv_heads, self.head_dim)),
                y[..., self.qk_width:].unflatten(-1, (self.kv_heads, self.head_dim)))

    def expand_kv(self, k, v):
        """Grouped-query attention: each key/value head repeated for its query heads (dim 1)."""
        if self.kv_heads == self.heads:
            return k, v
        rep = self.heads // self.kv_heads
        return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


@dataclass
class Projection:
    """One fused projection: the base weights of `modules` (linear layers reading the same input)
    concatenated; each module's weight is a view into `weight`. A 4-bit base keeps its modules' NF4
    weights apart instead (`QuantizedWeight`), de-quantised together where a pass uses them."""
    weight: torch.Tensor | QuantizedWeight     # [sum of outs, in]
    modules: list            # the model's modules (peft LoRA layers where adapted), in output order
    outs: list[int]
    bias: torch.Tensor | None = None   # [sum of outs], the modules' biases concatenated (views again)


@dataclass
class Layer:
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    q_norm: torch.Tensor | None = None   # [head_dim]: RMSNorm weights of each q and k head (Qwen3)
    k_norm: torch.Tensor | None = None


def fused_layers(lm) -> list[Layer]:
    """Every decoder layer of `lm` with its projections fused (see `fuse_weights`)."""
    layers = []
    for layer in lm.model.layers:
        parts = {}
        for name, (parent, names) in PROJECTIONS.items():
            modules = [getattr(getattr(layer, parent), n) for n in names]
            parts[name] = Projection(fuse_weights(modules), modules,
                                     [getattr(m, "base_layer", m).weight.shape[0] for m in modules],
                                     fuse_weights(modules, "bias"))
        norms = [getattr(getattr(layer.self_attn, n, None), "weight", None) for n in ("q_norm", "k_norm")]
        layers.append(Layer(layer.input_layernorm.weight, layer.post_attention_layernorm.weight, **parts,
                            q_norm=norms[0], k_norm=norms[1]))
    return layers


def block(arch: Architecture, h, layer: Layer, attend, linear, norm=None, activation=None,
          attend_norms_qk: bool = False):
    """One decoder layer over rows `h` [..., hidden]:
        h <- h + o(attend(qkv(norm(h))));  h <- h + down(activation(gate_up(norm(h))))
    `linear(name, x, residual=None)` computes x @ the projection's weight.T (+ `residual`): plain
    (decoding, in place), or with each module's LoRA update (training). `attend(y)` turns the q/k/v
    projection's output into the attention output [..., heads * head_dim], after the q/k norm
    (`normed_qk`) unless `attend_norms_qk` says it applies the norm itself (the training pass's
    RoPE kernel). `norm` and `activation` default to the torch operations; the decoder passes its
    Triton ones for one-token steps."""
    norm, activation = norm or arch.norm, activation or arch.activation
    y = linear("qkv", norm(h, layer.attn_norm))
    h = linear("o", attend(y if attend_norms_qk else arch.normed_qk(y, layer)), residual=h)
    return linear("down", activation(linear("gate_up", norm(h, layer.mlp_norm))), residual=h)


def rope_tables(positions, inv_freq, scale: float, dtype):
    """cos and sin for `positions` ([...] -> [..., head_dim]), as transformers' Llama rotary embedding
    computes them; sin carries rotate_half's signs (-sin on the first half) for `rotate`."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)
    half = sin.shape[-1] // 2
    return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate(x, cos, sin):
    """RoPE over the last dimension: x * cos + rotate_half(x) * sin, computed as the two halves
    swapped times the signed sin (`rope_tables`): the same values, one operation fewer."""
    return torch.addcmul(x * cos, x.unflatten(-1, (2, x.shape[-1] // 2)).flip(-2).flatten(-2), sin)


def times_weight_t(x, weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None):
    """x @ weight.T (+ bias) for a projection's 16-bit weight or its 4-bit one (de-quantised for the
    product and again for its backward, never kept)."""
    if isinstance(weight, QuantizedWeight):
        y = quantized_matmul(x, weight)
        return y if bias is None else y + bias
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def fuse_weights(modules, kind: str = "weight") -> torch.Tensor | QuantizedWeight | None:
    """The base weights (or biases: `kind`) of linear `modules` reading the same input, concatenated
    ([sum of outs, in]; None for biases the modules do not have); each module's tensor becomes a view
    into it, so nothing is held twice and whatever reads or updates the modules (saving,
    `merge_adapter`) sees the fused tensor. NF4 weights stay apart in a `QuantizedWeight`."""
    bases = [getattr(m, "base_layer", m) for m in modules]
    if any(getattr(b, kind) is None for b in bases):
        return None
    if any(is_nf4(getattr(b, kind)) for b in bases):
        return QuantizedWeight([getattr(b, kind) for b in bases])
    fused = torch.cat([getattr(b, kind).detach() for b in bases])
    start = 0
    for b in bases:
        part = getattr(b, kind)
        part.data = fused[start:start + part.shape[0]]
        start += part.shape[0]
    return fused
