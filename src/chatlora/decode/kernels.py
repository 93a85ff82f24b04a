"""Triton kernels for the one-token decode step, each replacing several small torch kernels.

A decode step at batch 1 reads every weight once; at this size a kernel costs ~2.5 us on top of its
bytes (launch, ramp-up, tail), so a layer's time is as much its number of kernels as its weights
(bench/NOTES.md). For up to LINEAR_ROWS rows the decoder runs six kernels per layer:
  - `linear`: x @ W.T reading W once, with RMSNorm (q/k/v, gate/up, the head) or SiLU(gate) * up
    (down) computed in front and the residual add (o, down) behind; launch parameters per matrix
    size measured on an H200 (`linear_config`, bench/tune_decode_kernels.py);
  - `rope_to_cache`: RoPE on q and k, k and v written into the cache at each row's slot, q returned;
  - `decode_attention`: one query per row over the valid cache columns, split into chunks merged by
    a second kernel when long.
For more rows the decoder keeps cuBLAS with `rms_norm` and `silu_mul` in between.
Each computes in fp32 and rounds once, where the torch operations round after every step, so
results agree to bf16 rounding (tests/kernel_cases.py compares each with the torch operations,
compiled on a GPU and on CPU under Triton's interpreter).

`available(device)` says whether they can run (Triton importable, a CUDA device, or Triton's CPU
interpreter under `TRITON_INTERPRET=1` for tests). Whether a decoder uses them is its options'
(static.Options: `generate.kernels`, or CHATLORA_TRITON=0).
"""

from __future__ import annotations

import functools

import torch

from chatlora.models import triton_kernels
from chatlora.models.arch import rotate
from chatlora.models.triton_kernels import tl, triton

