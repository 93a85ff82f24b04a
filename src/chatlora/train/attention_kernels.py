"""Causal attention over the short sequences of a packed row, forward and backward, in Triton.

Why not torch's flash kernel: the self-llm examples are ~60 tokens, and the flash kernel works in
128-row tiles per sequence, sized by the longest sequence a row could hold (the whole row), so most
of its programs exit at once and the rest are half empty; its backward adds two helper kernels
(dO . O and dq's float32 accumulator converted) and the q/k gradients come back as two slices of
the RoPE kernel's output, each a zero-filled full-width tensor (bench/NOTES.md: 2.9 ms of a 21.9 ms
pass for a few tens of GFLOP). Here:
  - every sequence of the row is cut into blocks of BM query rows (BN key rows for the key
    gradients); program i finds its sequence and block from the row's `starts` (`_locate`), so the
    grid is the most blocks a row of this shape can have, and no program waits on another's tile;
  - the forward keeps each row's log-sum-exp (base 2); the backward is two kernels without atomics:
    dq per query block (it also writes dO . O for the second), dk and dv per key block and K/V head,
    summing the grouped query heads in the program;
  - q and k come in as one [T, heads + kv_heads, head_dim] tensor (the RoPE kernel's output) and
    their gradient goes out as one.
Each computes in fp32 (its products in the inputs' dtype, as the flash kernel does) and rounds its
outputs once. tests/test_kernels.py compares it, forward and backward, with float64 torch under
Triton's interpreter; tests/test_gpu.py compiled, and a bf16 pass through it against the float32
pass (as close as the mask path's, as torch's flash kernel is held to). On the H200 the three
kernels take 1.55 ms of that pass (now 19.9 ms), and the self-llm job trains 6.5% faster than with
torch's flash kernel (bench/NOTES.md, 2026-12-01).

Where it runs: models/triton_kernels.available, and `fits` says for which shapes.
"""

from __future__ import annotations

import torch

from chatlora.models.triton_kernels import tl, triton

LOG2E = 1.4426950408889634   # the kernels work in powers of 2: exp(x) = exp2(x * LOG2E)
# Query rows (BM) and key rows (BN) per program, and warps: the self-llm examples (~60 tokens) fill
# one query block each. BN 32 ran 2.6% faster than 64 inside the captured pass on the H200
# (bench/pass_sweep.py, 2026-12-01). Tests shrink the blocks to cross block boundaries.
LAUNCH = dict(BM=64, BN=32, num_warps=4)
# Tried in order where a GPU's shared memory per block cannot hold a kernel's tiles at LAUNCH (an
# H200 block has 227 KiB; consumer GPUs about 100, a T4 64). A launch too large for one kernel is
# remembered, per device and shape, so later passes start from one that fits.
SMALLER_LAUNCHES = (dict(BM=32, BN=32, num_warps=4), dict(BM=16, BN=16, num_warps=4))
too_large: set[tuple] = set()   # (kernel, device, dtype, heads of q/k, head size, launch) that did not fit


