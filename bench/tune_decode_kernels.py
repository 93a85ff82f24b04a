"""Launch parameters for the decode kernels (kernels.linear, kernels.decode_attention) on this GPU.

    python bench/tune_decode_kernels.py --json tune.json

For each matrix of an Index-1.9B-sized layer (q/k/v with RMSNorm in front, o with the residual add,
gate/up with RMSNorm, down with SiLU*mul in front and the residual add, the head with the final
RMSNorm and fp32 logits) and each row count, every candidate configuration runs as 36 calls over 36
different weights (as one decode step reads them: nothing stays in L2) captured in one CUDA graph,
against the operations the decoder used before (`kernels.rms_norm` + cuBLAS, `addmm_`,
`kernels.silu_mul`), captured the same way. Every configuration's output is checked against that
reference first. Attention: `kernels.decode_attention` against SDPA with an additive mask.
The table (best configuration per case, microseconds per call, weight-read bandwidth) comes last.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.decode import kernels  # noqa: E402

HIDDEN, INTER, VOCAB, LAYERS, HEADS, HEAD_DIM = 2048, 5888, 65029, 36, 16, 128
EPS = 1e-6

ONE_ROW = [(8, 256, 4, 3), (8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3),
           (32, 256, 4, 3), (32, 256, 8, 3), (16, 256, 4, 4), (16, 1024, 8, 2)]
# attention: (columns per program, columns per block, warps); the first is kernels.py's default
ATTENTION = [(128, 128, 4), (128, 64, 4), (64, 64, 4), (256, 128, 4), (128, 128, 8), (64, 64, 2)]
MMA = [(16, 128, 4, 3), (16, 256, 4, 3), (16, 256, 4, 4), (32, 128, 4, 3), (32, 256, 4, 3),
       (32, 256, 4, 4), (64, 128, 4, 3), (64, 256, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3)]


def graph_time(fn, copies: int, reps: int = 20) -> float:
    """Microseconds per call of fn(i) over copies calls captured in one graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps / copies)
    return sorted(times)[len(times) // 2]


def cases():
    """(name, n, k, prologue, residual, out dtype, copies)"""
    return [("qkv", 3 * HIDDEN, HIDDEN, "norm", False, None, LAYERS),
            ("o", HIDDEN, HIDDEN, None, True, None, LAYERS),
            ("gate_up", 2 * INTER, HIDDEN, "norm", False, None, LAYERS),
            ("down", HIDDEN, INTER, "gated", True, None, LAYERS),
            ("head", VOCAB, HIDDEN, "norm", False, torch.float32, 2)]


def tune_linear(rows_list, defaults_only: bool, log) -> list[dict]:
    out = []
    g = torch.Generator(device="cuda").manual_seed(0)
    for name, n, k, prologue, residual, out_dtype, copies in cases():
        weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) * k ** -0.5
                   for _ in range(copies)]
        norm = torch.rand(k, device="cuda", dtype=torch.bfloat16, generator=g) + 0.5
        for rows in rows_list:
            x = torch.randn(rows, 2 * k if prologue == "gated" else k, device="cuda", dtype=torch.bfloat16, generator=g)
            h = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16, generator=g)

            def reference(i):
                w = weights[i]
                if prologue == "norm":
                    y = kernels.rms_norm(x, norm, EPS)
                    return (w @ y.t()).t().float() if out_dtype else y @ w.t()
                return h.addmm_(kernels.silu_mul(x) if prologue == "gated" else x, w.t())

            def ours(i, config):
                kw = {"norm": norm, "eps": EPS} if prologue == "norm" else {"gated": prologue == "gated"}
                return kernels.linear(x, weights[i], residual=h if residual else None, out_dtype=out_dtype,
                                      config=config, **kw)

            h0 = h.clone()
            want = reference(0).float()
            h.copy_(h0)
            ref_us = graph_time(reference, copies)
            h.copy_(h0)
            best = None
            candidates = [] if defaults_only else (
                [(c, False) for c in ONE_ROW if rows == 1] + [(c, True) for c in MMA])
            default_us = None
            for shape, mma in [(None, None)] + candidates:
                config = shape and {"BLOCK_N": shape[0], "BLOCK_K": shape[1], "MMA": mma,
                                    "num_warps": shape[2], "num_stages": shape[3]}
                try:
                    got = ours(0, config).float()
                    h.copy_(h0)
                    base = h0.float() if residual else 0.0   # compare the products, not the residual
                    err = ((got - want).norm() / (want - base).norm()).item()
                    us = graph_time(lambda i: ours(i, config), copies)
                    h.copy_(h0)
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                    log.write(f"{name} rows {rows} {config}: {type(e).__name__}: {str(e)[:200]}\n")
                    continue
                log.write(f"{name} rows {rows} {config or 'default'}: {us:.2f} us, rel err {err:.2e}\n")
                if err > 2e-2:
                    log.write("  ^ WRONG\n")
                    continue
                if config is None:
                    default_us = us
                elif best is None or us < best[0]:
                    best = (us, config, err)
            weight_bytes = n * k * 2
            row = {"case": name, "rows": rows, "n": n, "k": k, "reference_us": ref_us,
                   "reference_tb_s": weight_bytes / ref_us / 1e6, "default_us": default_us,
                   "default_tb_s": default_us and weight_bytes / default_us / 1e6}
            if best:
                row.update(best_us=best[0], best_tb_s=weight_bytes / best[0] / 1e6, config=best[1], rel_err=best[2])
            out.append(row)
            print(json.dumps(row), flush=True)
        weights.clear()
        torch.cuda.empty_cache()
    return out


