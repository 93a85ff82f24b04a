"""Peak GPU memory of a training run, estimated before it starts (the studio's Train form shows it).

What the fused training pass (train/fused.py) holds at its peak, the end of the forward pass of the
run's largest pass, counted from what its operations keep for backward:

  - the frozen base weights in the compute dtype (with a 4-bit base: the projections at ~4.1 bits per
    weight, and the largest fused projection de-quantised while its GEMM runs);
  - the LoRA weights in float32 with their gradients and AdamW's two moments, plus the compute-dtype
    copy each pass makes;
  - per token and layer: the two RMSNorm inputs; for each adapted projection group, its input once
    and each adapter's rank-wide product (the dropout's keep flags are drawn again in backward,
    train/lora_kernels.py; the o projection's input is the attention output, counted there);
    the rotated q and k and v (the RoPE kernel writes both, and its backward needs neither), the
    attention output and its log-sum-exp; with Qwen3's q/k norm, the q/k/v output (the RoPE
    kernel normalises the heads and reads them again in backward); the gate/up output (the SiLU * up
    kernel keeps nothing else);
  - the vocabulary projection at supervised positions (train/head.py): the final norm's input and
    output, the input's gradient, and one chunk's logits buffer (at most `HEAD_LOGITS` entries, rows
    padded to `ALIGN`, in the compute dtype);
  - backward's working set for one layer.

With gradient checkpointing (the lowmem preset) only each layer's input stays; one layer is
recomputed at a time.

It is an estimate of allocated memory (what `torch.cuda.max_memory_allocated` reports); the CUDA
context and the allocator's cache come on top (`CONTEXT_BYTES` when checking a card, with `MARGIN`).
Against the peaks measured on an H200 for four model shapes (Index-1.9B, Qwen3-1.7B, Qwen2.5-1.5B,
Llama-3.2-1B), 16-bit and 4-bit bases, with and without checkpointing, it is within 2.5% (2.4% low
to 0.1% high; `bench/memory_estimate.py`, bench/results/2026-11-30-memory-estimate-lora-b-kernels.txt;
tests/test_memory.py holds the table).
The plain peft path (`train.fast_path=plain`) keeps more and is not estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from chatlora.train.head import ALIGN, HEAD_LOGITS
from chatlora.train.packed_row import PassShape, pass_shape
from chatlora.train.steps import StepPlan, micro_batches

GIB = 2 ** 30
CONTEXT_BYTES = GIB   # CUDA context, cuBLAS workspaces and the allocator's cache, beyond allocations
MARGIN = 0.05         # the estimate was within 2.5% of the measured peaks, mostly under
ADAPTER_STATE_BYTES = 16   # per LoRA parameter: float32 weight, gradient, AdamW's two moments
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64   # 4-bit index, 8-bit block scale per 64 (second-level scales: ~0)
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Adapted projections, grouped by the input they read (the fused pass's groups).
GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
GROUPS_ALL = [name for names in GROUPS.values() for name in names]


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, read from its config.json."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool          # output projection shares the embedding
    qkv_bias: bool      # Qwen2
    qk_norm: bool       # Qwen3

    @classmethod
    def from_config(cls, raw: dict) -> "ModelShape":
        heads = raw["num_attention_heads"]
        model_type = raw.get("model_type", "")
        return cls(layers=raw["num_hidden_layers"], hidden=raw["hidden_size"],
                   intermediate=raw["intermediate_size"], heads=heads,
                   kv_heads=raw.get("num_key_value_heads") or heads,
                   head_dim=raw.get("head_dim") or raw["hidden_size"] // heads, vocab=raw["vocab_size"],
                   tied=bool(raw.get("tie_word_embeddings", False)),
                   qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias")),
                   qk_norm=model_type == "qwen3")

    def projection_shape(self, name: str) -> tuple[int, int]:
        """(in, out) of one projection."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate),
                "down_proj": (self.intermediate, self.hidden)}[name]

    @property
    def parameters(self) -> int:
        per_layer = sum(i * o for i, o in map(self.projection_shape, GROUPS_ALL)) + 2 * self.hidden
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + embeddings + self.hidden


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes at the run's peak, by what holds them."""
    weights: int          # the frozen base model
    adapters: int         # LoRA weights, gradients, optimizer state
    activations: int      # what the largest pass keeps for backward, and backward's working set
    head: int             # the vocabulary projection at supervised positions
    largest_pass: PassShape

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations + self.head

    def as_json(self) -> dict:
        out = {k: round(v / GIB, 2) for k, v in asdict(self).items() if isinstance(v, int)}
        out["total"] = round(self.total / GIB, 2)
        out["largest_pass"] = self.largest_pass._asdict()
        return out


def largest_pass(examples, train, steps: int | None = None) -> PassShape:
    """The largest pass (tokens, then supervised positions) of a run's optimizer steps (all of them,
    or the first `steps`), formed as the training loop forms them (train/steps.py). `train`: the
    config's train group."""
    plan = StepPlan(len(examples), train.examples_per_step, train.seed)
    steps = plan.total_steps(train.epochs, train.max_steps) if steps is None else steps
    shapes = {pass_shape(chunk)
              for step in range(steps)
              for chunk in micro_batches([examples[i] for i in plan.indices(step)], train.micro_batch_examples,
                                         train.micro_batch_tokens)}
    return max(shapes, key=lambda s: (s.tokens, s.supervised))


