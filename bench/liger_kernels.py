"""chatlora's training kernels against liger-kernel's functional operations, one operation at a time.

    python bench/liger_kernels.py [--tokens 768] [--json out.json]      # liger-kernel installed

At the self-llm job's pass (Index-1.9B shape: `--tokens` rows of width 2048, gate/up 2 x 5888, 16
heads of 128, half the rows supervised over the 65,029-token vocabulary; bf16), for each operation
the fused pass runs through a Triton kernel of ours and liger-kernel has a functional counterpart
for:

    RMSNorm            train.kernels.rms_norm        LigerRMSNormFunction (weight frozen)
    SiLU(gate) * up    train.kernels.silu_mul        LigerFusedGateUpSiLUMulFunction
    RoPE on q and k    train.kernels.rope_qkv        LigerRopeFunction (q, k split from the q/k/v output)
    head + loss        train.head.chunked_cross_entropy   LigerFusedLinearCrossEntropyFunction (sum)

forward and backward are captured in one CUDA graph per implementation (as the training pass runs
them: no host launch cost) and replayed (the median of 50, CUDA events); a capture that fails is
tried once more, then timed eagerly instead and marked. Beside it, the sum of the CUDA kernels'
times per call from torch's profiler (no launch gaps): the measure that still compares the kernels
when a capture fails. Each implementation's output and input gradient are compared with float64
torch (relative error of the whole tensor). On a GPU.
"""

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from profile_fast import kernel_ms, median_ms  # noqa: E402

from chatlora.models.arch import rope_tables  # noqa: E402
from chatlora.templates import IGNORE  # noqa: E402
from chatlora.train import kernels  # noqa: E402
from chatlora.train.head import chunked_cross_entropy  # noqa: E402

HIDDEN, INTER, HEADS, HEAD_DIM, VOCAB, EPS = 2048, 5888, 16, 128, 65029, 1e-6
DEVICE, DTYPE = "cuda", torch.bfloat16


