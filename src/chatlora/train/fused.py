"""The fast training pass: the peft model's own weights through a lean functional Llama forward,
one packed row per pass, captured once per bucket shape as a CUDA graph and replayed.

Why: the eager peft model spends ~0.4 s per seed step launching ~25,000 kernels from Python for
~15 ms of arithmetic (bench/NOTES.md). This path computes the same function as `batches.loss_sum`
on the peft model (tests/test_fastpath.py compares the loss and every LoRA gradient), with
  - base q/k/v and gate/up weights concatenated, one GEMM each (the peft modules keep views into them,
    so nothing is duplicated and saving, merging and evaluation see the same tensors);
  - every LoRA weight in one flat buffer (the peft parameters are views into it, their gradients
    views into its gradient): cast to the compute dtype once per pass, the LoRA scale folded into B;
  - q/k/v and gate/up adapters as batched GEMMs (each module keeps its own dropout mask, as in peft);
  - fused RMSNorm, RoPE on q and k together, one block-diagonal mask per pass for all layers;
  - the vocabulary projection only at supervised positions;
  - the row padded to a bucket shape (`pass_shape`: tokens in multiples of `BUCKET_TOKENS`, coarser
    for long rows; supervised positions in eighths of that) so a few shapes repeat; each shape is
    captured once (forward + backward into the persistent gradient buffer) and replayed: one launch
    per pass instead of thousands.

    step = FastStep(peft_model, device, graphs=True)
    step.zero_grad()
    loss = step.accumulate(examples, max_tokens=2048)   # gradients land in the peft parameters' .grad

Supported: Llama-architecture models (Index is converted into one) without biases, SiLU MLP, LoRA on
any of q,k,v,o,gate,up,down with one scale, no DoRA. `unsupported_reason` says why not otherwise; the
caller then uses the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from chatlora.templates import IGNORE
from chatlora.train.steps import micro_batches, supervised_count, targets_of

BUCKET_TOKENS = 128
BUCKET_SUPERVISED = 64
HEAD_CHUNK = 128  # supervised positions per vocabulary projection when checkpointing (logits' memory)
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))
TARGETS = {name for _, names in GROUPS for name in names}
ADAPTER = "default"


def architecture_reason(lm) -> str | None:
    """None when a functional Llama forward (this module's, fastdecode's) computes the transformers
    model `lm`'s function, else why it cannot."""
    c = lm.config
    if c.model_type != "llama":
        return f"model type {c.model_type!r} (the fast paths cover Llama-architecture models)"
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        return "the model has linear-layer biases"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation {c.hidden_act!r}"
    rope = getattr(lm.model.rotary_emb, "rope_type", "default")
    if rope.startswith("dynamic") or rope == "longrope":
        return f"RoPE type {rope!r} depends on the sequence length"
    return None


def unsupported_reason(model, lora_cfg) -> str | None:
    """None when the fast path computes exactly this model's function, else why it cannot."""
    lm = model.get_base_model()
    reason = architecture_reason(lm)
    if reason:
        return reason
    if lora_cfg.dora:
        return "DoRA"
    extra = set(lora_cfg.targets) - TARGETS
    if extra:
        return f"LoRA on {sorted(extra)}"
    scales = {m.scaling[ADAPTER] for m in lm.modules() if isinstance(getattr(m, "scaling", None), dict) and ADAPTER in m.scaling}
    if len(scales) > 1:
        return "LoRA modules with different scales"
    return None


@dataclass
class _Group:
    """Linear modules reading the same input: one fused base weight, their adapters."""
    weight: torch.Tensor          # [sum of outs, in], the concatenated base weights
    outs: list[int]
    adapters: list[tuple]         # (module index, A chunk, B chunk, r, dropout p)
    stacked: bool                 # every module adapted, same r and out: batched GEMMs


