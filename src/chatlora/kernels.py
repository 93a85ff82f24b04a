"""Triton kernels for the one-token decode step, each replacing several small torch kernels.

A decode step at batch 1 is ~640 kernels of which the GEMMs are ~1.4 ms and the rest ~1 ms of
2-4 us launches (bench/NOTES.md). These fuse the element-wise parts of a layer:
  - `rms_norm`: RMSNorm of each row (as `F.rms_norm`: fp32 statistics, times the weight);
  - `rope_to_cache`: RoPE on q and k, k and v written into the cache at the step's slot, q returned
    (replaces mul, flip, addcmul, two copies and two `index_copy_`);
  - `silu_mul`: SiLU(gate) * up from the fused gate/up projection's output.
Each computes in fp32 and rounds once, where the torch operations round after every step, so
results agree to bf16 rounding (tests/test_gpu.py compares them with the torch operations).

`available(device)` says whether they can run (Triton importable, a CUDA device, or Triton's CPU
interpreter under `TRITON_INTERPRET=1` for tests); `CHATLORA_TRITON=0` turns them off.
"""

from __future__ import annotations

import os

import torch

from chatlora.fastpath import rotate

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the decoder keeps its torch operations
    triton = None


def available(device: torch.device) -> bool:
    if triton is None or os.environ.get("CHATLORA_TRITON", "1") == "0":
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x, weight, out, n, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        keep = offs < n
        v = tl.load(x + row * n + offs, mask=keep, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / n + eps)
        w = tl.load(weight + offs, mask=keep, other=0.0).to(tl.float32)
        tl.store(out + row * n + offs, (v * rstd * w).to(out.dtype.element_ty), mask=keep)

    @triton.jit
    def _rope_to_cache_kernel(y, cos, sin, slot, kc, vc, q, width, nq, nkv, cap,
                              HALF: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        hd = 2 * HALF
        offs = tl.arange(0, HALF)
        src = y + b * width + head * hd
        at = tl.load(slot)
        if head < nq + nkv:   # q or k: rotate (sin carries rotate_half's signs)
            x1 = tl.load(src + offs).to(tl.float32)
            x2 = tl.load(src + HALF + offs).to(tl.float32)
            c1 = tl.load(cos + b * hd + offs).to(tl.float32)
            c2 = tl.load(cos + b * hd + HALF + offs).to(tl.float32)
            s1 = tl.load(sin + b * hd + offs).to(tl.float32)
            s2 = tl.load(sin + b * hd + HALF + offs).to(tl.float32)
            r1 = x1 * c1 + x2 * s1
            r2 = x2 * c2 + x1 * s2
            if head < nq:
                dst = q + (b * nq + head) * hd
            else:
                dst = kc + ((b * nkv + head - nq) * cap + at) * hd
            tl.store(dst + offs, r1.to(q.dtype.element_ty))
            tl.store(dst + HALF + offs, r2.to(q.dtype.element_ty))
        else:                 # v: copied into the cache
            dst = vc + ((b * nkv + head - nq - nkv) * cap + at) * hd
            tl.store(dst + offs, tl.load(src + offs))
            tl.store(dst + HALF + offs, tl.load(src + HALF + offs))

    @triton.jit
    def _silu_mul_kernel(gu, out, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < inter
        gate = tl.load(gu + row * 2 * inter + offs, mask=keep, other=0.0).to(tl.float32)
        up = tl.load(gu + row * 2 * inter + inter + offs, mask=keep, other=0.0).to(tl.float32)
        act = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out + row * inter + offs, act.to(out.dtype.element_ty), mask=keep)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of a contiguous [rows, n] tensor."""
    rows, n = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, weight, out, n, eps, BLOCK=triton.next_power_of_2(n))
    return out


def rope_to_cache(y, cos, sin, slot, kc, vc, nq: int, nkv: int) -> torch.Tensor:
    """One token per row. `y` [B, (nq + 2 nkv) * hd] is the fused q/k/v projection (contiguous rows);
    `cos`, `sin` [B, hd] the row's rotation (sin with rotate_half's signs: -sin on the first half);
    `kc`, `vc` [B, nkv, cap, hd] this layer's contiguous caches, written at column `slot` (a [1]
    tensor). Returns the rotated q as [B, nq, 1, hd]."""
    b, hd, cap = y.shape[0], kc.shape[-1], kc.shape[2]
    q = torch.empty(b, nq, 1, hd, dtype=y.dtype, device=y.device)
    _rope_to_cache_kernel[(b, nq + 2 * nkv)](y, cos, sin, slot, kc, vc, q, y.shape[1], nq, nkv, cap,
                                             HALF=hd // 2)
    return q


def rope_to_cache_reference(y, cos, sin, slot, kc, vc, nq: int, nkv: int) -> torch.Tensor:
    """`rope_to_cache` with torch operations: what the decoder runs without the kernels, and their
    reference in the tests."""
    b, hd = y.shape[0], kc.shape[-1]
    qk = rotate(y[:, :(nq + nkv) * hd].view(b, 1, nq + nkv, hd), cos[:, None, None], sin[:, None, None])
    kc.index_copy_(2, slot, qk[:, :, nq:].transpose(1, 2))
    vc.index_copy_(2, slot, y[:, (nq + nkv) * hd:].view(b, 1, nkv, hd).transpose(1, 2))
    return qk[:, :, :nq].transpose(1, 2)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a contiguous [rows, 2 * inter] tensor holding gate then up."""
    rows, inter = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gu, out, inter, BLOCK=block)
    return out
