"""The fast training pass: the peft model's own weights through the model layer's forward (models/arch.py),
one packed row per pass, captured once per bucket shape as a CUDA graph and replayed.

Why: the eager peft model spends ~0.4 s per self-llm step launching ~25,000 kernels from Python for
~15 ms of arithmetic (bench/NOTES.md). This path computes the same function as `steps.loss_sum`
on the peft model (tests/test_fastpath.py compares the loss and every LoRA gradient), with
  - base q/k/v and gate/up weights concatenated, one GEMM each (the peft modules keep views into them,
    so nothing is duplicated and saving, merging and evaluation see the same tensors);
  - every LoRA weight in one flat buffer (the peft parameters are views into it, their gradients
    views into its gradient): cast to the compute dtype once per pass, the LoRA scale folded into B;
  - on a GPU, Triton kernels with their backward: RMSNorm and SiLU(gate) * up (kernels.py), and
    each adapter's dropout fused with its A product, the keep flags drawn again in backward instead
    of stored (lora_kernels.py; each module its own dropout, as in peft); elsewhere torch's
    operations, the q/k/v and gate/up adapters as batched GEMMs;
  - RoPE on q and k together (on a GPU one kernel, v split off in the same pass: kernels.py);
  - attention within each example: with the kernels, a Triton kernel cut to the row's short
    sequences (attention_kernels.py); without them, on a GPU in bf16/fp16, torch's flash kernel over
    the row's sequences (called directly: no work for pairs of different examples, grouped-query K/V
    heads read as they are); elsewhere one block-diagonal mask per pass for all layers;
  - the vocabulary projection only at supervised positions, with the cross-entropy in chunks whose
    forward pass also computes the input's gradient (no logits kept for backward);
  - the row padded to a bucket shape (train/packed_row.py) so a few shapes repeat; each shape is
    captured once (forward + backward into the persistent gradient buffer) and replayed: one launch
    per pass instead of thousands (train/fused_step.py).

    net = FusedForward(peft_model)          # the peft parameters become views into net.flat
    loss = net.loss_sum(**row_parts(row, shape))    # a packed row's summed cross-entropy

One optimizer step's passes, each bucket shape captured once and replayed: train/fused_step.py.

Supported: the families of models/arch.py (Llama, with Index converted into one, Mistral, Qwen2,
Qwen3), LoRA on any of q,k,v,o,gate,up,down with one scale, no DoRA. `unsupported_reason` says why
not otherwise; the caller then uses the eager path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from chatlora.models import triton_kernels
from chatlora.models.arch import TARGETS, Architecture, Layer, Projection, block, fused_layers, rotate, times_weight_t
from chatlora.models.arch import unsupported_reason as architecture_reason
from chatlora.models.lora import ADAPTER
from chatlora.train import attention_kernels, lora_kernels
from chatlora.train import kernels as train_kernels
from chatlora.train.head import chunked_cross_entropy


def unsupported_reason(model, lora_cfg) -> str | None:
    """None when the fused pass computes exactly this peft model's function, else why it cannot."""
    lm = model.get_base_model()
    reason = architecture_reason(lm) or adapter_reason(lora_cfg)
    if reason:
        return reason
    scales = {m.scaling[ADAPTER] for m in lm.modules() if isinstance(getattr(m, "scaling", None), dict) and ADAPTER in m.scaling}
    if len(scales) > 1:
        return "LoRA modules with different scales"
    return None


def adapter_reason(lora_cfg) -> str | None:
    """None when the fused pass covers adapters configured as `lora_cfg`, else why not."""
    if lora_cfg.dora:
        return "DoRA"
    extra = set(lora_cfg.targets) - TARGETS
    return f"LoRA on {sorted(extra)}" if extra else None


@dataclass
class Adapter:
    """One LoRA module of a fused projection."""
    module: int       # its place among the projection's modules (output order)
    rank: int
    dropout: float