class FastLlama:
    """Functional forward of a peft-wrapped Llama over one packed row (see the module docstring)."""

    def __init__(self, model):
        lm = model.get_base_model()
        c = lm.config
        self.lm = lm
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.hidden, self.eps = c.hidden_size, c.rms_norm_eps
        rotary = lm.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        self.a_params: list[torch.nn.Parameter] = []
        self.b_params: list[torch.nn.Parameter] = []
        self.a_sizes: list[int] = []   # the flat buffer's chunks: per adapter, or per stacked group
        self.b_sizes: list[int] = []
        self.scale = 1.0
        self.packed_dropout = False  # tests: stored masks without checkpointing
        self.layers = []
        for layer in lm.model.layers:
            groups = [self._group([getattr(getattr(layer, parent), n) for n in names]) for parent, names in GROUPS]
            self.layers.append((layer.input_layernorm.weight, layer.post_attention_layernorm.weight, groups))
        self.dtype = self.layers[0][2][0].weight.dtype
        self._flatten()

    def _group(self, modules) -> _Group:
        weight = fuse_weights(modules)
        outs = [getattr(m, "base_layer", m).weight.shape[0] for m in modules]
        found = [(i, m) for i, m in enumerate(modules) if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
        found = [(i, m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight, _dropout_p(m)) for i, m in found]
        for _, a, b, _ in found:
            self.a_params.append(a)
            self.b_params.append(b)
        self.scale = next((m.scaling[ADAPTER] for m in modules if hasattr(m, "scaling")), self.scale)
        stacked = (len(found) == len(modules) > 1 and len(set(outs)) == 1
                   and len({a.shape for _, a, _, _ in found}) == 1 and len({p for *_, p in found}) == 1)
        if stacked:  # one chunk for all the group's A's, one for its B's: [n, r, in] and [n, out, r] views
            self.a_sizes.append(sum(a.numel() for _, a, _, _ in found))
            self.b_sizes.append(sum(b.numel() for _, _, b, _ in found))
        adapters = []
        for i, a, b, p in found:
            if not stacked:
                self.a_sizes.append(a.numel())
                self.b_sizes.append(b.numel())
            adapters.append((i, len(self.a_sizes) - 1, len(self.b_sizes) - 1, a.shape[0], p))
        return _Group(weight, outs, adapters, stacked)

    def _flatten(self) -> None:
        """One flat leaf tensor holds every adapter weight (A's, then B's); the peft parameters become
        views into it and their .grad views into its gradient, so the optimizer, clipping and
        checkpoints work on the usual parameters while a pass reads and writes two buffers."""
        params = self.a_params + self.b_params
        self.num_a = sum(p.numel() for p in self.a_params)
        flat = torch.cat([p.detach().reshape(-1) for p in params])
        grad = torch.zeros_like(flat)
        start = 0
        for p in params:
            n = p.numel()
            p.data = flat[start:start + n].view_as(p)
            p.grad = grad[start:start + n].view_as(p)
            start += n
        self.flat = flat.requires_grad_(True)
        self.flat.grad = grad

    # ---------------------------------------------------------------- the function

    def loss_sum(self, ids, positions, segments, supervised, targets, checkpoint: bool = False) -> torch.Tensor:
        """Sum of cross-entropies at `supervised` positions of one packed row (padding: target IGNORE).

        `checkpoint`: keep only each layer's input for backward and recompute the layer there. Its
        dropout masks are then drawn up front and kept bit-packed (1 bit per element), so the recompute
        applies the same masks without replaying RNG state (which would not survive graph capture)."""
        w = self.adapter_weights(self.flat)
        rope = self._rope(positions)
        same = segments[:, None] == segments[None, :]
        causal = torch.ones_like(same).tril_()
        mask = torch.zeros(same.shape, dtype=self.dtype, device=ids.device).masked_fill_(~(same & causal), float("-inf"))
        h = F.embedding(ids, self.lm.model.embed_tokens.weight)
        for layer in self.layers:
            if checkpoint or self.packed_dropout:
                drops = self._draw_masks(layer, ids.shape[0], ids.device)
                run = partial(torch.utils.checkpoint.checkpoint, self._layer, use_reentrant=False,
                              preserve_rng_state=False) if checkpoint else self._layer
                h = run(h, layer, w, rope, mask, drops)
            else:
                h = self._layer(h, layer, w, rope, mask)
        x = h.index_select(0, supervised)
        if not checkpoint:
            return self._head(x, targets)
        head = partial(torch.utils.checkpoint.checkpoint, self._head, use_reentrant=False, preserve_rng_state=False)
        return sum(head(xc, tc) for xc, tc in zip(x.split(HEAD_CHUNK), targets.split(HEAD_CHUNK)))

    def _head(self, x, targets):
        logits = F.rms_norm(x, (self.hidden,), self.lm.model.norm.weight, self.eps) @ self.lm.lm_head.weight.t()
        return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")

    def _draw_masks(self, layer, t: int, device) -> list[list[torch.Tensor] | None]:
        """Bit-packed keep masks for every adapter input of `layer` (per stacked group, or per adapter)."""
        out = []
        for g in layer[2]:
            if not g.adapters or not g.adapters[0][4]:
                out.append(None)
                continue
            d_in = g.weight.shape[1]
            sizes = [len(g.adapters) * t * d_in] if g.stacked else [t * d_in] * len(g.adapters)
            p = g.adapters[0][4]
            out.append([((torch.rand(n // 8, 8, device=device) >= p).to(torch.uint8) * _bits(device))
                        .sum(-1, dtype=torch.uint8) for n in sizes])
        return out

    def adapter_weights(self, flat):
        """The flat buffer in the compute dtype, B's scaled, cut into its chunks (A chunks, B chunks).
        One split: its backward is one concatenation, where per-module slices would each write a
        zero-filled copy of the whole buffer (measured: a fifth of the pass)."""
        w = torch.cat([flat[:self.num_a].to(self.dtype), (flat[self.num_a:] * self.scale).to(self.dtype)])
        chunks = w.split(self.a_sizes + self.b_sizes)
        return chunks[:len(self.a_sizes)], chunks[len(self.a_sizes):]

    def _rope(self, positions):
        """cos and signed sin ([T, 1, head_dim]) for `rotate`."""
        cos, sin = rope_tables(positions, self.inv_freq, self.rope_scale, self.dtype)
        return cos[:, None, :], sin[:, None, :]

    def _layer(self, h, layer, w, rope, mask, drops=(None,) * 4):
        norm1, norm2, (qkv, o, gate_up, down) = layer
        t, hd, nq, nkv = h.shape[0], self.head_dim, self.heads, self.kv_heads
        y = self._linear(qkv, F.rms_norm(h, (self.hidden,), norm1, self.eps), w, drops[0])
        qk = y[:, :(nq + nkv) * hd].reshape(t, nq + nkv, hd)
        qk = rotate(qk, *rope)
        q = qk[:, :nq].transpose(0, 1)[None]
        k = qk[:, nq:].transpose(0, 1)[None]
        v = y[:, (nq + nkv) * hd:].reshape(t, nkv, hd).transpose(0, 1)[None]
        if nkv != nq:
            k, v = k.repeat_interleave(nq // nkv, dim=1), v.repeat_interleave(nq // nkv, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
        h = h + self._linear(o, a[0].transpose(0, 1).reshape(t, nq * hd), w, drops[1])
        gu = self._linear(gate_up, F.rms_norm(h, (self.hidden,), norm2, self.eps), w, drops[2])
        gate, up = gu.split(gate_up.outs, dim=1)
        return h + self._linear(down, F.silu(gate) * up, w, drops[3])

    def _linear(self, g: _Group, x, w, drop=None):
        """x @ fused base weight + each module's LoRA update (its own dropout on its input; `drop`:
        bit-packed masks to apply instead of drawing new ones)."""
        y = x @ g.weight.t()
        if not g.adapters:
            return y
        t, d_in = x.shape
        wa, wb = w
        if g.stacked:
            n, (_, ai, bi, r, p) = len(g.adapters), g.adapters[0]
            d_out = g.outs[0]
            a, b = wa[ai].view(n, r, d_in), wb[bi].view(n, d_out, r)
            xs = x.expand(n, t, d_in)
            xs = xs if not p else F.dropout(xs, p, True) if drop is None else _apply_mask(xs, drop[0], p)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))    # [n, T, out]
            return (y.view(t, n, d_out) + delta.transpose(0, 1)).view(t, n * d_out)
        parts = list(y.split(g.outs, dim=1))
        for k, (i, ai, bi, r, p) in enumerate(g.adapters):
            a, b = wa[ai].view(r, d_in), wb[bi].view(g.outs[i], r)
            xi = x if not p else F.dropout(x, p, True) if drop is None else _apply_mask(x, drop[k], p)
            parts[i] = torch.addmm(parts[i], xi @ a.t(), b.t())
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


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


def fuse_weights(modules) -> torch.Tensor:
    """The base weights of linear `modules` reading the same input, concatenated ([sum of outs, in]);
    each module's weight becomes a view into it, so nothing is held twice and whatever reads or
    updates the modules (saving, `merge_adapter`) sees the fused tensor."""
    bases = [getattr(m, "base_layer", m) for m in modules]
    weight = torch.cat([b.weight.detach() for b in bases])
    start = 0
    for b in bases:
        n = b.weight.shape[0]
        b.weight.data = weight[start:start + n]
        start += n
    return weight


@lru_cache(maxsize=None)  # made once per device, before any graph capture (no host copy while capturing)
def _bits(device) -> torch.Tensor:
    return torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=device)


def _apply_mask(x, packed, p: float):
    """Inverted dropout with a stored bit-packed keep mask (as F.dropout: kept elements * 1/(1-p))."""
    keep = (packed[:, None] & _bits(packed.device)) != 0
    return x * keep.view(x.shape) * (1.0 / (1.0 - p))


def _dropout_p(module) -> float:
    drop = module.lora_dropout[ADAPTER]
    return drop.p if isinstance(drop, torch.nn.Dropout) else 0.0


def bucket(n: int, minimum: int) -> int:
    """n rounded up to a multiple of `minimum`, or of 1/16-1/8 of n when that is coarser: a few
    shapes cover any mix of lengths (each new shape costs one capture) at a bounded padding share."""
    step = max(minimum, 1 << max(0, n.bit_length() - 4))
    return max(step, -(-n // step) * step)


def pass_shape(examples) -> tuple[int, int]:
    """(tokens, supervised positions) that a pass over `examples` is padded to. Supervised positions
    only size the vocabulary projection (~2% of a pass), so they take coarse steps of an eighth of the
    token bucket: fewer shapes to capture (bench/NOTES.md: 30 -> 19 over the seed job) for ~0.4% more
    arithmetic."""
    tokens = bucket(sum(len(e.input_ids) for e in examples), BUCKET_TOKENS)
    step = max(BUCKET_SUPERVISED, tokens // 8)
    return tokens, min(tokens, -(-supervised_count(examples) // step) * step)


def host_row(examples, tokens: int, supervised: int) -> torch.Tensor:
    """One pass's inputs as a single int64 vector: ids, positions, segment of each token (padding:
    segment -1), supervised positions and their targets (padding: position 0, target IGNORE)."""
    ids, pos, seg, tgt = [], [], [], []
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        pos += range(n)
        seg += [i] * n
        tgt += targets_of(e.labels)
    sup = [i for i, t in enumerate(tgt) if t != IGNORE]
    sup_tgt = [tgt[i] for i in sup]
    pad = tokens - len(ids)
    ids += [0] * pad
    pos += range(pad)
    seg += [-1] * pad
    sup += [0] * (supervised - len(sup))
    sup_tgt += [IGNORE] * (supervised - len(sup_tgt))
    return torch.tensor(ids + pos + seg + sup + sup_tgt, dtype=torch.long)


class FastStep:
    """Forward + backward of one optimizer step's examples through `FastLlama`, pass by pass,
    with the loss normalization of `train.accumulate_gradients` (sum / supervised tokens of the step).
    `graphs=True` (CUDA) captures each bucket shape once and replays it; `checkpoint=True` recomputes
    each layer in backward (memory for speed)."""

    def __init__(self, model, device, graphs: bool = False, checkpoint: bool = False):
        self.net = FastLlama(model)
        self.device = torch.device(device)
        self.graphs, self.checkpoint = graphs, checkpoint
        self.divisor = torch.ones((), device=self.device)
        self._captured: dict[tuple[int, int], tuple] = {}
        self._pool = None
        self._side = None

    def zero_grad(self) -> None:
        self.net.flat.grad.zero_()

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the adapter gradients, on the one flat buffer
        (the total norm is the flat gradient's norm): two kernels instead of one per parameter."""
        grad = self.net.flat.grad
        norm = torch.linalg.vector_norm(grad)
        if max_norm is not None:
            grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def accumulate(self, examples, micro_batch_examples: int, max_tokens: int | None,
                   supervised: int | None = None) -> torch.Tensor:
        """Backward over the step's examples (loss divided by `supervised`, default: theirs); returns
        the step's loss (0-d tensor, no host sync)."""
        self.divisor.fill_(supervised or supervised_count(examples))
        total = torch.zeros((), device=self.device)
        for chunk in micro_batches(examples, micro_batch_examples, max_tokens):
            tokens, sup = pass_shape(chunk)
            row = host_row(chunk, tokens, sup)
            if self.graphs:
                static, graph, loss = self._graph(tokens, sup, row)
                static.copy_(row.pin_memory(), non_blocking=True)
                graph.replay()
                part = loss.clone()
            else:
                part = self._forward_backward(row.to(self.device), tokens, sup)
            total = total + part
        return total

    def _forward_backward(self, row, tokens: int, sup: int) -> torch.Tensor:
        ids, pos, seg = row[:tokens], row[tokens:2 * tokens], row[2 * tokens:3 * tokens]
        supervised, targets = row[3 * tokens:3 * tokens + sup], row[3 * tokens + sup:]
        loss = self.net.loss_sum(ids, pos, seg, supervised, targets, self.checkpoint) / self.divisor
        loss.backward()
        return loss.detach()

    def _graph(self, tokens: int, sup: int, row: torch.Tensor):
        """The captured pass for this bucket shape (captured on first use: eager warm-up passes, two
        for the first shape and one after, then capture; the gradients they added are restored)."""
        key = (tokens, sup)
        if key not in self._captured:
            saved = self.net.flat.grad.clone()
            static = row.to(self.device)
            if self._side is None:  # one stream for every warm-up: each new stream costs cuBLAS a
                self._side = torch.cuda.Stream()  # workspace it keeps (measured: +64 MiB per capture)
            side = self._side
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(1 if self._captured else 2):
                    self._forward_backward(static, tokens, sup)
            torch.cuda.current_stream().wait_stream(side)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                loss = self._forward_backward(static, tokens, sup)
            self.net.flat.grad.copy_(saved)
            self._captured[key] = (static, graph, loss)
        return self._captured[key]