def timed(run, n: int = 50) -> tuple[float, bool]:
    """Median microseconds of `run` (forward + backward) replayed from a CUDA graph; (time, captured)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(stream)
    for attempt in range(2):   # a second try: the process's first capture can fail on lazy set-up
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                run()
            return median_ms(graph.replay, n) * 1e3, True
        except RuntimeError as error:   # an operation that cannot be captured: timed eagerly
            print(f"  (capture {attempt + 1} failed: {str(error).splitlines()[0][:100]})")
            torch.cuda.synchronize()
    return median_ms(run, n) * 1e3, False


def error(ours, reference) -> float:
    return ((ours.double() - reference).norm() / reference.norm()).item()


def operations(tokens: int, liger):
    """name -> (input, upstream gradient, ours, liger's, float64 reference): each a function of the input."""
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(DTYPE)

    norm_weight = rand(HIDDEN, scale=0.1) + 1
    cos, sin = rope_tables(torch.arange(tokens, device=DEVICE) % 97, 1.0 / 10000 ** (
        torch.arange(0, HEAD_DIM, 2, device=DEVICE) / HEAD_DIM), 1.0, DTYPE)
    half = HEAD_DIM // 2
    plain_sin = torch.cat([-sin[:, :half], sin[:, half:]], -1)   # liger takes sin without rotate_half's signs
    head = rand(VOCAB, HIDDEN, scale=0.02)
    supervised = tokens // 2
    targets = torch.randint(0, VOCAB, (supervised,), device=DEVICE, generator=g)
    targets[::7] = IGNORE
    qkv_width = 3 * HEADS * HEAD_DIM

    def liger_rope(y):
        q = y[:, :HEADS * HEAD_DIM].unflatten(-1, (HEADS, HEAD_DIM)).unsqueeze(0).transpose(1, 2)
        k = y[:, HEADS * HEAD_DIM:2 * HEADS * HEAD_DIM].unflatten(-1, (HEADS, HEAD_DIM)).unsqueeze(0).transpose(1, 2)
        q, k = liger.LigerRopeFunction.apply(q, k, cos, plain_sin)
        return torch.cat([q[0].transpose(0, 1), k[0].transpose(0, 1)], 1)

    def reference_rope(y):
        qk = y[:, :2 * HEADS * HEAD_DIM].unflatten(-1, (2 * HEADS, HEAD_DIM))
        c, s = cos.double()[:, None], sin.double()[:, None]
        return qk * c + qk.unflatten(-1, (2, half)).flip(-2).flatten(-2) * s

    return {
        "RMSNorm": ((tokens, HIDDEN), lambda x: kernels.rms_norm(x, norm_weight, EPS),
                    lambda x: liger.LigerRMSNormFunction.apply(x, norm_weight, EPS, 0.0, "llama", False),
                    lambda x: F.rms_norm(x, (HIDDEN,), norm_weight.double(), EPS)),
        "SiLU(gate) * up": ((tokens, 2 * INTER), kernels.silu_mul,
                            lambda gu: liger.LigerFusedGateUpSiLUMulFunction.apply(gu, False),
                            lambda gu: F.silu(gu[:, :INTER]) * gu[:, INTER:]),
        "RoPE on q and k": ((tokens, qkv_width), lambda y: kernels.rope_qkv(y, cos, sin, HEADS, HEADS)[0],
                            liger_rope, reference_rope),
        "head + cross-entropy": ((supervised, HIDDEN), lambda x: chunked_cross_entropy(x, head, targets, kernel=True),
                                 lambda x: liger.LigerFusedLinearCrossEntropyFunction.apply(
                                     x, head, targets, None, None, IGNORE, 0.0, 0.0, "sum")[0],
                                 lambda x: F.cross_entropy(x @ head.double().t(), targets, ignore_index=IGNORE,
                                                           reduction="sum")),
    }


def compare(tokens: int, liger, timing: bool = True) -> list[dict]:
    """Each operation's error against float64 for both implementations, and (`timing`) their times."""
    rows = []
    for name, (shape, ours, theirs, reference) in operations(tokens, liger).items():
        g = torch.Generator(device=DEVICE).manual_seed(1)
        x = (torch.randn(*shape, device=DEVICE, generator=g) * 0.5).to(DTYPE).requires_grad_(True)
        x64 = x.detach().double().requires_grad_(True)
        want = reference(x64)
        upstream = torch.randn(want.shape, device=DEVICE, generator=g).to(DTYPE)
        (want_grad,) = torch.autograd.grad(want, x64, upstream.double())
        row = dict(operation=name)
        for label, fn in (("chatlora", ours), ("liger", theirs)):
            out = fn(x)
            (grad,) = torch.autograd.grad(out, x, upstream)
            row[f"{label}_error"] = max(error(out, want), error(grad, want_grad))
            if timing:
                def run(fn=fn):
                    return torch.autograd.grad(fn(x), x, upstream)
                row[f"{label}_us"], row[f"{label}_captured"] = timed(run)
                row[f"{label}_kernel_us"] = kernel_ms(run, 10)[0] * 1e3
        rows.append(row)
        print(f"{name:<22} chatlora {row.get('chatlora_us', 0):8.1f} us (error {row['chatlora_error']:.1e})   "
              f"liger {row.get('liger_us', 0):8.1f} us (error {row['liger_error']:.1e})", flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--json")
    args = parser.parse_args()
    from liger_kernel import ops as liger  # a benchmark's optional dependency

    rows = compare(args.tokens, liger)
    print(f"\nliger-kernel {importlib.metadata.version('liger-kernel')}, {args.tokens} rows, forward + backward")
    print(f"{'operation':<22}{'chatlora us':>12}{'liger us':>10}{'liger / ours':>14}   kernel time: "
          f"{'chatlora us':>12}{'liger us':>10}{'liger / ours':>14}")
    for r in rows:
        marks = "" if r["chatlora_captured"] and r["liger_captured"] else "  (eager)"
        print(f"{r['operation']:<22}{r['chatlora_us']:>12.1f}{r['liger_us']:>10.1f}"
              f"{r['liger_us'] / r['chatlora_us']:>14.2f}{'':>16}{r['chatlora_kernel_us']:>12.1f}"
              f"{r['liger_kernel_us']:>10.1f}{r['liger_kernel_us'] / r['chatlora_kernel_us']:>14.2f}{marks}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(tokens=args.tokens, rows=rows), indent=1))


if __name__ == "__main__":
    main()