def fits(head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the kernels take this shape: a power-of-two head size the dot products accept, at most
    128 (checked on the H200 at 64 and 128; at 256 the dk/dv kernel's tiles would hold as many
    elements as BM 128 / BN 64 at 128, which outgrew a block's shared memory there), larger heads
    keeping torch's flash kernel; on a GPU half precision only (float32 products there would be TF32,
    coarser than the torch path's)."""
    shape_ok = head_dim >= 16 and head_dim & (head_dim - 1) == 0 and head_dim <= 128
    return shape_ok and (device.type != "cuda" or dtype in (torch.bfloat16, torch.float16))


if triton is not None:

    @triton.jit
    def _locate(starts, slots, pid, BLOCK: tl.constexpr, SLOTS: tl.constexpr):
        """Program `pid`'s sequence (its first row and end) and block, each sequence between
        consecutive `starts` cut into BLOCK-row blocks; a program past the last block gets an empty
        sequence (lo == hi), so every load and store it makes is masked off."""
        i = tl.arange(0, SLOTS)
        lo = tl.load(starts + i, mask=i < slots, other=0)
        hi = tl.load(starts + i + 1, mask=i < slots, other=0)
        blocks = (hi - lo + BLOCK - 1) // BLOCK
        before = tl.cumsum(blocks, 0) - blocks
        mine = (before <= pid) & (pid < before + blocks)
        seq_lo = tl.sum(tl.where(mine, lo, 0), 0)
        seq_hi = tl.sum(tl.where(mine, hi, 0), 0)
        block = pid - tl.sum(tl.where(mine, before, 0), 0)
        return seq_lo, seq_hi, block

    @triton.jit
    def _allowed(rows, cols, seq_hi, left, WINDOW: tl.constexpr):
        """Causal, within the sequence, and (WINDOW) no further back than `left` keys."""
        ok = (cols[None, :] <= rows[:, None]) & (rows[:, None] < seq_hi) & (cols[None, :] < seq_hi)
        if WINDOW:
            ok = ok & (cols[None, :] >= rows[:, None] - left)
        return ok

    @triton.jit
    def _query_block(starts, slots, pid, left, BM: tl.constexpr, SLOTS: tl.constexpr, WINDOW: tl.constexpr):
        """Program `pid`'s query rows (and which of them are real), its sequence's end, and the keys
        they see: from `first` (the sequence's start, or the window's) to `last` (exclusive)."""
        seq_lo, seq_hi, block = _locate(starts, slots, pid, BM, SLOTS)
        rows = seq_lo + block * BM + tl.arange(0, BM)
        first = seq_lo
        if WINDOW:
            first = tl.maximum(seq_lo, seq_lo + block * BM - left)
        return rows, rows < seq_hi, seq_hi, first, tl.minimum(seq_lo + (block + 1) * BM, seq_hi)

    @triton.jit
    def _tile(base, rows, ok, stride, head, D: tl.constexpr):
        """Rows `rows` of one head (D wide) of a [T, heads, D] tensor with row stride `stride`; 0 where not ok."""
        return tl.load(base + rows[:, None] * stride + head * D + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)

    @triton.jit
    def _forward_kernel(qk, v, out, lse, starts, slots, scale_log2, left, s_qk, s_v, s_out, heads,
                        GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        SLOTS: tl.constexpr, WINDOW: tl.constexpr):
        """out = softmax(q k^T * scale) v for one query block and head, online over key blocks (base 2);
        lse: each row's log2-sum-exp2 of its scaled scores."""
        pid, h = tl.program_id(0), tl.program_id(1)
        rows, row_ok, seq_hi, first, last = _query_block(starts, slots, pid, left, BM, SLOTS, WINDOW)
        q = _tile(qk, rows, row_ok, s_qk, h, D)
        m = tl.full((BM,), -1.0e30, tl.float32)    # finite: a row with no keys keeps p = 0, not NaN
        total = tl.zeros((BM,), tl.float32)
        acc = tl.zeros((BM, D), tl.float32)
        for start in range(first, last, BN):
            cols = start + tl.arange(0, BN)
            k = _tile(qk, cols, cols < last, s_qk, heads + h // GROUP, D)
            x = tl.where(_allowed(rows, cols, seq_hi, left, WINDOW), tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            p = tl.exp2(x - m_new[:, None])
            shrink = tl.exp2(m - m_new)
            total = total * shrink + tl.sum(p, 1)
            vals = _tile(v, cols, cols < last, s_v, h // GROUP, D)
            acc = acc * shrink[:, None] + tl.dot(p.to(vals.dtype), vals)
            m = m_new
        safe = tl.where(total > 0, total, 1.0)
        d = tl.arange(0, D)
        tl.store(out + rows[:, None] * s_out + h * D + d[None, :], (acc / safe[:, None]).to(out.dtype.element_ty),
                 mask=row_ok[:, None])
        tl.store(lse + rows * heads + h, m + tl.log2(safe), mask=row_ok)

    @triton.jit
    def _dq_kernel(qk, v, out, dout, lse, delta, dqk, starts, slots, scale, scale_log2, left, s_qk, s_v, s_out,
                   heads, GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                   SLOTS: tl.constexpr, WINDOW: tl.constexpr):
        """dq = scale * sum_k p (dp - delta) k for one query block and head; writes delta = dO . O."""
        pid, h = tl.program_id(0), tl.program_id(1)
        rows, row_ok, seq_hi, first, last = _query_block(starts, slots, pid, left, BM, SLOTS, WINDOW)
        q = _tile(qk, rows, row_ok, s_qk, h, D)
        do = _tile(dout, rows, row_ok, s_out, h, D)
        dlt = tl.sum(do.to(tl.float32) * _tile(out, rows, row_ok, s_out, h, D).to(tl.float32), 1)
        tl.store(delta + rows * heads + h, dlt, mask=row_ok)
        lg = tl.load(lse + rows * heads + h, mask=row_ok, other=0.0)
        acc = tl.zeros((BM, D), tl.float32)
        for start in range(first, last, BN):
            cols = start + tl.arange(0, BN)
            k = _tile(qk, cols, cols < last, s_qk, heads + h // GROUP, D)
            vals = _tile(v, cols, cols < last, s_v, h // GROUP, D)
            x = tl.dot(q, tl.trans(k)) * scale_log2
            p = tl.where(_allowed(rows, cols, seq_hi, left, WINDOW), tl.exp2(x - lg[:, None]), 0.0)
            ds = p * (tl.dot(do, tl.trans(vals)) - dlt[:, None])
            acc += tl.dot(ds.to(k.dtype), k)
        d = tl.arange(0, D)
        tl.store(dqk + rows[:, None] * s_qk + h * D + d[None, :], (acc * scale).to(dqk.dtype.element_ty),
                 mask=row_ok[:, None])

    @triton.jit
    def _dkv_kernel(qk, v, dout, lse, delta, dqk, dv, starts, slots, scale, scale_log2, left, s_qk, s_v, s_out,
                    heads, GROUP: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    SLOTS: tl.constexpr, WINDOW: tl.constexpr):
        """dk and dv for one key block and K/V head, over the group's query heads and every query
        block that sees these keys."""
        pid, g = tl.program_id(0), tl.program_id(1)
        seq_lo, seq_hi, block = _locate(starts, slots, pid, BN, SLOTS)
        cols = seq_lo + block * BN + tl.arange(0, BN)
        col_ok = cols < seq_hi
        k = _tile(qk, cols, col_ok, s_qk, heads + g, D)
        vals = _tile(v, cols, col_ok, s_v, g, D)
        dk = tl.zeros((BN, D), tl.float32)
        dvs = tl.zeros((BN, D), tl.float32)
        first = seq_lo + block * BN
        last = seq_hi
        if WINDOW:
            last = tl.minimum(seq_hi, seq_lo + (block + 1) * BN + left)
        for member in tl.static_range(GROUP):
            h = g * GROUP + member
            for start in range(first, last, BM):
                rows = start + tl.arange(0, BM)
                row_ok = rows < last
                q = _tile(qk, rows, row_ok, s_qk, h, D)
                do = _tile(dout, rows, row_ok, s_out, h, D)
                lg = tl.load(lse + rows * heads + h, mask=row_ok, other=0.0)
                dlt = tl.load(delta + rows * heads + h, mask=row_ok, other=0.0)
                x = tl.dot(q, tl.trans(k)) * scale_log2
                p = tl.where(_allowed(rows, cols, seq_hi, left, WINDOW), tl.exp2(x - lg[:, None]), 0.0)
                dvs += tl.dot(tl.trans(p.to(do.dtype)), do)
                ds = p * (tl.dot(do, tl.trans(vals)) - dlt[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        d = tl.arange(0, D)
        tl.store(dqk + cols[:, None] * s_qk + (heads + g) * D + d[None, :], (dk * scale).to(dqk.dtype.element_ty),
                 mask=col_ok[:, None])
        tl.store(dv + cols[:, None] * s_v + g * D + d[None, :], dvs.to(dv.dtype.element_ty), mask=col_ok[:, None])


def _launch(kernel, along: str, grid_heads: int, qk, slots: int, heads: int, left: int, *args) -> None:
    """`kernel` over the row's blocks of `along` ("BM": query rows, "BN": key rows) and `grid_heads`,
    with the first launch (LAUNCH, then SMALLER_LAUNCHES) this GPU's shared memory holds. The tiling
    does not change what a kernel computes, so the forward and backward kernels may differ in it."""
    tokens = qk.shape[0]
    shape = (kernel.__name__, str(qk.device), qk.dtype, qk.shape[1], qk.shape[2])
    fitting = [launch for launch in (LAUNCH, *SMALLER_LAUNCHES) if (*shape, tuple(launch.items())) not in too_large]
    for launch in fitting:
        constants = dict(GROUP=heads // (qk.shape[1] - heads), D=qk.shape[2], BM=launch["BM"], BN=launch["BN"],
                         SLOTS=triton.next_power_of_2(slots + 1), WINDOW=left >= 0, num_warps=launch["num_warps"])
        blocks = slots + tokens // launch[along]      # each sequence adds at most one partial block
        try:
            kernel[(blocks, grid_heads)](*args, **constants)
            return
        except triton.runtime.errors.OutOfResources:   # raised before the launch: nothing was written
            if launch is fitting[-1]:
                raise
            too_large.add((*shape, tuple(launch.items())))


class _PackedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qk, v, starts, heads: int, scale: float, left: int):
        tokens, _, dim = qk.shape
        out = torch.empty(tokens, heads, dim, dtype=qk.dtype, device=qk.device)
        lse = torch.empty(tokens, heads, dtype=torch.float32, device=qk.device)
        slots = starts.shape[0] - 1
        _launch(_forward_kernel, "BM", heads, qk, slots, heads, left, qk, v, out, lse, starts, slots,
                scale * LOG2E, left, qk.stride(0), v.stride(0), out.stride(0), heads)
        ctx.save_for_backward(qk, v, out, lse, starts)
        ctx.settings = (heads, scale, left)
        return out

    @staticmethod
    def backward(ctx, dout):
        qk, v, out, lse, starts = ctx.saved_tensors
        heads, scale, left = ctx.settings
        dout = dout.contiguous()
        dqk, dv = torch.empty_like(qk), torch.empty_like(v)
        delta = torch.empty_like(lse)
        slots = starts.shape[0] - 1
        rest = (scale, scale * LOG2E, left, qk.stride(0), v.stride(0), out.stride(0), heads)
        _launch(_dq_kernel, "BM", heads, qk, slots, heads, left,
                qk, v, out, dout, lse, delta, dqk, starts, slots, *rest)
        _launch(_dkv_kernel, "BN", qk.shape[1] - heads, qk, slots, heads, left,
                qk, v, dout, lse, delta, dqk, dv, starts, slots, *rest)
        return dqk, dv, None, None, None, None


def packed_attention(qk: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, heads: int, scale: float,
                     left: int = -1) -> torch.Tensor:
    """Causal attention within each sequence of a packed row. qk: [T, heads + kv_heads, head_dim], the
    query heads first; v: [T, kv_heads, head_dim]; `starts`: int32, where each sequence slot begins,
    the row's length last (empty slots repeat a start); `left` >= 0: each query sees at most `left`
    keys before it (a sliding window), -1: all of its sequence's. -> [T, heads, head_dim]."""
    qk, v = qk.contiguous(), v.contiguous()
    return _PackedAttention.apply(qk, v, starts, heads, scale, left)