available = triton_kernels.available   # whether these kernels can run on a device

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x, weight, out, rstd_out, n, eps, BLOCK: tl.constexpr, STORE_RSTD: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        keep = offs < n
        v = tl.load(x + row * n + offs, mask=keep, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / n + eps)
        w = tl.load(weight + offs, mask=keep, other=0.0).to(tl.float32)
        tl.store(out + row * n + offs, (v * rstd * w).to(out.dtype.element_ty), mask=keep)
        if STORE_RSTD:   # for a backward pass (train/kernels.py)
            tl.store(rstd_out + row, rstd)

    @triton.jit
    def _rope_to_cache_kernel(y, cos, sin, slot, kc, vc, q, width, nq, nkv, cap,
                              HALF: tl.constexpr):
        b = tl.program_id(0)
        head = tl.program_id(1)
        hd = 2 * HALF
        offs = tl.arange(0, HALF)
        src = y + b * width + head * hd
        at = tl.load(slot + b)   # this row's cache column
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


    @triton.jit
    def _linear_kernel(x, w, out, res, nw, rows, n, x_stride, eps, K: tl.constexpr,
                       PROLOGUE: tl.constexpr, RESIDUAL: tl.constexpr, ROWS: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, MMA: tl.constexpr, IEEE: tl.constexpr):
        """out[r, j] = (res[r, j] +) sum_i in[r, i] w[j, i] for `rows` <= ROWS rows, BLOCK_N outputs per
        program. The input `in` is x (PROLOGUE 0), RMSNorm(x) * nw (1: the statistics gather in the
        same loop and scale the sum at the end: rstd is one number per row), or SiLU(gate) * up of
        x = [gate | up], each K wide (2). MMA: tensor-core dots with the rows padded to ROWS;
        else (one row) fp32 products summed once after the loop."""
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_n = offs_n < n
        offs_r = tl.arange(0, ROWS)
        keep_r = offs_r < rows
        if MMA:
            acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        squares = tl.zeros((ROWS,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):   # K constexpr: unrolled, pipelined
            offs_k = k0 + tl.arange(0, BLOCK_K)
            keep_k = offs_k < K
            at = x + offs_r[:, None] * x_stride + offs_k[None, :]
            keep = keep_r[:, None] & keep_k[None, :]
            v = tl.load(at, mask=keep, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                squares += tl.sum(v * v, axis=1)
                v = v * tl.load(nw + offs_k, mask=keep_k, other=0.0).to(tl.float32)[None, :]
            if PROLOGUE == 2:
                up = tl.load(at + K, mask=keep, other=0.0).to(tl.float32)
                v = v / (1.0 + tl.exp(-v)) * up
            wt = tl.load(w + offs_n[:, None] * K + offs_k[None, :], mask=keep_n[:, None] & keep_k[None, :],
                         other=0.0)
            if MMA:
                if IEEE:
                    acc += tl.dot(wt, tl.trans(v.to(wt.dtype)), input_precision="ieee")
                else:
                    acc += tl.dot(wt, tl.trans(v.to(wt.dtype)))
            else:
                acc += wt.to(tl.float32) * tl.sum(v, axis=0)[None, :]   # ROWS == 1
        if MMA:
            y = acc
        else:
            y = tl.sum(acc, axis=1)[:, None]
        if PROLOGUE == 1:
            y = y / tl.sqrt(squares / K + eps)[None, :]
        at_out = offs_r[None, :] * n + offs_n[:, None]
        keep_out = keep_n[:, None] & keep_r[None, :]
        if RESIDUAL:
            y += tl.load(res + at_out, mask=keep_out, other=0.0).to(tl.float32)
        tl.store(out + at_out, y.to(out.dtype.element_ty), mask=keep_out)

    @triton.jit
    def _decode_attention_kernel(q, kc, vc, valid, out, part_acc, part_stats, attend, cap, nq, nkv, scale,
                                 chunk, HD: tl.constexpr, BLOCK_L: tl.constexpr, SPLIT: tl.constexpr):
        """One query per (row, head) over the valid ones of its `chunk` cache columns (program
        axis 2) among the first `attend`: online softmax in fp32 over blocks of BLOCK_L columns.
        Unsplit: the output. Split: the chunk's unnormalized sum, its maximum and its total, which
        `_attention_combine_kernel` merges."""
        b = tl.program_id(0)
        head = tl.program_id(1)
        split = tl.program_id(2)
        kv = head // (nq // nkv)
        offs_d = tl.arange(0, HD)
        qv = tl.load(q + (b * nq + head) * HD + offs_d).to(tl.float32) * scale
        base = (b * nkv + kv) * cap * HD
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), dtype=tl.float32)
        acc = tl.zeros((HD,), dtype=tl.float32)
        l0 = split * chunk
        end = tl.minimum(attend, l0 + chunk)
        while l0 < end:   # (a runtime bound: one compile for every attended length)
            offs_l = l0 + tl.arange(0, BLOCK_L)
            ok = tl.load(valid + b * cap + offs_l, mask=offs_l < end, other=0) != 0
            keys = tl.load(kc + base + offs_l[:, None] * HD + offs_d[None, :], mask=ok[:, None], other=0.0)
            score = tl.where(ok, tl.sum(keys.to(tl.float32) * qv[None, :], axis=1), float("-inf"))
            new_top = tl.maximum(top, tl.max(score, axis=0))
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)   # no valid column so far
            p = tl.exp(score - shift)
            scale_old = tl.exp(top - shift)
            values = tl.load(vc + base + offs_l[:, None] * HD + offs_d[None, :], mask=ok[:, None], other=0.0)
            acc = acc * scale_old + tl.sum(p[:, None] * values.to(tl.float32), axis=0)
            total = total * scale_old + tl.sum(p, axis=0)
            top = new_top
            l0 += BLOCK_L
        if SPLIT:
            at = (b * nq + head) * tl.num_programs(2) + split
            tl.store(part_acc + at * HD + offs_d, acc)
            tl.store(part_stats + 2 * at, top)
            tl.store(part_stats + 2 * at + 1, total)
        else:
            tl.store(out + (b * nq + head) * HD + offs_d, (acc / total).to(out.dtype.element_ty))

    @triton.jit
    def _attention_combine_kernel(part_acc, part_stats, out, splits, nq, HD: tl.constexpr,
                                  MAX_SPLITS: tl.constexpr):
        """Merges the chunks' partial softmax sums of one (row, head), rescaled to the largest maximum."""
        b = tl.program_id(0)
        head = tl.program_id(1)
        offs_s = tl.arange(0, MAX_SPLITS)
        keep = offs_s < splits
        at = (b * nq + head) * splits + offs_s
        top = tl.load(part_stats + 2 * at, mask=keep, other=float("-inf"))
        total = tl.load(part_stats + 2 * at + 1, mask=keep, other=0.0)
        best = tl.max(top, axis=0)
        weight = tl.where(top == float("-inf"), 0.0, tl.exp(top - best))
        offs_d = tl.arange(0, HD)
        acc = tl.load(part_acc + at[:, None] * HD + offs_d[None, :], mask=keep[:, None], other=0.0)
        result = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(out + (b * nq + head) * HD + offs_d, result.to(out.dtype.element_ty))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, rstd: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of a contiguous [rows, n] tensor; `rstd` [rows] float32, when
    given, receives each row's 1 / RMS (what a backward pass needs)."""
    rows, n = x.shape
    out = torch.empty_like(x)
    _rms_norm_kernel[(rows,)](x, weight, out, rstd if rstd is not None else out, n, eps,
                              BLOCK=triton.next_power_of_2(n), STORE_RSTD=rstd is not None)
    return out


