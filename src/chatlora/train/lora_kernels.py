"""The LoRA updates of a fused projection on a GPU: dropout on the adapters' input fused with the
A product, in Triton, and each B product added into the base output in place.

    y = x @ W.T                       (the base GEMM, outside)
    y[:, columns_i] += (dropout_i(x) @ A_i.T) @ B_i.T    for each adapter i of the projection

What torch does for it, per adapter: a dropped copy of x and its byte mask written and kept for
backward, two GEMMs, an add; in backward the mask applied again, a sum over the adapters. Here:
  - the keep flags are never stored: they come from Philox counters keyed by the pass's seed, the
    adapter's salt and the element's index, so backward (and a checkpointed recompute) draws the
    same flags again. One Philox call gives eight 16-bit uniforms (the dropout probability is
    rounded to 1/65536: 0.1 drops 0.100006, and the kept elements are scaled by the realised
    1 / (1 - p)); drawing a 32-bit uniform per element made the kernels RNG-bound (H200: 12 ms
    of a 37 ms pass). The pass's seed is drawn from torch's CUDA generator inside the
    pass, so captured replays get new masks and a resumed run's generator state gives the same ones;
  - `_a_forward`: u_i = (x * keep_i) @ A_i.T / (1 - p), one program per block of rows and adapter;
  - the B products as in-place GEMMs into the base output's columns (cuBLAS adds them: no add kernel);
  - backward: du_i = dy[:, columns_i] @ B_i and dB_i = dy[:, columns_i].T @ u_i as GEMMs,
    `_a_grad`: dA_i = du_i.T @ (x * keep_i) / (1 - p) (float32 sums over blocks of rows, added
    after), and `_x_grad`: dx = sum_i ((du_i @ A_i) * keep_i) / (1 - p).
Only x, u and the seed are kept for backward (the dropped copies and masks were n x 3 bytes per
element of x).

The semantics are peft's (each adapter its own inverted dropout of the input, keep probability
1 - p); the random numbers are not torch's, so a run's masks differ from the plain path's.
tests/test_kernels.py checks the three kernels against float64 torch given the same keep flags
(`keep_flags` writes them out), under Triton's interpreter; tests/test_gpu.py compiled.
"""

from __future__ import annotations

import torch

from chatlora.models.triton_kernels import tl, triton