def tune_attention(log) -> list[dict]:
    out = []
    g = torch.Generator(device="cuda").manual_seed(1)
    default = kernels.ATTENTION_CHUNK, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS
    for rows in (1, 16):
        for attend in (128, 256, 512, 2048):
            cap = 2048
            kc = [torch.randn(rows, HEADS, cap, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
            vc = [torch.randn(rows, HEADS, cap, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)]
            q = torch.randn(rows, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g)
            valid = torch.zeros(rows, cap, dtype=torch.bool, device="cuda")
            valid[:, 5:attend - 7] = True
            mask = torch.zeros(rows, 1, 1, attend, device="cuda", dtype=torch.bfloat16).masked_fill_(
                ~valid[:, None, None, :attend], float("-inf"))

            def reference(i):
                return F.scaled_dot_product_attention(q, kc[i % 4][:, :, :attend], vc[i % 4][:, :, :attend],
                                                      attn_mask=mask, scale=HEAD_DIM ** -0.5)

            want = reference(0).transpose(1, 2).reshape(rows, -1).float()
            ref_us = graph_time(reference, LAYERS)
            best = None
            for chunk, block, warps in ATTENTION:
                kernels.ATTENTION_CHUNK, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS = chunk, block, warps
                got = kernels.decode_attention(q, kc[0], vc[0], valid, attend, HEAD_DIM ** -0.5).float()
                err = ((got - want).norm() / want.norm()).item()
                us = graph_time(lambda i: kernels.decode_attention(q, kc[i % 4], vc[i % 4], valid, attend,
                                                                   HEAD_DIM ** -0.5), LAYERS)
                log.write(f"attention rows {rows} attend {attend} chunk {chunk} block {block} warps {warps}: "
                          f"{us:.2f} us, err {err:.2e}\n")
                if err < 2e-2 and (best is None or us < best[0]):
                    best = (us, (chunk, block, warps), err)
            kernels.ATTENTION_CHUNK, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS = default
            row = {"case": "attention", "rows": rows, "attend": attend, "reference_us": ref_us,
                   "best_us": best[0], "chunk_block_warps": best[1], "rel_err": best[2]}
            out.append(row)
            print(json.dumps(row), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 16])
    parser.add_argument("--defaults-only", action="store_true", help="linear: only kernels.py's own choice")
    parser.add_argument("--json")
    parser.add_argument("--log", default="tune.log")
    args = parser.parse_args()
    assert kernels.available(torch.device("cuda"))
    with open(args.log, "w") as log:
        attention = tune_attention(log)
        linear = tune_linear(args.rows, args.defaults_only, log)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "linear": linear,
               "attention": attention}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    nan = float("nan")
    print(f"\n{'case':>9}{'rows':>5}{'cuBLAS+ops us':>15}{'TB/s':>6}{'default us':>12}{'TB/s':>6}{'best us':>9}{'TB/s':>6}  best")
    for r in linear:
        print(f"{r['case']:>9}{r['rows']:>5}{r['reference_us']:>15.2f}{r['reference_tb_s']:>6.2f}"
              f"{r['default_us'] or nan:>12.2f}{r['default_tb_s'] or nan:>6.2f}"
              f"{r.get('best_us', nan):>9.2f}{r.get('best_tb_s', nan):>6.2f}  {r.get('config')}")
    print(f"\n{'attention':>9}{'rows':>5}{'attend':>7}{'SDPA us':>9}{'best us':>9}  chunk block warps (first: default)")
    for r in attention:
        print(f"{'':>9}{r['rows']:>5}{r['attend']:>7}{r['reference_us']:>9.2f}{r['best_us']:>9.2f}  {r['chunk_block_warps']}")


if __name__ == "__main__":
    main()