def rope_to_cache(y, cos, sin, slot, kc, vc, nq: int, nkv: int) -> torch.Tensor:
    """One token per row. `y` [B, (nq + 2 nkv) * hd] is the fused q/k/v projection (contiguous rows);
    `cos`, `sin` [B, hd] the row's rotation (sin with rotate_half's signs: -sin on the first half);
    `kc`, `vc` [B, nkv, cap, hd] this layer's contiguous caches, row b written at column `slot[b]`
    (`slot` [B]). Returns the rotated q as [B, nq, 1, hd]."""
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
    rows = torch.arange(b, device=y.device)
    kc[rows, :, slot] = qk[:, 0, nq:]
    vc[rows, :, slot] = y[:, (nq + nkv) * hd:].view(b, nkv, hd)
    return qk[:, :, :nq].transpose(1, 2)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for a contiguous [rows, 2 * inter] tensor holding gate then up."""
    rows, inter = gu.shape[0], gu.shape[1] // 2
    out = torch.empty(rows, inter, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gu, out, inter, BLOCK=block)
    return out


LINEAR_ROWS = 16   # `linear` serves up to this many rows (the tensor-core dot's smallest width)
# attention: columns per program and per block, warps; measured (bench/tune_decode_kernels.py)
ATTENTION_CHUNK, ATTENTION_BLOCK, ATTENTION_WARPS = 128, 128, 4


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def linear_config(n: int, k: int, rows: int, gated: bool, device: torch.device) -> dict | None:
    """Launch parameters for `linear`, or None where cuBLAS (after a separate RMSNorm or SiLU*mul
    kernel) is faster. Measured on an H200 for Index-1.9B's matrices (bench/tune_decode_kernels.py,
    bench/NOTES.md): a one-token step is bound by reading weights, and a small matrix reads fastest
    with the most bytes in flight per SM, so the blocks grow as the programs per SM shrink."""
    sms = _sm_count(device)
    if n >= 32768:   # the vocabulary projection: tensor-core tiles, even for one row
        return {"BLOCK_N": 128, "BLOCK_K": 128, "MMA": True, "num_warps": 8, "num_stages": 3}
    if rows == 1:
        waves = n / 16 / sms
        if waves <= 1:      # o, down: one program per SM
            return {"BLOCK_N": 16, "BLOCK_K": 1024, "MMA": False, "num_warps": 8, "num_stages": 2}
        if waves <= 4:      # q/k/v
            return {"BLOCK_N": 16, "BLOCK_K": 512, "MMA": False, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_N": 16, "BLOCK_K": 256, "MMA": False, "num_warps": 4, "num_stages": 4}   # gate/up
    if gated or n <= 32 * sms:   # padded rows would recompute SiLU 16 times; o: too few tiles
        return None
    if n >= 8192:
        return {"BLOCK_N": 128, "BLOCK_K": 128, "MMA": True, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_N": 64, "BLOCK_K": 256, "MMA": True, "num_warps": 4, "num_stages": 3}


def linear(x: torch.Tensor, weight: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
           gated: bool = False, residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
           config: dict | None = None) -> torch.Tensor:
    """`x @ weight.T` for at most LINEAR_ROWS contiguous rows, reading the weight once (the one-token
    decode step is bound by reading weights). With `norm`: RMSNorm(x) * norm first (`eps`); with
    `gated`: x is [gate | up] and the input is SiLU(gate) * up; with `residual`: the product is added
    into `residual` in place and returned. `out_dtype` (default x's) lets the head write fp32 logits.
    `config` overrides `linear_config` (which may choose cuBLAS)."""
    rows, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    assert rows <= LINEAR_ROWS and x.stride(1) == 1 and weight.is_contiguous()
    assert x.shape[1] == (2 * k if gated else k)
    c = dict(config or linear_config(n, k, rows, gated, x.device) or {})
    if not c:
        inp = rms_norm(x, norm, eps) if norm is not None else silu_mul(x) if gated else x
        if residual is not None:
            return residual.addmm_(inp, weight.t())
        return (inp @ weight.t()).to(out_dtype or x.dtype)
    if residual is not None:
        assert residual.is_contiguous() and residual.shape == (rows, n)
        out = residual
    else:
        out = torch.empty(rows, n, dtype=out_dtype or x.dtype, device=x.device)
    mma = c.pop("MMA")
    prologue = 1 if norm is not None else 2 if gated else 0
    _linear_kernel[(triton.cdiv(n, c["BLOCK_N"]),)](
        x, weight, out, out, norm if norm is not None else weight, rows, n, x.stride(0), eps, K=k,
        PROLOGUE=prologue, RESIDUAL=residual is not None, ROWS=LINEAR_ROWS if mma else 1, MMA=mma,
        IEEE=weight.dtype == torch.float32, **c)
    return out


def attention_wins(rows: int, attend: int) -> bool:
    """Whether `decode_attention` beats SDPA here. Measured on an H200 (bench/NOTES.md): at one row
    it takes 4.1-10.4 us against SDPA's 5.2-11.9 for 128-2,048 columns; at 16 rows only up to 128
    columns (8.2 against 9.3 us), beyond which SDPA's tiling wins."""
    return rows * triton.cdiv(attend, ATTENTION_CHUNK) <= 16


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, valid: torch.Tensor,
                     attend: int, scale: float) -> torch.Tensor:
    """One query per row: `q` [B, nq, 1, hd], caches [B, nkv, cap, hd] (contiguous), `valid` [B, cap]
    bool, attention over the first `attend` columns. Returns [B, nq * hd] (the o projection's input).
    Up to ATTENTION_CHUNK columns: one program per (row, head). Longer: one per chunk of them too
    (a row's 16 heads alone would leave most SMs idle), merged by a second kernel."""
    b, nq, hd = q.shape[0], q.shape[1], q.shape[-1]
    nkv, cap = kc.shape[1], kc.shape[2]
    out = torch.empty(b, nq * hd, dtype=q.dtype, device=q.device)
    splits = triton.cdiv(attend, ATTENTION_CHUNK)
    part_acc = torch.empty(b * nq * splits, hd, dtype=torch.float32, device=q.device) if splits > 1 else out
    part_stats = torch.empty(b * nq * splits, 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    _decode_attention_kernel[(b, nq, splits)](q, kc, vc, valid, out, part_acc, part_stats, attend, cap, nq, nkv,
                                              scale, ATTENTION_CHUNK, HD=hd, BLOCK_L=ATTENTION_BLOCK,
                                              SPLIT=splits > 1, num_warps=ATTENTION_WARPS)
    if splits > 1:
        _attention_combine_kernel[(b, nq)](part_acc, part_stats, out, splits, nq, HD=hd,
                                           MAX_SPLITS=triton.next_power_of_2(splits))
    return out
