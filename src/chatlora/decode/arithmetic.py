"""The arithmetic of decoding (static.py keeps the caches, the rows and the captured graphs).

`DecodeModel` computes the model layer's forward (models/arch.py) with fewer, fused kernels per layer (measured: a
step of ~1,600 kernels in transformers' operation order spent 4.9 ms where the weights need 1 ms):
  - q/k/v and gate/up as one GEMM each (the modules keep views into the fused weight, as in training);
  - the residual adds inside the output projections' GEMMs (in-place `addmm_`);
  - one-token steps of up to 16 rows in six Triton kernels per layer (`fused_step`, kernels.py):
    each projection reads its weight once with RMSNorm or SiLU*mul in front and the residual add
    behind, plus RoPE + the cache write and attention; more rows keep cuBLAS with Triton RMSNorm,
    RoPE and SiLU*mul between (`unfused_step`). The kernels are checked against the torch
    operations at start-up (the prefill and any fallback use `F.rms_norm`, torch's RoPE and SDPA).
Each function reads and writes a cache state `s` (static.CacheState): keys and values
[layers, rows, kv heads, columns, head dim], each row's valid columns, next ids, positions and slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatlora.decode import kernels
from chatlora.models.arch import Architecture, block, fused_layers, rotate


class DecodeModel:
    def __init__(self, lm, use_kernels: bool = True):
        self.lm, self.arch = lm, Architecture.of(lm)
        self.vocab = self.arch.vocab
        self.device = next(lm.parameters()).device
        self.dtype = lm.model.embed_tokens.weight.dtype
        self.layers = fused_layers(lm)
        self.kernels = use_kernels and kernels.available(self.device) and self._kernels_work()

    def _kernels_work(self) -> bool:
        """Runs the Triton kernels once (compiling them) against their torch references: the
        element-wise ones on a small example, `linear` on layer 0's weights and the head at one row
        and at two (its two code paths), attention with the model's heads on a small cache against
        the decoder's own SDPA. On any failure the decoder keeps the torch operations."""
        try:
            g = torch.Generator().manual_seed(0)
            rand = lambda *shape: torch.randn(*shape, generator=g).to(self.device, self.dtype)  # noqa: E731
            pairs = self._elementwise_pairs(rand)
            first, arch, eps = self.layers[0], self.arch, self.arch.eps
            n1, wqkv, wo, wgu, wd = first.attn_norm, first.qkv.weight, first.o.weight, first.gate_up.weight, first.down.weight
            head, final = self.lm.lm_head.weight, self.lm.model.norm.weight
            for rows in (1, 2):
                h, a, gu = rand(rows, arch.hidden), rand(rows, wo.shape[1]), rand(rows, wgu.shape[0])
                pairs += [(kernels.linear(h, wqkv, norm=n1, eps=eps), arch.norm(h, n1) @ wqkv.t()),
                          (kernels.linear(a, wo, residual=h.clone()), h + a @ wo.t()),
                          (kernels.linear(gu, wd, gated=True), arch.activation(gu) @ wd.t()),
                          (kernels.linear(h, head, norm=final, eps=eps, out_dtype=torch.float32),
                           arch.norm(h, final) @ head.t())]
            hd = arch.head_dim
            q, kc, vc = rand(2, arch.heads, 1, hd), rand(2, arch.kv_heads, 40, hd), rand(2, arch.kv_heads, 40, hd)
            valid = torch.arange(40, device=self.device)[None] < torch.tensor([[30], [9]], device=self.device)
            want = self.attention(q, kc, vc, 32, self.additive(valid[:, None, None, :32]))
            pairs.append((kernels.decode_attention(q, kc, vc, valid, 32, hd ** -0.5), want.reshape(2, -1)))
            bad = [i for i, (ours, ref) in enumerate(pairs)
                   if not (ours.float() - ref.float()).norm() <= 0.02 * ref.float().norm()]
            if not bad:
                return True
            reason = f"outputs {bad} differ from the torch operations"
        except Exception as e:  # noqa: BLE001 - any compiler or driver failure: fall back
            reason = f"{type(e).__name__}: {e}"
        print(f"chatlora: the fused decode kernels are off ({reason}); decoding with torch operations")
        return False

    def _elementwise_pairs(self, rand) -> list:
        """(kernel output, torch reference) for RMSNorm, RoPE + the cache write and SiLU*mul."""
        nq, nkv, hd = 2, 1, self.arch.head_dim
        y, cos, sin, w = rand(2, (nq + 2 * nkv) * hd), rand(2, hd), rand(2, hd), rand((nq + 2 * nkv) * hd)
        slot = torch.tensor([3, 1], device=self.device)   # each row's column
        caches = [torch.zeros(2, 2, nkv, 4, hd, dtype=self.dtype, device=self.device) for _ in range(2)]
        q, ref_q = (rope(y, cos, sin, slot, *c, nq, nkv) for rope, c in
                    zip((kernels.rope_to_cache, kernels.rope_to_cache_reference), caches))
        return [(q, ref_q), (caches[0], caches[1]),
                (kernels.rms_norm(y, w, self.arch.eps), self.arch.norm(y, w)),
                (kernels.silu_mul(y), self.arch.activation(y))]

    def additive(self, allowed):
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def attention(self, q, kc, vc, attend: int, mask) -> torch.Tensor:
        """SDPA of q [B, nq, T, hd] over the first `attend` cache columns; [B, T, nq, hd] out."""
        keys, values = self.arch.expand_kv(kc[:, :, :attend], vc[:, :, :attend])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask,
                                              scale=self.arch.head_dim ** -0.5).transpose(1, 2)

    def fused(self, batch: int) -> bool:
        return self.kernels and batch <= kernels.LINEAR_ROWS

    def fused_step(self, s, attend: int) -> torch.Tensor:
        """A one-token step for at most kernels.LINEAR_ROWS rows in six kernels per layer
        (kernels.py): q/k/v with RMSNorm in front; RoPE + the cache write; attention over the valid
        cache columns; o adding into the residual; gate/up with RMSNorm in front; down with SiLU*mul
        in front adding into the residual. The head takes the final RMSNorm and writes fp32 logits."""
        arch, b = self.arch, s.batch
        nq, nkv, hd, eps = arch.heads, arch.kv_heads, arch.head_dim, arch.eps
        cos, sin = arch.rope(s.positions[:, None], self.dtype)
        cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        h = F.embedding(s.tokens, self.lm.model.embed_tokens.weight)
        ours = kernels.attention_wins(b, attend)
        mask = None if ours else self.additive(s.valid[:, None, None, :attend])
        for i, layer in enumerate(self.layers):
            kc, vc = s.k[i], s.v[i]
            y = _biased(kernels.linear(h, layer.qkv.weight, norm=layer.attn_norm, eps=eps), layer.qkv)
            q = kernels.rope_to_cache(arch.normed_qk(y, layer), cos, sin, s.slot, kc, vc, nq, nkv)
            if ours:
                a = kernels.decode_attention(q, kc, vc, s.valid, attend, hd ** -0.5)
            else:
                a = self.attention(q, kc, vc, attend, mask).reshape(b, nq * hd)
            _biased(kernels.linear(a, layer.o.weight, residual=h), layer.o)
            gu = _biased(kernels.linear(h, layer.gate_up.weight, norm=layer.mlp_norm, eps=eps), layer.gate_up)
            _biased(kernels.linear(gu, layer.down.weight, gated=True, residual=h), layer.down)
        return kernels.linear(h, self.lm.lm_head.weight, norm=self.lm.model.norm.weight, eps=eps,
                              out_dtype=torch.float32)

    def prefill(self, s, index, ids, positions, mask) -> torch.Tensor:
        """Prompts [J, W] of the rows `index` through the model, their keys and values written at
        columns [0, W) of those rows, attention within each prompt (`mask` additive [J, 1, W, W])."""
        j, t = ids.shape
        nq = self.arch.heads
        cos, sin = self.arch.rope(positions, self.dtype)   # [J, W, hd]

        def attention(i, y):
            qk, v = self.arch.split_qkv(y.view(j, t, -1))
            qk = rotate(qk, cos[:, :, None], sin[:, :, None])
            q, k, v = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2), v.transpose(1, 2)
            s.k[i][index, :, :t] = k
            s.v[i][index, :, :t] = v
            return self.attention(q, k, v, t, mask)

        return self._forward(ids, attention, elementwise=False)

    def unfused_step(self, s, attend: int) -> torch.Tensor:
        """A one-token step with cuBLAS projections (more rows than the fused step takes, or no
        kernels), Triton RMSNorm, RoPE + the cache write and SiLU*mul where they work."""
        b, nq, nkv, hd = s.batch, self.arch.heads, self.arch.kv_heads, self.arch.head_dim
        cos, sin = self.arch.rope(s.positions[:, None], self.dtype)
        cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        mask = self.additive(s.valid[:, None, None, :attend])
        rope = kernels.rope_to_cache if self.kernels else kernels.rope_to_cache_reference

        def attention(i, y):
            q = rope(y, cos, sin, s.slot, s.k[i], s.v[i], nq, nkv)
            return self.attention(q, s.k[i], s.v[i], attend, mask)

        return self._forward(s.tokens[:, None], attention, elementwise=self.kernels)

    def _forward(self, ids, attention, elementwise: bool) -> torch.Tensor:
        """Rows [B, T] through the layers, `attention(layer, y)` turning the fused q/k/v projection y
        into the attention output [B, T, nq, hd]; logits of the last position (fp32). `elementwise`:
        Triton RMSNorm and SiLU*mul (one-token steps)."""
        b, t = ids.shape
        arch = self.arch
        h = F.embedding(ids, self.lm.model.embed_tokens.weight).view(b * t, arch.hidden)
        norm = (lambda x, w: kernels.rms_norm(x, w, arch.eps)) if elementwise else None
        activation = kernels.silu_mul if elementwise else None

        def linear(name, x, residual=None):
            # the residual add in place: out-of-place addmm first copies h into its output (a kernel a call)
            projection = getattr(layer, name)
            weight = projection.weight.t()
            if residual is None:
                return x @ weight if projection.bias is None else torch.addmm(projection.bias, x, weight)
            return _biased(residual.addmm_(x, weight), projection)

        for i, layer in enumerate(self.layers):
            h = block(arch, h, layer, lambda y: attention(i, y).reshape(b * t, arch.heads * arch.head_dim),
                      linear, norm, activation)
        h = arch.norm(h.view(b, t, -1)[:, -1], self.lm.model.norm.weight)
        # weight @ h.T: with an odd vocabulary (Index: 65,029) the [B, vocab] output's rows are
        # misaligned and cuBLAS falls back to a slow kernel (measured at batch 16: 0.31 ms of 3.4)
        return (self.lm.lm_head.weight @ h.t()).t().float()


def _biased(y, projection):
    """`y` (the projection's output, maybe with the residual in it) plus the projection's bias, in place."""
    return y if projection.bias is None else y.add_(projection.bias)
