"""The LoRA updates of a fused projection on a GPU, in Triton: dropout on the adapters' input fused
with the A product, and every B product added into the base output in place in one launch.

    y = x @ W.T                       (the base GEMM, outside)
    y[:, columns_i] += (dropout_i(x) @ A_i.T) @ B_i.T    for each adapter i of the projection

What torch does for it, per adapter: a dropped copy of x and its byte mask written and kept for
backward, two GEMMs, an add; in backward the mask applied again, two more GEMMs, a sum over the
adapters. Here:
  - the keep flags are never stored: they come from Philox counters keyed by the pass's seed, the
    adapter's salt and the element's index, so backward (and a checkpointed recompute) draws the
    same flags again. One Philox call gives eight 16-bit uniforms (the dropout probability is
    rounded to 1/65536: 0.1 drops 0.100006, and the kept elements are scaled by the realised
    1 / (1 - p)); drawing a 32-bit uniform per element made the kernels RNG-bound (H200: 12 ms
    of a 37 ms pass). The pass's seed is drawn from torch's CUDA generator inside the
    pass, so captured replays get new masks and a resumed run's generator state gives the same ones;
  - `_a_forward`: u_i = (x * keep_i) @ A_i.T / (1 - p), one program per block of rows, adapter and
    span of the input, each adding its span's share into one float32 u with atomic adds;
  - `_b_forward`: every adapter's u_i @ B_i.T added into its columns of the base output;
  - backward: `_b_grad` reads each tile of dy once for both du_i = dy[:, columns_i] @ B_i and
    dB_i = dy[:, columns_i].T @ u_i (as cuBLAS's r-wide GEMMs they left most of the GPU idle),
    `_a_grad`: dA_i = du_i.T @ (x * keep_i) / (1 - p), and `_x_grad`: dx = sum_i ((du_i @ A_i) *
    keep_i) / (1 - p). `_b_grad`'s programs add their spans' shares of du into one float32 du with
    atomic adds; dB's and dA's sums over blocks of rows are added by one small kernel each.
    (Partial sums per span, added by each reader as it read them, cost the readers more than the
    sums: every column block of `_b_forward`, `_a_grad` and `_x_grad` read all of them again. The
    atomic adds make the order of u's and du's float32 sums vary between runs, as flash
    attention's dq sums do.)
Only x, u and the seed are kept for backward (the dropped copies and masks were n x 3 bytes per
element of x).

The semantics are peft's (each adapter its own inverted dropout of the input, keep probability
1 - p); the random numbers are not torch's, so a run's masks differ from the plain path's.
tests/test_kernels.py checks the kernels against float64 torch given the same keep flags
(`keep_flags` writes them out), under Triton's interpreter; tests/test_gpu.py compiled.
"""

from __future__ import annotations

import torch

from chatlora.models.triton_kernels import tl, triton

SEED_STRIDE = 2 ** 16   # salts per pass seed: layers x projection groups x adapters, each its own stream
ROUNDS = 7              # Philox-4x32 rounds: 7 is Crush-resistant (Salmon et al. 2011), 10 Triton's default
LEVELS = 2 ** 16        # each keep flag compares a 16-bit uniform with the dropout probability in 1/65536ths
ROWS, COLUMNS = 16, 64  # `keep_flags`' tile (the flags never depend on a kernel's tiling)
MAX_ADAPTERS = 4        # adapters per projection the B kernels take (q/k/v: 3)
SUM_BLOCK = 256
# Each kernel's launch: BT rows and BK input (BC output) columns per tile; SPAN: input columns per
# program of the A product (its sums split over the input), output columns per program of `_b_grad`;
# SPLIT: rows per program of dA's sums; num_warps. bench/lora_kernel_tiles.py times alternatives.
LAUNCH = {
    "a_forward": dict(BT=16, BK=64, SPAN=512, num_warps=4),
    "a_grad": dict(BT=16, BK=64, SPLIT=128, num_warps=4),
    "x_grad": dict(BT=16, BK=64, num_warps=4),
    "b_forward": dict(BT=64, BC=64, num_warps=4),
    "b_grad": dict(BT=32, BC=64, SPAN=512, num_warps=4),
}

