"""NF4 in bitsandbytes against NF4 in torchao: one transformer layer's seven projection weights.

    python bench/nf4_libraries.py --device cuda --shape qwen3-8b --tokens 1024 --json out.json
    python bench/nf4_libraries.py --device cpu --shape qwen2.5-1.5b --tokens 128

For each library (both with 64-weight blocks and their double quantisation of the block scales):
time to quantise the layer from bf16, time to de-quantise it back to bf16, a training-shaped linear
(forward and the input's gradient, as LoRA training needs it for a frozen base) over `--tokens` rows
through the library's own 4-bit autograd function, the same at one row (decoding), stored bits per
weight and the relative error of the de-quantised weights. bf16 `F.linear` is timed beside them. The
median of `--repeat` timings is reported; on CUDA each timing is bracketed by synchronisations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

SHAPES = {  # hidden, K/V width, MLP width
    "qwen3-8b": (4096, 1024, 12288),
    "llama-3.1-8b": (4096, 1024, 14336),
    "index-1.9b": (2048, 2048, 5888),
    "qwen2.5-1.5b": (1536, 256, 8960),
}


def layer_weights(shape: str, device: str) -> dict[str, torch.Tensor]:
    hidden, kv, mlp = SHAPES[shape]
    outs_ins = {"q": (hidden, hidden), "k": (kv, hidden), "v": (kv, hidden), "o": (hidden, hidden),
                "gate": (mlp, hidden), "up": (mlp, hidden), "down": (hidden, mlp)}
    g = torch.Generator().manual_seed(0)
    return {n: (torch.randn(o, i, generator=g) * 0.02).to(device, torch.bfloat16) for n, (o, i) in outs_ins.items()}


def timed(fn, device: str, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` calls, after one untimed call."""
    fn()
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


class Bitsandbytes:
    name = "bitsandbytes"

    def __init__(self):
        import bitsandbytes
        import bitsandbytes.functional as bnbf

        self.version, self.f, self.matmul = bitsandbytes.__version__, bnbf, bitsandbytes.matmul_4bit

    def quantize(self, w):
        return self.f.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")

    def dequantize(self, q):
        return self.f.dequantize_4bit(q[0], q[1])

    def linear(self, x, q):
        return self.matmul(x, q[0].t(), quant_state=q[1])

    def stored_bytes(self, q):
        packed, state = q
        size = packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size()
        if state.nested:
            size += state.state2.absmax.numel() * state.state2.absmax.element_size()
        return size


class Torchao:
    name = "torchao"

    def __init__(self):
        import torchao
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        self.version, self.to_nf4, self.linear_nf4 = torchao.__version__, to_nf4, linear_nf4

    def quantize(self, w):
        return self.to_nf4(w, 64, 256)

    def dequantize(self, q):
        return q.get_original_weight()

    def linear(self, x, q):
        return self.linear_nf4(x, q)

    def stored_bytes(self, q):
        return sum(t.numel() * t.element_size() for t in
                   (q.quantized_data, q.quantized_scalers, q.quantization_factor, q.nf4))


class TorchaoWithKernel(Torchao):
    """torchao's NF4 format through chatlora's de-quantising kernel and 4-bit matmul (models/quantize.py)."""
    name = "torchao + chatlora kernel"

    def __init__(self):
        super().__init__()
        from chatlora.models import quantize

        self.q = quantize

    def dequantize(self, q):
        return self.q.dequantize(q)

    def linear(self, x, q):
        return self.q.quantized_matmul(x, self.q.QuantizedWeight([q]))


def measure(lib, weights, tokens: int, device: str, repeat: int) -> dict:
    quantized = {}

    def quantize_all():
        quantized.update({n: lib.quantize(w) for n, w in weights.items()})

    out = {"library": lib.name, "version": lib.version, "quantize_s": timed(quantize_all, device, max(1, repeat // 4))}
    out["dequantize_ms"] = 1e3 * timed(lambda: [lib.dequantize(q) for q in quantized.values()], device, repeat)
    numel = sum(w.numel() for w in weights.values())
    out["bits_per_weight"] = 8 * sum(lib.stored_bytes(q) for q in quantized.values()) / numel
    err = [(lib.dequantize(quantized[n]).float() - w.float()).norm() / w.float().norm() for n, w in weights.items()]
    out["relative_error"] = float(max(err))
    xs = {n: torch.randn(tokens, w.shape[1], device=device, dtype=torch.bfloat16, requires_grad=True)
          for n, w in weights.items()}

    def train_linear(linear):
        for n, x in xs.items():
            y = linear(x, n)
            y.backward(torch.ones_like(y))

    out["train_linear_ms"] = 1e3 * timed(lambda: train_linear(lambda x, n: lib.linear(x, quantized[n])), device, repeat)
    ones = {n: torch.randn(1, w.shape[1], device=device, dtype=torch.bfloat16) for n, w in weights.items()}
    with torch.no_grad():
        out["decode_linear_ms"] = 1e3 * timed(lambda: [lib.linear(ones[n], q) for n, q in quantized.items()],
                                              device, repeat)
    out["bf16_train_linear_ms"] = 1e3 * timed(lambda: train_linear(lambda x, n: F.linear(x, weights[n])), device,
                                              repeat)
    with torch.no_grad():
        out["bf16_decode_linear_ms"] = 1e3 * timed(lambda: [F.linear(ones[n], w) for n, w in weights.items()],
                                                   device, repeat)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", default="qwen3-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    weights = layer_weights(args.shape, args.device)
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    results = {"date": str(date.today()), "device": where, "torch": torch.__version__, "shape": args.shape,
               "tokens": args.tokens, "libraries": []}
    for lib in (Bitsandbytes(), Torchao(), TorchaoWithKernel()):
        results["libraries"].append(measure(lib, weights, args.tokens, args.device, args.repeat))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"{args.shape}, one layer's 7 projections, {args.tokens} tokens, {where}")
    print(f"{'library':<34}{'quantize s':>11}{'dequant ms':>11}{'train ms':>10}{'bf16 train':>11}"
          f"{'decode ms':>10}{'bf16 dec':>9}{'bits/w':>7}{'rel err':>9}")
    for r in results["libraries"]:
        print(f"{r['library'] + ' ' + r['version']:<34}{r['quantize_s']:>11.3f}{r['dequantize_ms']:>11.2f}"
              f"{r['train_linear_ms']:>10.2f}{r['bf16_train_linear_ms']:>11.2f}{r['decode_linear_ms']:>10.3f}"
              f"{r['bf16_decode_linear_ms']:>9.3f}{r['bits_per_weight']:>7.2f}{r['relative_error']:>9.4f}")


if __name__ == "__main__":
    main()