def estimate_run(cfg, model_config: dict, examples, steps: int | None = None) -> MemoryEstimate | str:
    """The estimate for a config's run on a GPU (its model's config.json, its training examples), or
    why there is none: runs the fused pass does not take are not estimated."""
    from chatlora.models.arch import FAMILIES

    model_type = model_config.get("model_type")
    if cfg.train.fast_path == "plain":
        return "no estimate for the plain peft path (train.fast_path=plain)"
    if model_type not in FAMILIES:
        return f"no estimate for model type {model_type!r} (the fused pass covers {', '.join(FAMILIES)})"
    if cfg.lora.dora:
        return "no estimate for DoRA (the plain peft path trains it)"
    if not examples:
        return "no estimate: no training examples are left after the data check"
    dtype = "bfloat16" if cfg.model.dtype == "auto" else cfg.model.dtype
    return estimate(ModelShape.from_config(model_config), dtype=dtype, rank=cfg.lora.r, targets=cfg.lora.targets,
                    checkpoint=cfg.train.gradient_checkpointing,
                    largest=largest_pass(examples, cfg.train, steps), nf4=cfg.model.quantize == "nf4")


def advice(need: MemoryEstimate, card_name: str, card_bytes: int, free_bytes: int,
           lowmem: MemoryEstimate | None = None) -> str | None:
    """A warning when the run will not fit the card (None when it will): the estimate with a margin
    of `MARGIN` and `CONTEXT_BYTES`, against the card's memory and what other processes leave free;
    `lowmem`: the same run with the lowmem preset, suggested when it fits."""
    peak = need.total * (1 + MARGIN) + CONTEXT_BYTES
    if peak <= free_bytes:
        return None
    gib = lambda n: f"{n / GIB:.1f} GiB"   # noqa: E731
    if peak <= card_bytes:
        problem = (f"this run needs about {gib(need.total)} at its peak, and other processes leave only "
                   f"{gib(free_bytes)} of the {card_name}'s {gib(card_bytes)} free")
    else:
        problem = f"this run needs about {gib(need.total)} at its peak, more than the {card_name}'s {gib(card_bytes)}"
    if lowmem is not None and lowmem.total * (1 + MARGIN) + CONTEXT_BYTES <= free_bytes:
        return f"{problem}: the lowmem preset needs about {gib(lowmem.total)}"
    return (f"{problem}: try the lowmem preset, a lower train.micro_batch_tokens or data.max_seq_tokens, "
            f"or fewer lora.targets")


def estimate(shape: ModelShape, *, dtype: str, rank: int, targets: list[str],
             checkpoint: bool, largest: PassShape, nf4: bool = False) -> MemoryEstimate:
    """Peak memory of the fused training pass over `largest` (see the module's notes). `nf4`: the
    projections' base weights in 4-bit NF4 (models/quantize.py), plus the largest fused projection
    de-quantised for its GEMM."""
    e = DTYPE_BYTES[dtype]
    t, s = largest.tokens, largest.supervised
    adapted = [name for name in GROUPS_ALL if name in targets]
    lora_parameters = shape.layers * sum(rank * sum(shape.projection_shape(n)) for n in adapted)

    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    group_inputs = {"qkv": shape.hidden, "o": q, "gate_up": shape.hidden, "down": shape.intermediate}
    lora_inputs = 0     # bytes per token per layer kept for the adapters' gradients
    for group, names in GROUPS.items():
        n = sum(name in adapted for name in names)
        if n:
            lora_inputs += (0 if group == "o" else group_inputs[group] * e) + n * rank * e
    # rotated q and k, v (the RoPE kernel's copy), the attention output and its log-sum-exp; with a
    # q/k norm (Qwen3) the q/k/v output too, which the RoPE kernel's backward reads
    attention = (q + kv) * e + kv * e + q * e + shape.heads * 4 + (q + 2 * kv) * e * shape.qk_norm
    mlp = 2 * shape.intermediate * e
    layer = 2 * shape.hidden * e + lora_inputs + attention + mlp
    working = (2 * shape.intermediate + 2 * shape.hidden) * e * t   # one layer's gradients in backward

    if checkpoint:
        activations = shape.layers * t * shape.hidden * e + t * layer + working
    else:
        activations = shape.layers * t * layer + working
    width = -(-shape.vocab // ALIGN) * ALIGN
    head = min(s, max(1, HEAD_LOGITS // shape.vocab)) * width * e + 3 * s * shape.hidden * e
    weights = shape.parameters * e
    if nf4:
        projections = shape.layers * sum(i * o for i, o in map(shape.projection_shape, GROUPS_ALL))
        fused = max(sum(o for _, o in map(shape.projection_shape, names)) * shape.projection_shape(names[0])[0]
                    for names in GROUPS.values())
        weights += int(projections * (NF4_BYTES_PER_WEIGHT - e)) + fused * e
    return MemoryEstimate(weights=weights,
                          adapters=lora_parameters * (ADAPTER_STATE_BYTES + e),
                          activations=activations, head=head, largest_pass=largest)
