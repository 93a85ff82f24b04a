"""The Triton decode kernels (chatlora/decode/kernels.py) against the torch operations they replace: one
check for both runs, compiled on a GPU (tests/test_gpu.py, fp32 and bf16) and on CPU under Triton's
interpreter (tests/test_kernels.py, fp32). Errors are relative (norm of the difference over the norm
of the reference) and must stay under `tol`."""

import torch
import torch.nn.functional as F

from chatlora.decode import kernels

# one configuration of each of `linear`'s code paths besides its defaults: small blocks so that the
# test shapes take several programs and several loop iterations, with a masked tail
CONFIGS = [None, {"BLOCK_N": 16, "BLOCK_K": 64, "MMA": True, "num_warps": 4, "num_stages": 2},
           {"BLOCK_N": 8, "BLOCK_K": 64, "MMA": False, "num_warps": 4, "num_stages": 2}]


def check(device: str, dtype: torch.dtype, tol: float, head_dim: int) -> None:
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    failures = []

    def expect(name, ours, ref):
        err = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
        if not err < tol:
            failures.append(f"{name}: relative error {err:.2e}")

    # element-wise kernels (batch 3, GQA 4:2, cache of 16 columns, each row written at its own column)
    b, nq, nkv, hd, cap = 3, 4, 2, head_dim, 16
    y, cos, sin, w = rand(b, (nq + 2 * nkv) * hd), rand(b, hd), rand(b, hd), rand((nq + 2 * nkv) * hd)
    slot = torch.tensor([5, 0, 11], device=device)
    kc, vc = rand(b, nkv, cap, hd), rand(b, nkv, cap, hd)
    kc_ref, vc_ref, kc_before = kc.clone(), vc.clone(), kc.clone()
    expect("rope_to_cache q", kernels.rope_to_cache(y, cos, sin, slot, kc, vc, nq, nkv),
           kernels.rope_to_cache_reference(y, cos, sin, slot, kc_ref, vc_ref, nq, nkv))
    expect("rope_to_cache k", kc, kc_ref)
    if not torch.equal(vc, vc_ref):
        failures.append("rope_to_cache v: not copied exactly")
    written = torch.zeros(b, cap, dtype=torch.bool, device=device)
    written[torch.arange(b, device=device), slot] = True
    if not (torch.equal((kc != kc_before).any(-1).any(1), written)
            and torch.equal(vc.transpose(1, 2)[written].reshape(b, nkv * hd), y[:, (nq + nkv) * hd:])):
        failures.append("rope_to_cache: v not written at each row's own column")
    expect("rms_norm", kernels.rms_norm(y, w, 1e-6), F.rms_norm(y, (y.shape[1],), w, 1e-6))
    half = y.shape[1] // 2
    expect("silu_mul", kernels.silu_mul(y), F.silu(y[:, :half]) * y[:, half:])

    # linear: 40 outputs (not a multiple of the blocks), 300 inputs (a masked tail), 1, 3, 16 rows
    n, k = 40, 300
    weight, norm = rand(n, k), rand(k)
    for rows in (1, 3, kernels.LINEAR_ROWS):
        x, gu, res = rand(rows, k), rand(rows, 2 * k), rand(rows, n)
        for config in CONFIGS:
            if config and not config["MMA"] and rows > 1:
                continue
            tag = f"linear rows {rows} {config and config['BLOCK_N']}"
            expect(f"{tag} plain", kernels.linear(x, weight, config=config), x @ weight.t())
            expect(f"{tag} norm", kernels.linear(x, weight, norm=norm, eps=1e-6, config=config),
                   F.rms_norm(x, (k,), norm, 1e-6) @ weight.t())
            out = kernels.linear(gu, weight, gated=True, residual=res.clone(), config=config)
            expect(f"{tag} gated + residual", out - res, (F.silu(gu[:, :k]) * gu[:, k:]) @ weight.t())
            logits = kernels.linear(x, weight, norm=norm, eps=1e-6, out_dtype=torch.float32, config=config)
            if logits.dtype != torch.float32:
                failures.append(f"{tag}: logits are {logits.dtype}")
            expect(f"{tag} fp32 out", logits, F.rms_norm(x.float(), (k,), norm.float(), 1e-6) @ weight.float().t())

    # attention: 2 rows, GQA 4:2, in one program per head (100 columns) and in chunks merged by a
    # second kernel (192 columns: two chunks of 128); row 0's first 130 columns (its whole first
    # chunk) masked, row 1 with scattered valid columns
    cap = 200
    q, kc, vc = rand(2, nq, 1, hd), rand(2, nkv, cap, hd), rand(2, nkv, cap, hd)
    valid = torch.rand(2, cap, generator=g).to(device) > 0.3
    valid[0, :130] = False
    valid[:, 90] = valid[:, 150] = True
    for attend in (100, 192):
        mask = torch.zeros(2, 1, 1, attend, dtype=dtype, device=device).masked_fill_(
            ~valid[:, None, None, :attend], float("-inf"))
        want = F.scaled_dot_product_attention(q, kc[:, :, :attend].repeat_interleave(2, 1),
                                              vc[:, :, :attend].repeat_interleave(2, 1), attn_mask=mask,
                                              scale=hd ** -0.5)
        expect(f"decode_attention {attend}", kernels.decode_attention(q, kc, vc, valid, attend, hd ** -0.5),
               want.transpose(1, 2).reshape(2, nq * hd))
    assert not failures, "\n".join(failures)