if triton is not None:

    @triton.jit
    def _keep(seed_ptr, salt, rows, first_col, D, threshold, BT: tl.constexpr, BK: tl.constexpr):
        """Keep flags [BT, BK] of x's elements (rows, first_col + arange(BK)), first_col a multiple of
        8. One Philox call per 8 consecutive elements of a row (counter (row * D + col) // 8): its
        four words give eight 16-bit uniforms, kept where >= threshold. The flags depend on the
        element alone, never on the tiling, so every kernel (and `keep_flags`) draws the same ones."""
        seed = tl.load(seed_ptr).to(tl.int64) * 65536 + salt   # SEED_STRIDE
        groups = first_col // 8 + tl.arange(0, BK // 8)
        w0, w1, w2, w3 = tl.randint4x(seed, rows[:, None] * (D // 8) + groups[None, :], 7)   # ROUNDS
        low = tl.join(tl.join(w0 & 0xFFFF, w0 >> 16), tl.join(w1 & 0xFFFF, w1 >> 16))
        high = tl.join(tl.join(w2 & 0xFFFF, w2 >> 16), tl.join(w3 & 0xFFFF, w3 >> 16))
        return tl.reshape(tl.join(low, high), (BT, BK)) >= threshold

    @triton.jit
    def _a_forward(x, a, seed_ptr, salt, u_sum, T, D, R, threshold, scale,
                   RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SPAN: tl.constexpr, DROP: tl.constexpr):
        """u_sum[i, rows] += (x * keep_i) @ A_i.T * scale over input columns [s * SPAN, (s + 1) * SPAN),
        for this program's rows, adapter i and span s (one program per row block alone was latency-bound:
        a down projection's 5,632 inputs are 88 steps in a row)."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        i, s = tl.program_id(1), tl.program_id(2)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BT, RP), dtype=tl.float32)
        for k in range(0, SPAN, BK):
            k0 = s * SPAN + k
            cols = k0 + tl.arange(0, BK)
            xt = tl.load(x + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < D),
                         other=0.0)
            if DROP:
                xt = tl.where(_keep(seed_ptr, salt + i, rows, k0, D, threshold, BT, BK), xt, 0.0)
            at = tl.load(a + (i * R + ranks[None, :]) * D + cols[:, None],
                         mask=(ranks[None, :] < R) & (cols[:, None] < D), other=0.0)
            acc += tl.dot(xt, at, input_precision="ieee")
        tl.atomic_add(u_sum + (i * T + rows[:, None]) * R + ranks[None, :], acc * scale,
                      mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def _rank_tile(values, i, rows, ranks, T, R, dtype):
        """[BT, RP] of adapter i's rows of `values` [n, T, R] (u's or du's float32 sums), in `dtype`."""
        return tl.load(values + (i * T + rows[:, None]) * R + ranks[None, :],
                       mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0).to(dtype)

    @triton.jit
    def _a_grad(x, du, seed_ptr, salt, partial, T, D, R, threshold, scale,
                RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, DROP: tl.constexpr):
        """partial[s, i] = du_i.T @ (x * keep_i) * scale over this program's SPLIT rows and BK columns
        (du: float32 [n, T, R])."""
        first_col = tl.program_id(0) * BK
        cols = first_col + tl.arange(0, BK)
        split, i, n = tl.program_id(1), tl.program_id(2), tl.num_programs(2)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for t0 in range(0, SPLIT, BT):
            rows = split * SPLIT + t0 + tl.arange(0, BT)
            xt = tl.load(x + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < D),
                         other=0.0)
            if DROP:
                xt = tl.where(_keep(seed_ptr, salt + i, rows, first_col, D, threshold, BT, BK), xt, 0.0)
            dut = _rank_tile(du, i, rows, ranks, T, R, xt.dtype)
            acc += tl.dot(tl.trans(dut), xt, input_precision="ieee")
        tl.store(partial + ((split * n + i) * R + ranks[:, None]) * D + cols[None, :], acc * scale,
                 mask=(ranks[:, None] < R) & (cols[None, :] < D))

    @triton.jit
    def _x_grad(dx, du, a, seed_ptr, salt, T, D, R, threshold, scale,
                N: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DROP: tl.constexpr,
                ACCUMULATE: tl.constexpr):
        """dx (ACCUMULATE: dx +) = sum_i ((du_i @ A_i) * keep_i) * scale, for this program's rows and
        input columns (du: float32 [n, T, R])."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        first_col = tl.program_id(1) * BK
        cols = first_col + tl.arange(0, BK)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BT, BK), dtype=tl.float32)
        for i in tl.static_range(N):
            at = tl.load(a + (i * R + ranks[:, None]) * D + cols[None, :],
                         mask=(ranks[:, None] < R) & (cols[None, :] < D), other=0.0)
            dut = _rank_tile(du, i, rows, ranks, T, R, at.dtype)
            part = tl.dot(dut, at, input_precision="ieee")
            if DROP:
                part = tl.where(_keep(seed_ptr, salt + i, rows, first_col, D, threshold, BT, BK), part, 0.0)
            acc += part
        at, inside = dx + rows[:, None] * D + cols[None, :], (rows[:, None] < T) & (cols[None, :] < D)
        acc = acc * scale
        if ACCUMULATE:   # the base product's dx, rounded once with the adapters' share
            acc += tl.load(at, mask=inside, other=0.0).to(tl.float32)
        tl.store(at, acc.to(dx.dtype.element_ty), mask=inside)

    @triton.jit
    def _adapter_columns(C0, C1, C2, C3, O0, O1, O2, O3):
        """Adapter `program_id(2)`'s first column in the projection's output, its width, and its first
        row in the adapters' B weights stacked [sum of widths, r]."""
        i = tl.program_id(2)
        start = tl.where(i == 0, C0, tl.where(i == 1, C1, tl.where(i == 2, C2, C3)))
        width = tl.where(i == 0, O0, tl.where(i == 1, O1, tl.where(i == 2, O2, O3)))
        first = tl.where(i > 0, O0, 0) + tl.where(i > 1, O1, 0) + tl.where(i > 2, O2, 0)
        return i, start, width, first

    @triton.jit
    def _b_forward(y, u_sum, u, b, residual, T, R, ldy, C0, C1, C2, C3, O0, O1, O2, O3,
                   RP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, RESIDUAL: tl.constexpr):
        """y[rows, start_i + local] += u_i[rows] @ B_i[local].T (+ residual there, after the update):
        every adapter's B product in one launch, added where the base GEMM wrote (one read and write
        of y per projection). u_i is `_a_forward`'s float32 sum;
        the programs of the first column block write it to `u` for backward (no launch of its own)."""
        i, start, width, first = _adapter_columns(C0, C1, C2, C3, O0, O1, O2, O3)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        local = tl.program_id(1) * BC + tl.arange(0, BC)
        ranks = tl.arange(0, RP)
        ut = _rank_tile(u_sum, i, rows, ranks, T, R, u.dtype.element_ty)
        if tl.program_id(1) == 0:
            tl.store(u + (i * T + rows[:, None]) * R + ranks[None, :], ut,
                     mask=(rows[:, None] < T) & (ranks[None, :] < R))
        bt = tl.load(b + (first + local[None, :]) * R + ranks[:, None],
                     mask=(local[None, :] < width) & (ranks[:, None] < R), other=0.0)
        inside = (rows[:, None] < T) & (local[None, :] < width)
        at = y + rows[:, None] * ldy + start + local[None, :]
        out = tl.load(at, mask=inside, other=0.0).to(tl.float32) + tl.dot(ut, bt, input_precision="ieee")
        if RESIDUAL:   # peft's roundings: the projection's output in y's dtype, then the layer's residual add
            out = out.to(y.dtype.element_ty).to(tl.float32) + tl.load(
                residual + rows[:, None] * ldy + start + local[None, :], mask=inside, other=0.0)
        tl.store(at, out.to(y.dtype.element_ty), mask=inside)

    @triton.jit
    def _b_grad(dy, u, b, du_sum, db_partial, T, R, ldy, total, C0, C1, C2, C3, O0, O1, O2, O3,
                RP: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, SPAN: tl.constexpr):
        """From one read of each dy tile, over this program's rows and SPAN output columns of adapter i:
        du_sum[i, rows] += dy_i[rows, span c] @ B_i[span c] (float32, atomic adds) and
        db_partial[t, first_i + local] = dy_i[rows, local].T @ u_i[rows] (summed over row
        blocks t after). cuBLAS ran these as 2 GEMMs per adapter whose r = 8 wide outputs left most
        of the GPU idle."""
        i, start, width, first = _adapter_columns(C0, C1, C2, C3, O0, O1, O2, O3)
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        ranks = tl.arange(0, RP)
        ut = tl.load(u + (i * T + rows[:, None]) * R + ranks[None, :],
                     mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
        du = tl.zeros((BT, RP), dtype=tl.float32)
        for c in range(0, SPAN, BC):
            local = tl.program_id(1) * SPAN + c + tl.arange(0, BC)
            dyt = tl.load(dy + rows[:, None] * ldy + start + local[None, :],
                          mask=(rows[:, None] < T) & (local[None, :] < width), other=0.0)
            bt = tl.load(b + (first + local[:, None]) * R + ranks[None, :],
                         mask=(local[:, None] < width) & (ranks[None, :] < R), other=0.0)
            du += tl.dot(dyt, bt, input_precision="ieee")
            tl.store(db_partial + (tl.program_id(0) * total + first + local[:, None]) * R + ranks[None, :],
                     tl.dot(tl.trans(dyt), ut, input_precision="ieee"),
                     mask=(local[:, None] < width) & (ranks[None, :] < R))
        tl.atomic_add(du_sum + (i * T + rows[:, None]) * R + ranks[None, :], du,
                      mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def _sum_partials(partial, out, S, M, BLOCK: tl.constexpr):
        """out[m] = sum over s of partial[s, m] (float32), in out's dtype: one kernel for a split sum."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in range(0, S):
            acc += tl.load(partial + s * M + offsets, mask=offsets < M, other=0.0)
        tl.store(out + offsets, acc.to(out.dtype.element_ty), mask=offsets < M)

    @triton.jit
    def _keep_flags_kernel(seed_ptr, salt, out, T, D, threshold, BT: tl.constexpr, BK: tl.constexpr):
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        first_col = tl.program_id(1) * BK
        cols = first_col + tl.arange(0, BK)
        keep = _keep(seed_ptr, salt, rows, first_col, D, threshold, BT, BK)
        tl.store(out + rows[:, None] * D + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < T) & (cols[None, :] < D))


def dropout_threshold(p: float) -> int:
    """The dropout probability in 1/65536ths, as the kernels compare it (0.1 -> 6554: 0.100006)."""
    return round(p * LEVELS)


def keep_scale(p: float) -> float:
    """1 / the keep probability the kernels realise: inverted dropout keeps the expectation exact."""
    return LEVELS / (LEVELS - dropout_threshold(p))


def covers(width: int) -> bool:
    """Whether the kernels take an input this wide (8 elements per Philox call)."""
    return width % 8 == 0


def _padded_rank(r: int) -> int:
    return max(16, triton.next_power_of_2(r))   # tl.dot's smallest operand side


def _summed(partial: torch.Tensor, dtype) -> torch.Tensor:
    """partial [S, ...] summed over its first dimension in float32, in `dtype`."""
    out = torch.empty(partial.shape[1:], dtype=dtype, device=partial.device)
    m = out.numel()
    _sum_partials[(triton.cdiv(m, SUM_BLOCK),)](partial, out, partial.shape[0], m, BLOCK=SUM_BLOCK)
    return out


def a_product(x, a, seed, salt: int, p: float) -> torch.Tensor:
    """u [n, T, r] (float32) = (x * keep_i) @ a[i].T * keep_scale(p) for x [T, d] and a [n, r, d]
    (p = 0: no dropout)."""
    t, d = x.shape
    n, r, _ = a.shape
    launch = LAUNCH["a_forward"]
    u = torch.zeros(n, t, r, dtype=torch.float32, device=x.device)
    _a_forward[(triton.cdiv(t, launch["BT"]), n, triton.cdiv(d, launch["SPAN"]))](
        x, a, seed, salt, u, t, d, r, dropout_threshold(p), keep_scale(p), RP=_padded_rank(r), DROP=p > 0, **launch)
    return u


def a_gradient(x, du, seed, salt: int, p: float) -> torch.Tensor:
    """dA [n, r, d] (x's dtype) = du[i].T @ (x * keep_i) * keep_scale(p), du float32 [n, T, r]
    (`b_gradients`)."""
    t, d = x.shape
    n, _, r = du.shape
    launch = LAUNCH["a_grad"]
    splits = triton.cdiv(t, launch["SPLIT"])
    partial = torch.empty(splits, n, r, d, dtype=torch.float32, device=x.device)
    _a_grad[(triton.cdiv(d, launch["BK"]), splits, n)](x, du, seed, salt, partial, t, d, r, dropout_threshold(p),
                                                       keep_scale(p), RP=_padded_rank(r), DROP=p > 0, **launch)
    return _summed(partial, x.dtype)


def x_gradient(du, a, seed, salt: int, p: float, into: torch.Tensor | None = None) -> torch.Tensor:
    """dx [T, d] = sum_i ((du[i] @ a[i]) * keep_i) * keep_scale(p) (du as `a_gradient` takes it);
    added into `into` (a contiguous [T, d] in a's dtype, returned) where given."""
    n, t, r = du.shape
    d = a.shape[2]
    dx = torch.empty(t, d, dtype=a.dtype, device=a.device) if into is None else into
    launch = LAUNCH["x_grad"]
    _x_grad[(triton.cdiv(t, launch["BT"]), triton.cdiv(d, launch["BK"]))](
        dx, du, a, seed, salt, t, d, r, dropout_threshold(p), keep_scale(p), N=n, RP=_padded_rank(r),
        DROP=p > 0, ACCUMULATE=into is not None, **launch)
    return dx


def _column_arguments(columns, widths) -> list[int]:
    """The B kernels' C0..C3, O0..O3: each adapter's first output column and width (unused ones 0)."""
    pad = [0] * (MAX_ADAPTERS - len(columns))
    return [*columns, *pad, *widths, *pad]


def b_product_add(y, u_sum, b, columns, widths, residual=None) -> torch.Tensor:
    """y[:, columns[i]:columns[i] + widths[i]] += u[i] @ b_i.T in place, b_i the rows of b [sum of
    widths, r] after the earlier adapters', u `a_product`'s float32 [n, T, r]; then + `residual`
    (y's shape and strides) there. Returns u in b's dtype."""
    n, t, r = u_sum.shape
    u = torch.empty(n, t, r, dtype=b.dtype, device=b.device)
    launch = LAUNCH["b_forward"]
    grid = (triton.cdiv(t, launch["BT"]), triton.cdiv(max(widths), launch["BC"]), n)
    _b_forward[grid](y, u_sum, u, b, y if residual is None else residual, t, r, y.stride(0),
                     *_column_arguments(columns, widths), RP=_padded_rank(r), RESIDUAL=residual is not None, **launch)
    return u


def b_gradients(dy, u, b, columns, widths) -> tuple[torch.Tensor, torch.Tensor]:
    """(du float32 [n, T, r], db [sum of widths, r]) of `b_product_add`, for the output gradient dy."""
    n, t, r = u.shape
    launch = LAUNCH["b_grad"]
    row_blocks, spans = triton.cdiv(t, launch["BT"]), triton.cdiv(max(widths), launch["SPAN"])
    du = torch.zeros(n, t, r, dtype=torch.float32, device=u.device)
    db_partial = torch.empty(row_blocks, b.shape[0], r, dtype=torch.float32, device=u.device)
    _b_grad[(row_blocks, spans, n)](dy, u, b, du, db_partial, t, r, dy.stride(0), b.shape[0],
                                    *_column_arguments(columns, widths), RP=_padded_rank(r), **launch)
    return du, _summed(db_partial, b.dtype)


def keep_flags(seed, salt: int, shape, p: float) -> torch.Tensor:
    """The keep flags (bool, `shape` = [T, d]) the kernels draw for `seed` and `salt` (tests)."""
    t, d = shape
    out = torch.empty(t, d, dtype=torch.int8, device=seed.device)
    _keep_flags_kernel[(triton.cdiv(t, ROWS), triton.cdiv(d, COLUMNS))](seed, salt, out, t, d, dropout_threshold(p),
                                                                       BT=ROWS, BK=COLUMNS)
    return out.bool()


class _AdaptedUpdate(torch.autograd.Function):
    """y += each adapter's LoRA update of x, y the base output (updated in place and returned), or
    where y is None, x @ weight.T computed here: backward then computes the base's dx too and adds
    the adapters' share into it in `_x_grad`, where autograd would add two dx tensors."""

    @staticmethod
    def forward(ctx, y, x, weight, a, b, residual, seed, salt: int, p: float, columns: tuple, widths: tuple):
        x = x.contiguous()
        if y is None:
            y = x @ weight.t()
        else:
            ctx.mark_dirty(y)
        u = b_product_add(y, a_product(x, a, seed, salt, p), b, columns, widths, residual)
        ctx.save_for_backward(x, weight, a, b, seed, u)
        ctx.settings = (salt, p, columns, widths)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, a, b, seed, u = ctx.saved_tensors
        salt, p, columns, widths = ctx.settings
        dy = dy if dy.stride(1) == 1 else dy.contiguous()
        du, db = b_gradients(dy, u, b, columns, widths)
        da = a_gradient(x, du, seed, salt, p).to(a.dtype)
        dx = x_gradient(du, a, seed, salt, p, into=None if weight is None else dy @ weight)
        dy_base = dy if ctx.needs_input_grad[0] else None
        return dy_base, dx, None, da, db, dy if ctx.needs_input_grad[5] else None, None, None, None, None, None


def adapted_update(y, x, a, b, columns, widths, seed, salt: int, p: float, residual=None,
                   weight=None) -> torch.Tensor:
    """`y` [T, out] (the base output x @ W.T; updated in place; None: computed here from the 16-bit
    `weight` [out, d], which backward's dx then includes) plus, for each adapter i, the LoRA
    update dropout_i(x) @ a[i].T @ b_i.T in columns columns[i]:columns[i] + widths[i], where b_i
    are the widths[i] rows of b [sum of widths, r] after the earlier adapters'; then `residual`
    ([T, out], added in those columns to the updated output rounded to y's dtype, as peft's
    output meets the decoder's residual add), if given.
    x [T, d], a [n, r, d] (contiguous, n <= MAX_ADAPTERS); seed: the pass's (int64 [1], on x's
    device); salt: this projection's adapters' first stream (each adapter's is salt + i, below
    SEED_STRIDE)."""
    if (y is None) == (weight is None):
        raise ValueError("the LoRA kernels take the base output or the base weight, one of them")
    if y is not None and y.stride(1) != 1:
        raise ValueError("the LoRA kernels add into an output whose rows are contiguous")
    if len(columns) > MAX_ADAPTERS:
        raise ValueError(f"the LoRA kernels take at most {MAX_ADAPTERS} adapters per projection, not {len(columns)}")
    shape, strides = (y.shape, y.stride()) if y is not None else ((x.shape[0], weight.shape[0]), (weight.shape[0], 1))
    if residual is not None and (tuple(residual.shape) != tuple(shape) or residual.stride() != strides):
        raise ValueError("the residual must have the output's shape and strides")
    return _AdaptedUpdate.apply(y, x, weight, a, b.contiguous(), residual, seed, salt, p, tuple(columns),
                                tuple(widths))