@dataclass
class AdaptedProjection:
    """A fused projection and the LoRA adapters of its modules, whose A weights are one chunk of the
    flat buffer ([sum of ranks, in]) and B weights the next chunk of B's (each [out, rank], one
    after another). `stacked`: every module adapted with the same rank, output width and dropout,
    so their updates run as batched GEMMs."""
    base: Projection
    adapters: list[Adapter]
    stacked: bool
    chunk: int = -1   # its A chunk among the A chunks, its B chunk among the B chunks
    salt: int = 0     # its adapters' dropout streams on the kernel path (lora_kernels.py): salt + i

    @property
    def columns(self) -> list[int]:
        """Each adapter's first column in the projection's output."""
        return [sum(self.base.outs[:ad.module]) for ad in self.adapters]

    @property
    def widths(self) -> list[int]:
        """Each adapter's output width."""
        return [self.base.outs[ad.module] for ad in self.adapters]

    def weights(self, w) -> tuple[torch.Tensor, torch.Tensor]:
        """Its A chunk [sum of ranks, in] and B chunk (flat) of the split adapter weights `w`."""
        wa, wb = w
        return wa[self.chunk].view(-1, self.base.weight.shape[1]), wb[self.chunk]

    def each(self, w) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A [rank, in], B [out, rank]) of each adapter: split views (their backward is one concatenation)."""
        a, b = self.weights(w)
        a_parts = a.split([ad.rank for ad in self.adapters])
        b_parts = b.split([o * ad.rank for o, ad in zip(self.widths, self.adapters)])
        return [(ai, bi.view(o, ad.rank)) for ai, bi, o, ad in zip(a_parts, b_parts, self.widths, self.adapters)]


@dataclass
class AdaptedLayer:
    layer: Layer
    projections: dict[str, AdaptedProjection]   # "qkv", "o", "gate_up", "down" (models.arch.PROJECTIONS)


class FusedForward:
    """The loss of a peft-wrapped model over one packed row, computed functionally from the model's
    own weights on the architecture's layer (models/arch.py); see the module docstring."""

    def __init__(self, model):
        lm = model.get_base_model()
        self.lm, self.arch = lm, Architecture.of(lm)
        self.a_params: list[torch.nn.Parameter] = []
        self.b_params: list[torch.nn.Parameter] = []
        self.a_sizes: list[int] = []   # the flat buffer's chunks: one per adapted projection
        self.b_sizes: list[int] = []
        self.scale = 1.0
        self.packed_dropout = False  # tests: stored masks without checkpointing
        self.flash = True            # tests: False computes the mask path on a GPU too
        self.attention_kernel = True  # tests: False takes torch's flash kernel with the other kernels on
        self.kernels = True          # tests: False keeps torch's operations on a GPU too (as CHATLORA_TRITON=0)
        self._norm = self._activation = self._seed = None   # this pass's (`loss_sum`)
        self._kernels = self._lora_kernels = False
        self.layers = [AdaptedLayer(layer, {name: self._adapted(getattr(layer, name), (number * 4 + k) * 4)
                                            for k, name in enumerate(("qkv", "o", "gate_up", "down"))})
                       for number, layer in enumerate(fused_layers(lm))]
        self.dtype = self.layers[0].layer.qkv.weight.dtype
        # whether every adapted projection suits the LoRA kernels (lora_kernels.py): one rank and
        # dropout among its adapters, an input width they take
        self.lora_kernels_fit = all(len({(ad.rank, ad.dropout) for ad in g.adapters}) == 1
                                    and len(g.adapters) <= lora_kernels.MAX_ADAPTERS
                                    and lora_kernels.covers(g.base.weight.shape[1])
                                    for layer in self.layers for g in layer.projections.values() if g.adapters)
        self._flatten()

    def _adapted(self, base: Projection, salt: int) -> AdaptedProjection:
        found = [(i, m) for i, m in enumerate(base.modules) if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
        found = [(i, m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight, _dropout_p(m)) for i, m in found]
        for _, a, b, _ in found:
            self.a_params.append(a)
            self.b_params.append(b)
        self.scale = next((m.scaling[ADAPTER] for m in base.modules if hasattr(m, "scaling")), self.scale)
        stacked = (len(found) == len(base.modules) > 1 and len(set(base.outs)) == 1
                   and len({a.shape for _, a, _, _ in found}) == 1 and len({p for *_, p in found}) == 1)
        if not found:
            return AdaptedProjection(base, [], stacked, -1, salt)
        self.a_sizes.append(sum(a.numel() for _, a, _, _ in found))   # the parameters are in this order in
        self.b_sizes.append(sum(b.numel() for _, _, b, _ in found))   # the flat buffer: chunks of consecutive ones
        adapters = [Adapter(i, a.shape[0], p) for i, a, _, p in found]
        return AdaptedProjection(base, adapters, stacked, len(self.a_sizes) - 1, salt)

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

    def loss_sum(self, ids, positions, segments, supervised, targets, starts=None,
                 checkpoint: bool = False, dropout: bool = True) -> torch.Tensor:
        """Sum of cross-entropies at `supervised` positions of one packed row (padding: target IGNORE).
        `starts`: where each sequence slot of the row begins, then the row's length (`host_row`); the
        flash path attends within them, the mask path reads `segments` instead.

        `checkpoint`: keep only each layer's input for backward and recompute the layer there. The
        recompute applies the same dropout masks without replaying RNG state (which would not survive
        graph capture): the LoRA kernels draw their keep flags again from the pass's seed; with
        torch's dropout the masks are drawn up front and kept bit-packed (1 bit per element).
        `dropout=False`: no dropout on the adapters' inputs (evaluation, as peft's eval mode)."""
        w = self.adapter_weights(self.flat)
        kernels = self._kernels = self.kernels and triton_kernels.enabled(torch.device(ids.device))
        eps = self.arch.eps   # the layer's norm and activation (`models.arch.block`); None: torch's operations
        self._norm = (lambda x, weight: train_kernels.rms_norm(x, weight, eps)) if kernels else None
        self._activation = train_kernels.silu_mul if kernels else None
        # the LoRA kernels take every adapted projection or none: a projection left to torch's dropout
        # would need its masks stored for a checkpointed recompute (`_draw_masks`)
        self._lora_kernels = kernels and self.lora_kernels_fit
        # their dropout streams: keyed by this seed, drawn from torch's generator in the pass
        self._seed = (torch.randint(0, 2 ** 31 - 1, (1,), device=ids.device) if self._lora_kernels and dropout
                      else torch.zeros(1, dtype=torch.int64, device=ids.device))
        cos, sin = self.arch.rope(positions, self.dtype)
        rope = (cos, sin) if kernels else (cos[:, None, :], sin[:, None, :])   # kernels.rope_qkv's, or `rotate`'s
        if starts is not None and kernels and self.attention_kernel and self.flash and \
                attention_kernels.fits(self.arch.head_dim, self.dtype, torch.device(ids.device)):
            attention = partial(self._packed_attention, starts=starts.to(torch.int32))
        elif starts is not None and self.uses_flash(ids.device):
            attention = partial(self._flash_attention, starts=starts.to(torch.int32), longest=ids.shape[0])
        else:
            attention = partial(self._masked_attention, mask=self._mask(segments))
        h = F.embedding(ids, self.lm.model.embed_tokens.weight)
        for layer in self.layers:
            if not dropout:
                h = self._layer(h, layer, w, rope, attention, dropout=False)
            elif self._lora_kernels:   # the kernels draw their keep flags again wherever they need them
                run = partial(torch.utils.checkpoint.checkpoint, self._layer, use_reentrant=False,
                              preserve_rng_state=False) if checkpoint else self._layer
                h = run(h, layer, w, rope, attention)
            elif checkpoint or self.packed_dropout:
                drops = self._draw_masks(layer, ids.shape[0], ids.device)
                run = partial(torch.utils.checkpoint.checkpoint, self._layer, use_reentrant=False,
                              preserve_rng_state=False) if checkpoint else self._layer
                h = run(h, layer, w, rope, attention, drops)
            else:
                h = self._layer(h, layer, w, rope, attention)
        x = self.arch.norm(h.index_select(0, supervised), self.lm.model.norm.weight)
        return chunked_cross_entropy(x, self.lm.lm_head.weight, targets, kernel=kernels)

    def uses_flash(self, device) -> bool:
        """Whether passes on `device` attend with flash attention over the row's sequences (CUDA, half
        precision, a torch whose flash kernel takes a window); else the mask path."""
        return (self.flash and torch.device(device).type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
                and _has_varlen_flash())

    def _mask(self, segments):
        """The additive attention mask of a packed row: causal, within each segment (and window)."""
        same = segments[:, None] == segments[None, :]
        causal = torch.ones_like(same).tril_()
        columns = torch.arange(segments.shape[0], device=segments.device)
        allowed = same & causal & self.arch.in_window(columns[:, None], columns[None, :])
        return torch.zeros(same.shape, dtype=self.dtype, device=segments.device).masked_fill_(~allowed, float("-inf"))

    def _masked_attention(self, qk, v, mask):
        """qk [T, heads + kv_heads, head_dim] (the query heads first), v [T, kv_heads, head_dim]
        -> [T, heads, head_dim]."""
        q, k = qk[:, :self.arch.heads], qk[:, self.arch.heads:]
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))
        k, v = self.arch.expand_kv(k, v)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.arch.head_dim ** -0.5)
        return a[0].transpose(0, 1)

    def _flash_attention(self, qk, v, starts, longest: int):
        """As `_masked_attention`, by flash attention over each sequence between consecutive `starts`
        (empty slots do nothing): the work of the examples' own squares, not the whole row's."""
        q, k = qk[:, :self.arch.heads], qk[:, self.arch.heads:]
        return _VarlenFlash.apply(q, k, v, starts, longest, self.arch.head_dim ** -0.5, self._left())

    def _packed_attention(self, qk, v, starts):
        """As `_flash_attention`, by the Triton kernel cut to the row's short sequences; q and k's
        gradient comes back as one tensor."""
        return attention_kernels.packed_attention(qk, v, starts, self.arch.heads, self.arch.head_dim ** -0.5,
                                                  self._left())

    def _left(self) -> int:
        """Keys a query sees before itself: all of its sequence's (-1), or its window's."""
        window = self.arch.window
        return -1 if window is None else window - 1

    def _draw_masks(self, layer: AdaptedLayer, t: int, device) -> dict[str, list[torch.Tensor] | None]:
        """Bit-packed keep masks for every adapter input of `layer` (per stacked group, or per adapter)."""
        out = {}
        for name, g in layer.projections.items():
            if not g.adapters or not g.adapters[0].dropout:
                out[name] = None
                continue
            d_in = g.base.weight.shape[1]
            sizes = [len(g.adapters) * t * d_in] if g.stacked else [t * d_in] * len(g.adapters)
            p = g.adapters[0].dropout
            out[name] = [((torch.rand(n // 8, 8, device=device) >= p).to(torch.uint8) * _bits(device))
                         .sum(-1, dtype=torch.uint8) for n in sizes]
        return out

    def adapter_weights(self, flat):
        """The flat buffer in the compute dtype, B's scaled, cut into its chunks (A chunks, B chunks).
        One split: its backward is one concatenation, where per-module slices would each write a
        zero-filled copy of the whole buffer (measured: a fifth of the pass)."""
        w = torch.cat([flat[:self.num_a].to(self.dtype), (flat[self.num_a:] * self.scale).to(self.dtype)])
        chunks = w.split(self.a_sizes + self.b_sizes)
        return chunks[:len(self.a_sizes)], chunks[len(self.a_sizes):]

    def _layer(self, h, layer: AdaptedLayer, w, rope, attention, drops=None, dropout: bool = True):
        arch, t = self.arch, h.shape[0]

        def attend(y):
            if self._kernels:   # q and k normed (Qwen3) and rotated, v apart, in one kernel each way
                qk, v = train_kernels.rope_qkv(y, *rope, arch.heads, arch.kv_heads, layer.layer.q_norm,
                                               layer.layer.k_norm, arch.eps)
            else:
                qk, v = arch.split_qkv(y)
                qk = rotate(qk, *rope)
            return attention(qk, v).reshape(t, arch.heads * arch.head_dim)

        def linear(name, x, residual=None):
            return self._linear(layer.projections[name], x, w, drops[name] if drops else None, dropout, residual)

        return block(arch, h, layer.layer, attend, linear, self._norm, self._activation, attend_norms_qk=self._kernels)

    def _linear(self, g: AdaptedProjection, x, w, drop=None, dropout: bool = True, residual=None):
        """(`residual` +) x @ fused base weight + each module's LoRA update (its own dropout on its
        input; `drop`: bit-packed masks to apply instead of drawing new ones; `dropout=False`: none,
        evaluation).

        The residual is added after the LoRA update, never before: the residual stream is large, and
        a small update added to its already rounded sum falls below half a unit in the last place and
        is dropped every time, so the adapter would learn from an output it does not change (on the
        H200 that left the 30-step losses 0.9% above the plain path's). Without adapters a 16-bit
        weight takes the residual as its GEMM's addend (cuBLAS's epilogue); the LoRA kernels add it
        in their B product's epilogue, rounding as peft does: the projection's output, then its sum
        with the residual. (One rounding of both is more exact, but it keeps early updates that
        peft's rounding drops, and on the H200 the fused path's early losses then ran up to 4.9e-3
        below the plain path's.)"""
        if not g.adapters:
            if residual is not None and g.base.bias is None and isinstance(g.base.weight, torch.Tensor):
                return torch.addmm(residual, x, g.base.weight.t())
            y = times_weight_t(x, g.base.weight, g.base.bias)
            return y if residual is None else residual + y
        if self._lora_kernels:
            return self._kernel_update(g, x, w, dropout, residual)
        y = times_weight_t(x, g.base.weight, g.base.bias)
        t, d_in = x.shape
        if g.stacked:
            n, first = len(g.adapters), g.adapters[0]
            d_out, r, p = g.base.outs[0], first.rank, first.dropout if dropout else 0.0
            a, b = g.weights(w)
            a, b = a.view(n, r, d_in), b.view(n, d_out, r)
            xs = x.expand(n, t, d_in)
            xs = xs if not p else F.dropout(xs, p, True) if drop is None else _apply_mask(xs, drop[0], p)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))    # [n, T, out]
            y = (y.view(t, n, d_out) + delta.transpose(0, 1)).view(t, n * d_out)
        else:
            parts = list(y.split(g.base.outs, dim=1))
            for k, (ad, (a, b)) in enumerate(zip(g.adapters, g.each(w))):
                p = ad.dropout if dropout else 0.0
                xi = x if not p else F.dropout(x, p, True) if drop is None else _apply_mask(x, drop[k], p)
                parts[ad.module] = torch.addmm(parts[ad.module], xi @ a.t(), b.t())
            y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return y if residual is None else residual + y

    def _kernel_update(self, g: AdaptedProjection, x, w, dropout: bool, residual=None):
        """`_linear` through lora_kernels.adapted_update (one rank and dropout). A 16-bit weight
        without bias goes to the kernels' function whole, which then adds the adapters' dx into the
        base product's in backward (no add kernel); a 4-bit one or a bias is applied first."""
        first, n, d_in = g.adapters[0], len(g.adapters), x.shape[1]
        a, b = g.weights(w)
        widths = g.widths
        p = first.dropout if dropout else 0.0
        whole = g.base.bias is None and isinstance(g.base.weight, torch.Tensor)
        y = None if whole else times_weight_t(x, g.base.weight, g.base.bias)
        folded = residual is not None and sum(widths) == g.base.weight.shape[0]   # the kernels add it where adapters write
        y = lora_kernels.adapted_update(y, x, a.view(n, first.rank, d_in), b.view(-1, first.rank), g.columns,
                                        widths, self._seed, g.salt, p, residual if folded else None,
                                        weight=g.base.weight if whole else None)
        return y if residual is None or folded else residual + y


@lru_cache(maxsize=None)
def _has_varlen_flash() -> bool:
    """Whether this torch has the flash kernels `_VarlenFlash` calls, with their window arguments."""
    forward = getattr(torch.ops.aten, "_flash_attention_forward", None)
    backward = getattr(torch.ops.aten, "_flash_attention_backward", None)
    if forward is None or backward is None:
        return False
    names = {a.name for a in forward.default._schema.arguments} & {a.name for a in backward.default._schema.arguments}
    return {"window_size_left", "window_size_right"} <= names


class _VarlenFlash(torch.autograd.Function):
    """Causal flash attention over packed sequences: q [T, heads, d], k and v [T, kv_heads, d], sequence
    `starts` (int32, the row's end last), optionally within a left window. Why not
    `torch.nn.attention.varlen.varlen_attn`: before torch 2.13 it refuses fewer K/V heads than query
    heads, and repeating them (6x for Qwen2.5's 2 K/V heads) costs copies and their gradients' sums,
    though the flash kernel itself reads grouped heads and sums their gradients."""

    @staticmethod
    def forward(ctx, q, k, v, starts, longest: int, scale: float, left: int):
        out, lse, rng, offset, _ = torch.ops.aten._flash_attention_forward(
            q, k, v, starts, starts, longest, longest, 0.0, True, False,
            scale=scale, window_size_left=left, window_size_right=0)
        ctx.save_for_backward(q, k, v, out, lse, starts, rng, offset)
        ctx.settings = (longest, scale, left)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, starts, rng, offset = ctx.saved_tensors
        longest, scale, left = ctx.settings
        dq, dk, dv = torch.ops.aten._flash_attention_backward(
            grad.contiguous(), q, k, v, out, lse, starts, starts, longest, longest, 0.0, True, rng, offset,
            scale=scale, window_size_left=left, window_size_right=0)
        return dq, dk, dv, None, None, None, None


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