SEED_STRIDE = 2 ** 16   # salts per pass seed: layers x projection groups x adapters, each its own stream
ROUNDS = 7              # Philox-4x32 rounds: 7 is Crush-resistant (Salmon et al. 2011), 10 Triton's default
LEVELS = 2 ** 16        # each keep flag compares a 16-bit uniform with the dropout probability in 1/65536ths
ROWS, COLUMNS, ROW_SPLIT = 16, 64, 128   # tile rows and input columns; rows per program in dA's sums

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
    def _a_forward(x, a, seed_ptr, salt, u, T, D, R, threshold, scale,
                   RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DROP: tl.constexpr):
        """u[i, rows] = (x * keep_i) @ A_i.T * scale for this program's rows and adapter i."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        i = tl.program_id(1)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BT, RP), dtype=tl.float32)
        for k0 in range(0, D, BK):
            cols = k0 + tl.arange(0, BK)
            xt = tl.load(x + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < D),
                         other=0.0)
            if DROP:
                xt = tl.where(_keep(seed_ptr, salt + i, rows, k0, D, threshold, BT, BK), xt, 0.0)
            at = tl.load(a + (i * R + ranks[None, :]) * D + cols[:, None],
                         mask=(ranks[None, :] < R) & (cols[:, None] < D), other=0.0)
            acc += tl.dot(xt, at, input_precision="ieee")
        tl.store(u + (i * T + rows[:, None]) * R + ranks[None, :], (acc * scale).to(u.dtype.element_ty),
                 mask=(rows[:, None] < T) & (ranks[None, :] < R))

    @triton.jit
    def _a_grad(x, du, seed_ptr, salt, partial, T, D, R, threshold, scale,
                RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, SPLIT: tl.constexpr, DROP: tl.constexpr):
        """partial[s, i] = du_i.T @ (x * keep_i) * scale over this program's SPLIT rows and BK columns."""
        first_col = tl.program_id(0) * BK
        cols = first_col + tl.arange(0, BK)
        split, i = tl.program_id(1), tl.program_id(2)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((RP, BK), dtype=tl.float32)
        for t0 in range(0, SPLIT, BT):
            rows = split * SPLIT + t0 + tl.arange(0, BT)
            xt = tl.load(x + rows[:, None] * D + cols[None, :], mask=(rows[:, None] < T) & (cols[None, :] < D),
                         other=0.0)
            if DROP:
                xt = tl.where(_keep(seed_ptr, salt + i, rows, first_col, D, threshold, BT, BK), xt, 0.0)
            dut = tl.load(du + (i * T + rows[:, None]) * R + ranks[None, :],
                          mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
            acc += tl.dot(tl.trans(dut), xt, input_precision="ieee")
        n = tl.num_programs(2)
        tl.store(partial + ((split * n + i) * R + ranks[:, None]) * D + cols[None, :], acc * scale,
                 mask=(ranks[:, None] < R) & (cols[None, :] < D))

    @triton.jit
    def _x_grad(dx, du, a, seed_ptr, salt, T, D, R, threshold, scale,
                N: tl.constexpr, RP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, DROP: tl.constexpr):
        """dx = sum_i ((du_i @ A_i) * keep_i) * scale, for this program's rows and input columns."""
        rows = tl.program_id(0) * BT + tl.arange(0, BT)
        first_col = tl.program_id(1) * BK
        cols = first_col + tl.arange(0, BK)
        ranks = tl.arange(0, RP)
        acc = tl.zeros((BT, BK), dtype=tl.float32)
        for i in tl.static_range(N):
            dut = tl.load(du + (i * T + rows[:, None]) * R + ranks[None, :],
                          mask=(rows[:, None] < T) & (ranks[None, :] < R), other=0.0)
            at = tl.load(a + (i * R + ranks[:, None]) * D + cols[None, :],
                         mask=(ranks[:, None] < R) & (cols[None, :] < D), other=0.0)
            part = tl.dot(dut, at, input_precision="ieee")
            if DROP:
                part = tl.where(_keep(seed_ptr, salt + i, rows, first_col, D, threshold, BT, BK), part, 0.0)
            acc += part
        tl.store(dx + rows[:, None] * D + cols[None, :], (acc * scale).to(dx.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cols[None, :] < D))

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


def a_product(x, a, seed, salt: int, p: float) -> torch.Tensor:
    """u [n, T, r] = (x * keep_i) @ a[i].T * keep_scale(p) for x [T, d] and a [n, r, d] (p = 0: no dropout)."""
    t, d = x.shape
    n, r, _ = a.shape
    u = torch.empty(n, t, r, dtype=x.dtype, device=x.device)
    _a_forward[(triton.cdiv(t, ROWS), n)](x, a, seed, salt, u, t, d, r, dropout_threshold(p), keep_scale(p),
                                          RP=_padded_rank(r), BT=ROWS, BK=COLUMNS, DROP=p > 0)
    return u


def a_gradient(x, du, seed, salt: int, p: float) -> torch.Tensor:
    """dA [n, r, d] (float32) = du[i].T @ (x * keep_i) * keep_scale(p) for du [n, T, r]."""
    t, d = x.shape
    n, _, r = du.shape
    splits = triton.cdiv(t, ROW_SPLIT)
    partial = torch.empty(splits, n, r, d, dtype=torch.float32, device=x.device)
    _a_grad[(triton.cdiv(d, COLUMNS), splits, n)](x, du, seed, salt, partial, t, d, r, dropout_threshold(p),
                                                  keep_scale(p), RP=_padded_rank(r), BT=ROWS, BK=COLUMNS,
                                                  SPLIT=ROW_SPLIT, DROP=p > 0)
    return partial.sum(0) if splits > 1 else partial[0]


def x_gradient(du, a, seed, salt: int, p: float) -> torch.Tensor:
    """dx [T, d] = sum_i ((du[i] @ a[i]) * keep_i) * keep_scale(p)."""
    n, t, r = du.shape
    d = a.shape[2]
    dx = torch.empty(t, d, dtype=a.dtype, device=a.device)
    _x_grad[(triton.cdiv(t, ROWS), triton.cdiv(d, COLUMNS))](
        dx, du, a, seed, salt, t, d, r, dropout_threshold(p), keep_scale(p), N=n, RP=_padded_rank(r), BT=ROWS,
        BK=COLUMNS, DROP=p > 0)
    return dx


def keep_flags(seed, salt: int, shape, p: float) -> torch.Tensor:
    """The keep flags (bool, `shape` = [T, d]) the kernels draw for `seed` and `salt` (tests)."""
    t, d = shape
    out = torch.empty(t, d, dtype=torch.int8, device=seed.device)
    _keep_flags_kernel[(triton.cdiv(t, ROWS), triton.cdiv(d, COLUMNS))](seed, salt, out, t, d, dropout_threshold(p),
                                                                       BT=ROWS, BK=COLUMNS)
    return out.bool()


class _AdaptedUpdate(torch.autograd.Function):
    """y (the base output, updated in place and returned) += each adapter's LoRA update of x."""

    @staticmethod
    def forward(ctx, y, x, a, seed, salt: int, p: float, columns: tuple, *bs):
        x = x.contiguous()
        u = a_product(x, a, seed, salt, p)
        for i, (b, start) in enumerate(zip(bs, columns)):
            y[:, start:start + b.shape[0]].addmm_(u[i], b.t())
        ctx.mark_dirty(y)
        ctx.save_for_backward(x, a, seed, u, *bs)
        ctx.settings = (salt, p, columns)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, a, seed, u, *bs = ctx.saved_tensors
        salt, p, columns = ctx.settings
        du = torch.empty_like(u)
        db = []
        for i, (b, start) in enumerate(zip(bs, columns)):
            part = dy[:, start:start + b.shape[0]]
            torch.mm(part, b, out=du[i])
            db.append(part.t() @ u[i])
        da = a_gradient(x, du, seed, salt, p).to(a.dtype)
        dx = x_gradient(du, a.contiguous(), seed, salt, p)
        return (dy, dx, da, None, None, None, None, *db)


def adapted_update(y, x, a, bs, columns, seed, salt: int, p: float) -> torch.Tensor:
    """`y` [T, out] (the base output x @ W.T; updated in place) plus, for each adapter i, the LoRA
    update dropout_i(x) @ a[i].T @ bs[i].T in columns columns[i]:columns[i] + bs[i].shape[0].
    x [T, d], a [n, r, d], bs: n tensors [out_i, r]; seed: the pass's (int64 [1], on x's device);
    salt: this projection's adapters' first stream (each adapter's is salt + i, below SEED_STRIDE)."""
    return _AdaptedUpdate.apply(y, x, a, seed, salt, p, tuple(columns), *bs)
