"""The arithmetic of decoding (fastdecode.py keeps the caches, the rows and the captured graphs).

`DecodeModel` computes transformers' Llama forward with fewer, fused kernels per layer (measured: a
step of ~1,600 kernels in transformers' operation order spent 4.9 ms where the weights need 1 ms):
  - q/k/v and gate/up as one GEMM each (the modules keep views into the fused weight, as in training);
  - the residual adds inside the output projections' GEMMs (in-place `addmm_`);
  - one-token steps of up to 16 rows in six Triton kernels per layer (`fused_step`, kernels.py):
    each projection reads its weight once with RMSNorm or SiLU*mul in front and the residual add
    behind, plus RoPE + the cache write and attention; more rows keep cuBLAS with Triton RMSNorm,
    RoPE and SiLU*mul between (`unfused_step`). The kernels are checked against the torch
    operations at start-up (the prefill and any fallback use `F.rms_norm`, torch's RoPE and SDPA).
Each function reads and writes a cache state `s` (fastdecode.StaticDecoder._state): keys and values
[layers, rows, kv heads, columns, head dim], each row's valid columns, next ids, positions and slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chatlora.decode import kernels
from chatlora.train.fused import fuse_weights, rope_tables, rotate


class DecodeModel:
    def __init__(self, lm):
        c = lm.config
        self.lm = lm
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.hidden, self.eps = c.hidden_size, c.rms_norm_eps
        self.vocab = lm.lm_head.weight.shape[0]
        rotary = lm.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        self.device = next(lm.parameters()).device
        self.dtype = lm.model.embed_tokens.weight.dtype
        self.layers = [(l.input_layernorm.weight, l.post_attention_layernorm.weight,
                        fuse_weights([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                        l.self_attn.o_proj.weight, fuse_weights([l.mlp.gate_proj, l.mlp.up_proj]),
                        l.mlp.down_proj.weight)
                       for l in lm.model.layers]
        self.kernels = kernels.available(self.device) and self._kernels_work()

    def _kernels_work(self) -> bool:
        """Runs the Triton kernels once (compiling them) against their torch references: the
        element-wise ones on a small example, `linear` on layer 0's weights and the head at one row
        and at two (its two code paths), attention with the model's heads on a small cache against
        the decoder's own SDPA. On any failure the decoder keeps the torch operations."""
        try:
            g = torch.Generator().manual_seed(0)
            rand = lambda *shape: torch.randn(*shape, generator=g).to(self.device, self.dtype)  # noqa: E731
            pairs = self._elementwise_pairs(rand)
            n1, n2, wqkv, wo, wgu, wd = self.layers[0]
            head, final = self.lm.lm_head.weight, self.lm.model.norm.weight
            norm = lambda x, w: F.rms_norm(x, (x.shape[1],), w, self.eps)  # noqa: E731
            for rows in (1, 2):
                h, a, gu = rand(rows, self.hidden), rand(rows, wo.shape[1]), rand(rows, wgu.shape[0])
                inter = wd.shape[1]
                pairs += [(kernels.linear(h, wqkv, norm=n1, eps=self.eps), norm(h, n1) @ wqkv.t()),
                          (kernels.linear(a, wo, residual=h.clone()), h + a @ wo.t()),
                          (kernels.linear(gu, wd, gated=True), (F.silu(gu[:, :inter]) * gu[:, inter:]) @ wd.t()),
                          (kernels.linear(h, head, norm=final, eps=self.eps, out_dtype=torch.float32),
                           norm(h, final) @ head.t())]
            hd = self.head_dim
            q, kc, vc = rand(2, self.heads, 1, hd), rand(2, self.kv_heads, 40, hd), rand(2, self.kv_heads, 40, hd)
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
        nq, nkv, hd = 2, 1, self.head_dim
        y, cos, sin, w = rand(2, (nq + 2 * nkv) * hd), rand(2, hd), rand(2, hd), rand((nq + 2 * nkv) * hd)
        slot = torch.tensor([3, 1], device=self.device)   # each row's column
        caches = [torch.zeros(2, 2, nkv, 4, hd, dtype=self.dtype, device=self.device) for _ in range(2)]
        q, ref_q = (rope(y, cos, sin, slot, *c, nq, nkv) for rope, c in
                    zip((kernels.rope_to_cache, kernels.rope_to_cache_reference), caches))
        half = y.shape[1] // 2
        return [(q, ref_q), (caches[0], caches[1]),
                (kernels.rms_norm(y, w, self.eps), F.rms_norm(y, (y.shape[1],), w, self.eps)),
                (kernels.silu_mul(y), F.silu(y[:, :half]) * y[:, half:])]

    def additive(self, allowed):
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def attention(self, q, kc, vc, attend: int, mask) -> torch.Tensor:
        """SDPA of q [B, nq, T, hd] over the first `attend` cache columns; [B, T, nq, hd] out."""
        keys, values = kc[:, :, :attend], vc[:, :, :attend]
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim ** -0.5).transpose(1, 2)

    def fused(self, batch: int) -> bool:
        return self.kernels and batch <= kernels.LINEAR_ROWS

    def fused_step(self, s, attend: int) -> torch.Tensor:
        """A one-token step for at most kernels.LINEAR_ROWS rows in six kernels per layer
        (kernels.py): q/k/v with RMSNorm in front; RoPE + the cache write; attention over the valid
        cache columns; o adding into the residual; gate/up with RMSNorm in front; down with SiLU*mul
        in front adding into the residual. The head takes the final RMSNorm and writes fp32 logits."""
        nq, nkv, hd, b = self.heads, self.kv_heads, self.head_dim, s["batch"]
        cos, sin = rope_tables(s["positions"][:, None], self.inv_freq, self.rope_scale, self.dtype)
        cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        h = F.embedding(s["tokens"], self.lm.model.embed_tokens.weight)
        ours = kernels.attention_wins(b, attend)
        mask = None if ours else self.additive(s["valid"][:, None, None, :attend])
        for i, (n1, n2, wqkv, wo, wgu, wd) in enumerate(self.layers):
            kc, vc = s["k"][i], s["v"][i]
            y = kernels.linear(h, wqkv, norm=n1, eps=self.eps)
            q = kernels.rope_to_cache(y, cos, sin, s["slot"], kc, vc, nq, nkv)
            if ours:
                a = kernels.decode_attention(q, kc, vc, s["valid"], attend, hd ** -0.5)
            else:
                a = self.attention(q, kc, vc, attend, mask).reshape(b, nq * hd)
            kernels.linear(a, wo, residual=h)
            gu = kernels.linear(h, wgu, norm=n2, eps=self.eps)
            kernels.linear(gu, wd, gated=True, residual=h)
        return kernels.linear(h, self.lm.lm_head.weight, norm=self.lm.model.norm.weight, eps=self.eps,
                              out_dtype=torch.float32)

    def prefill(self, s, index, ids, positions, mask) -> torch.Tensor:
        """Prompts [J, W] of the rows `index` through the model, their keys and values written at
        columns [0, W) of those rows, attention within each prompt (`mask` additive [J, 1, W, W])."""
        j, t = ids.shape
        nq, nkv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = rope_tables(positions, self.inv_freq, self.rope_scale, self.dtype)   # [J, W, hd]

        def attention(i, y):
            qk = rotate(y[:, :(nq + nkv) * hd].view(j, t, nq + nkv, hd), cos[:, :, None], sin[:, :, None])
            q, k = qk[:, :, :nq].transpose(1, 2), qk[:, :, nq:].transpose(1, 2)
            v = y[:, (nq + nkv) * hd:].view(j, t, nkv, hd).transpose(1, 2)
            s["k"][i][index, :, :t] = k
            s["v"][i][index, :, :t] = v
            return self.attention(q, k, v, t, mask)

        return self._forward(ids, attention, elementwise=False)

    def unfused_step(self, s, attend: int) -> torch.Tensor:
        """A one-token step with cuBLAS projections (more rows than the fused step takes, or no
        kernels), Triton RMSNorm, RoPE + the cache write and SiLU*mul where they work."""
        b, nq, nkv, hd = s["batch"], self.heads, self.kv_heads, self.head_dim
        cos, sin = rope_tables(s["positions"][:, None], self.inv_freq, self.rope_scale, self.dtype)
        cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        mask = self.additive(s["valid"][:, None, None, :attend])
        rope = kernels.rope_to_cache if self.kernels else kernels.rope_to_cache_reference

        def attention(i, y):
            q = rope(y, cos, sin, s["slot"], s["k"][i], s["v"][i], nq, nkv)
            return self.attention(q, s["k"][i], s["v"][i], attend, mask)

        return self._forward(s["tokens"][:, None], attention, elementwise=self.kernels)

    def _forward(self, ids, attention, elementwise: bool) -> torch.Tensor:
        """Rows [B, T] through the layers, `attention(layer, y)` turning the fused q/k/v projection y
        into the attention output [B, T, nq, hd]; logits of the last position (fp32). `elementwise`:
        Triton RMSNorm and SiLU*mul (one-token steps)."""
        b, t = ids.shape
        h = F.embedding(ids, self.lm.model.embed_tokens.weight).view(b * t, self.hidden)
        norm = ((lambda x, w: kernels.rms_norm(x, w, self.eps)) if elementwise
                else (lambda x, w: F.rms_norm(x, (self.hidden,), w, self.eps)))
        for i, (n1, n2, wqkv, wo, wgu, wd) in enumerate(self.layers):
            a = attention(i, norm(h, n1) @ wqkv.t())
            # in place: out-of-place addmm first copies h into its output (a kernel per call)
            h = h.addmm_(a.reshape(b * t, self.heads * self.head_dim), wo.t())
            gu = norm(h, n2) @ wgu.t()
            if elementwise:
                act = kernels.silu_mul(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                act = F.silu(gate) * up
            h = h.addmm_(act, wd.t())
        h = F.rms_norm(h.view(b, t, -1)[:, -1], (self.hidden,), self.lm.model.norm.weight, self.eps)
        # weight @ h.T: with an odd vocabulary (Index: 65,029) the [B, vocab] output's rows are
        # misaligned and cuBLAS falls back to a slow kernel (measured at batch 16: 0.31 ms of 3.4)
        return (self.lm.lm_head.weight @ h.t()).t().float()
