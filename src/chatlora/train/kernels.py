"""Triton kernels of the fused training pass, each with its backward, for the elementwise and row-wise
steps of a layer that torch runs as several kernels each (bench/NOTES.md: about 2,500 small kernels
per pass beside the GEMMs):
  - `rms_norm`: RMSNorm; the forward is the decoder's kernel (decode/kernels.py) keeping each row's
    1 / RMS, the backward one kernel per row (the norm weights are frozen: no weight gradient);
  - `silu_mul`: SiLU(gate) * up over the fused gate/up output; the forward is the decoder's kernel,
    the backward one kernel writing both halves' gradients; only the gate/up output is kept for it;
  - `cross_entropy_grad_`: each row's cross-entropy from its logits, which it overwrites with their
    gradient (softmax - one-hot): no float32 copy of the logits, one kernel for five (train/head.py);
  - `rope_qkv`: the q/k/v projection's output split into q and k rotated together (RoPE) and v, with
    Qwen3's q/k norm applied first in the same kernel; its backward writes the whole output's
    gradient in one kernel (through torch the two slices' gradients were each a zero-filled
    full-width tensor, then added).
Each computes in fp32 and rounds once. tests/test_kernels.py compares them, forward and backward,
with float64 torch under Triton's interpreter; tests/test_gpu.py compiled on a GPU.

Where they run: models/triton_kernels.available (CUDA, or the interpreter under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch

from chatlora.decode import kernels as decode_kernels
from chatlora.models.triton_kernels import tl, triton

if triton is not None:

    @triton.jit
    def _rms_norm_backward_kernel(dy, x, weight, rstd, dx, n, BLOCK: tl.constexpr):
        """dx = rstd * (g - xhat * mean(xhat * g)), g = w * dy, xhat = x * rstd."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        keep = offs < n
        v = tl.load(x + row * n + offs, mask=keep, other=0.0).to(tl.float32)
        g = tl.load(dy + row * n + offs, mask=keep, other=0.0).to(tl.float32) * \
            tl.load(weight + offs, mask=keep, other=0.0).to(tl.float32)
        r = tl.load(rstd + row)
        xhat = v * r
        mean = tl.sum(xhat * g, axis=0) / n
        tl.store(dx + row * n + offs, (r * (g - xhat * mean)).to(dx.dtype.element_ty), mask=keep)

    @triton.jit
    def _silu_mul_backward_kernel(dout, gu, dgu, inter, BLOCK: tl.constexpr):
        """d gate = dout * up * s * (1 + gate * (1 - s)), d up = dout * gate * s; s = sigmoid(gate)."""
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < inter
        gate = tl.load(gu + row * 2 * inter + offs, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(gu + row * 2 * inter + inter + offs, mask=keep, other=0.0).to(tl.float32)
        d = tl.load(dout + row * inter + offs, mask=keep, other=0.0).to(tl.float32)
        s = 1.0 / (1.0 + tl.exp(-gate))
        dgate = d * up * s * (1.0 + gate * (1.0 - s))
        tl.store(dgu + row * 2 * inter + offs, dgate.to(dgu.dtype.element_ty), mask=keep)
        tl.store(dgu + row * 2 * inter + inter + offs, (d * gate * s).to(dgu.dtype.element_ty), mask=keep)


    @triton.jit
    def _cross_entropy_grad_kernel(logits, stride, targets, losses, vocab, ignore, BLOCK: tl.constexpr):
        """Row `row` of logits (`vocab` used of `stride`): losses[row] = logsumexp - logit[target], and
        the row overwritten with softmax - one-hot; an `ignore` target gives 0 and a zero row."""
        row = tl.program_id(0)
        start = logits + row * stride
        target = tl.load(targets + row)
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), dtype=tl.float32)
        for first in range(0, vocab, BLOCK):   # online log-sum-exp over the row
            offs = first + tl.arange(0, BLOCK)
            v = tl.load(start + offs, mask=offs < vocab, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(v, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(v - new_top), axis=0)
            top = new_top
        lse = top + tl.log(total)
        valid = target != ignore
        picked = tl.load(start + tl.where(valid, target, 0)).to(tl.float32)
        tl.store(losses + row, tl.where(valid, lse - picked, 0.0))
        for first in range(0, vocab, BLOCK):
            offs = first + tl.arange(0, BLOCK)
            keep = offs < vocab
            v = tl.load(start + offs, mask=keep, other=0.0).to(tl.float32)
            g = tl.exp(v - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(start + offs, tl.where(valid, g, 0.0).to(logits.dtype.element_ty), mask=keep)

    @triton.jit
    def _rope_qkv_kernel(src, stride, cos, sin, qk, v, rotated, total, x, q_weight, k_weight, rstd, q_heads, eps,
                         BACKWARD: tl.constexpr, NORM: tl.constexpr, HALF: tl.constexpr, HB: tl.constexpr):
        """Forward: row t of src [T, width] -> qk [T, rotated, 2 HALF] (x * cos + swap(x) * sin, sin
        signed as models.arch.rope_tables makes it) and v [T, total - rotated, 2 HALF]. Backward: the
        same layout read from qk and v (their gradients), written into src (the output's gradient):
        d x = d y * cos + swap(d y * sin).
        NORM (Qwen3): each q and k head is RMS-normed first (q_weight for the first q_heads, k_weight
        after), its 1 / RMS kept in rstd [T, rotated]; backward then reads the heads' input from x
        (the projection's output) and returns the gradient through the norm too."""
        t = tl.program_id(0)
        heads = tl.program_id(1) * HB + tl.arange(0, HB)
        offs = tl.arange(0, HALF)
        c1 = tl.load(cos + t * 2 * HALF + offs).to(tl.float32)[None, :]
        c2 = tl.load(cos + t * 2 * HALF + HALF + offs).to(tl.float32)[None, :]
        s1 = tl.load(sin + t * 2 * HALF + offs).to(tl.float32)[None, :]
        s2 = tl.load(sin + t * 2 * HALF + HALF + offs).to(tl.float32)[None, :]
        wide = src + t * stride + heads[:, None] * 2 * HALF + offs[None, :]
        is_qk = (heads < rotated)[:, None]
        is_v = ((heads >= rotated) & (heads < total))[:, None]
        apart = qk + (t * rotated + heads[:, None]) * 2 * HALF + offs[None, :]
        vs = v + (t * (total - rotated) + heads[:, None] - rotated) * 2 * HALF + offs[None, :]
        if BACKWARD:   # gradients in: qk and v; out: the wide row. d x = d y * cos + swap(d y * sin)
            src_qk, src_v, dst_qk, dst_v, sa, sb = apart, vs, wide, wide, s2, s1
        else:
            src_qk, src_v, dst_qk, dst_v, sa, sb = wide, wide, apart, vs, s1, s2
        x1 = tl.load(src_qk, mask=is_qk, other=0.0).to(tl.float32)
        x2 = tl.load(src_qk + HALF, mask=is_qk, other=0.0).to(tl.float32)
        if NORM:
            is_q = (heads < q_heads)[:, None]
            w1 = tl.where(is_q, tl.load(q_weight + offs)[None, :], tl.load(k_weight + offs)[None, :]).to(tl.float32)
            w2 = tl.where(is_q, tl.load(q_weight + HALF + offs)[None, :],
                          tl.load(k_weight + HALF + offs)[None, :]).to(tl.float32)
            if BACKWARD:   # g: the normed heads' gradient times w; dx = r * (g - xhat * mean(g * xhat))
                r = tl.load(rstd + t * rotated + heads, mask=heads < rotated, other=0.0)[:, None]
                g1, g2 = (x1 * c1 + x2 * sa) * w1, (x2 * c2 + x1 * sb) * w2
                inputs = x + t * stride + heads[:, None] * 2 * HALF + offs[None, :]
                h1 = tl.load(inputs, mask=is_qk, other=0.0).to(tl.float32) * r
                h2 = tl.load(inputs + HALF, mask=is_qk, other=0.0).to(tl.float32) * r
                mean = (tl.sum(g1 * h1, axis=1) + tl.sum(g2 * h2, axis=1))[:, None] / (2 * HALF)
                x1, x2 = r * (g1 - h1 * mean), r * (g2 - h2 * mean)
            else:
                r = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)
                tl.store(rstd + t * rotated + heads, r, mask=heads < rotated)
                x1, x2 = x1 * r[:, None] * w1, x2 * r[:, None] * w2
        if NORM and BACKWARD:
            tl.store(dst_qk, x1.to(src.dtype.element_ty), mask=is_qk)
            tl.store(dst_qk + HALF, x2.to(src.dtype.element_ty), mask=is_qk)
        else:
            tl.store(dst_qk, (x1 * c1 + x2 * sa).to(qk.dtype.element_ty), mask=is_qk)
            tl.store(dst_qk + HALF, (x2 * c2 + x1 * sb).to(qk.dtype.element_ty), mask=is_qk)
        tl.store(dst_v, tl.load(src_v, mask=is_v), mask=is_v)
        tl.store(dst_v + HALF, tl.load(src_v + HALF, mask=is_v), mask=is_v)


class _RoPEQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, cos, sin, rotated: int, total: int, norms, eps: float):
        t, hd = y.shape[0], cos.shape[-1]
        y = y if y.stride(1) == 1 else y.contiguous()
        qk = torch.empty(t, rotated, hd, dtype=y.dtype, device=y.device)
        v = torch.empty(t, total - rotated, hd, dtype=y.dtype, device=y.device)
        rstd = torch.empty(t, rotated, dtype=torch.float32, device=y.device) if norms else None
        _rope_launch(y, cos, sin, qk, v, rotated, total, backward=False, norms=norms, rstd=rstd, eps=eps)
        ctx.save_for_backward(cos, sin, *((y, rstd, *norms[1:]) if norms else ()))   # the norm's backward reads y
        ctx.settings = (y.shape, rotated, total, norms[0] if norms else 0)
        return qk, v

    @staticmethod
    def backward(ctx, dqk, dv):
        cos, sin, *kept = ctx.saved_tensors
        shape, rotated, total, q_heads = ctx.settings
        dy = torch.empty(shape, dtype=dqk.dtype, device=dqk.device)
        y, rstd, *weights = kept or (None, None)
        _rope_launch(dy, cos, sin, dqk.contiguous(), dv.contiguous(), rotated, total, backward=True,
                     norms=(q_heads, *weights) if kept else None, rstd=rstd, x=y)
        return dy, None, None, None, None, None, None


def _rope_launch(wide, cos, sin, qk, v, rotated: int, total: int, backward: bool, norms=None, rstd=None,
                 x=None, eps: float = 0.0) -> None:
    """The RoPE kernel over every row; `norms`: (q heads, q_norm weight, k_norm weight) or None."""
    heads_per_program = 4
    q_heads, q_weight, k_weight = norms or (0, cos, cos)   # unread without NORM
    _rope_qkv_kernel[(wide.shape[0], triton.cdiv(total, heads_per_program))](
        wide, wide.stride(0), cos.contiguous(), sin.contiguous(), qk, v, rotated, total,
        wide if x is None else x, q_weight, k_weight, cos if rstd is None else rstd, q_heads, eps,
        BACKWARD=backward, NORM=norms is not None, HALF=cos.shape[-1] // 2, HB=heads_per_program)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        out = decode_kernels.rms_norm(rows, weight, eps, rstd)
        ctx.save_for_backward(rows, weight, rstd)
        ctx.shape = x.shape
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        rows, weight, rstd = ctx.saved_tensors
        if ctx.needs_input_grad[1]:
            raise NotImplementedError("the training kernels take frozen norm weights (LoRA trains adapters only)")
        dy = dy.reshape(rows.shape).contiguous()
        dx = torch.empty_like(rows)
        _rms_norm_backward_kernel[(rows.shape[0],)](dy, rows, weight, rstd, dx, rows.shape[1],
                                                    BLOCK=triton.next_power_of_2(rows.shape[1]))
        return dx.view(ctx.shape), None, None


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        gu = gate_up.contiguous()
        ctx.save_for_backward(gu)
        return decode_kernels.silu_mul(gu)

    @staticmethod
    def backward(ctx, dout):
        (gu,) = ctx.saved_tensors
        rows, inter = gu.shape[0], gu.shape[1] // 2
        dgu = torch.empty_like(gu)
        block = 1024
        _silu_mul_backward_kernel[(rows, triton.cdiv(inter, block))](dout.contiguous(), gu, dgu, inter, BLOCK=block)
        return dgu


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension with a frozen `weight`, forward and backward in Triton."""
    return _RMSNorm.apply(x, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of a [rows, 2 * inter] gate/up output, forward and backward in Triton."""
    return _SiluMul.apply(gate_up)


def cross_entropy_grad_(logits: torch.Tensor, targets: torch.Tensor, ignore: int) -> torch.Tensor:
    """Each row's cross-entropy (float32 [rows]; 0 where the target is `ignore`) from `logits`
    [rows, vocab] (rows may be strided, columns contiguous), which are overwritten in place with the
    loss's gradient: softmax - one-hot, in the logits' dtype (a zero row where ignored)."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _cross_entropy_grad_kernel[(rows,)](logits, logits.stride(0), targets.contiguous(), losses, vocab, ignore,
                                        BLOCK=min(4096, triton.next_power_of_2(vocab)))
    return losses


def rope_qkv(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 1e-6):
    """The q/k/v projection's output y [T, (heads + 2 kv_heads) * head_dim] as q and k rotated
    together [T, heads + kv_heads, head_dim] and v [T, kv_heads, head_dim] (both new tensors);
    cos and sin [T, head_dim] as models.arch.rope_tables gives them. As `split_qkv` then `rotate`;
    with `q_norm` and `k_norm` (Qwen3's [head_dim] weights), each q and k head RMS-normed first, as
    models.arch's `normed_qk`, in the same kernel (its backward too)."""
    norms = None if q_norm is None else (heads, q_norm.contiguous(), k_norm.contiguous())
    return _RoPEQKV.apply(y, cos, sin, heads + kv_heads, heads + 2 * kv_heads, norms, eps)
