"""4-bit NF4 base weights (QLoRA): the frozen projections of a base model stored as torchao's NF4Tensor.

    from chatlora.models.quantize import quantize_base, dequantize, describe
    quantize_base(lm, {"q_proj", ...}, "cuda")   # those modules of every layer -> NF4, in place
    print(describe(lm, {"q_proj", ...}).line())  # how many, and their bytes before and after
    w = dequantize(module.weight)                # the weight in its compute dtype, e.g. inside the fused pass

NF4 as QLoRA defines it: blocks of 64 weights, each stored as 4-bit indices into the 16 NF4 values
scaled by the block's absolute maximum; the block maxima themselves quantised to 8 bits in blocks of
`scaler_block_size` (double quantisation), about 4.13 bits per weight. torchao keeps them in an
ordinary tensor subclass: `F.linear` on it de-quantises with torch operations, so peft's LoRA layers,
transformers' forward and autograd work on it unchanged (the plain path), nothing is fetched at run time
and the format never changes under the model (bench/NOTES.md says why torchao and not bitsandbytes).

The fused training pass de-quantises each projection just before its GEMM, forward and backward, with
`dequantize`: on a GPU one Triton kernel (`_dequantize_kernel`) that rounds exactly where torchao's
torch operations do, so both paths compute with the same bf16 weights (tests/test_quantize.py; the
kernel under Triton's interpreter in tests/test_kernels.py).

Embeddings, norms and the output head stay in the compute dtype, as in QLoRA.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from chatlora.errors import UserError
from chatlora.models.triton_kernels import enabled, tl, triton

BLOCK = 64              # weights per scale, as QLoRA
SCALER_BLOCK = 256      # block scales per second-level scale, as QLoRA; smaller where a weight needs it


@contextlib.contextmanager
def quiet_optional_imports():
    """Imports during which the optional quantisation libraries' load messages are kept quiet: torchao
    warns about C++ extensions it cannot load (chatlora uses none), bitsandbytes about a CPU kernel it
    could not fetch, torch about their enum registrations. peft imports both when they are installed."""
    quiet = [logging.getLogger(n) for n in ("torchao", "bitsandbytes", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)


def _torchao_nf4():
    """torchao's NF4 module."""
    try:
        with quiet_optional_imports():
            from torchao.quantization.quantize_.workflows.nf4 import nf4_tensor
    except ImportError as exc:
        raise UserError("model.quantize=nf4 needs torchao: pip install 'torchao>=0.18'") from exc
    return nf4_tensor


def is_nf4(weight) -> bool:
    return type(weight).__name__ == "NF4Tensor"


def is_quantized(model) -> bool:
    """Whether any weight of `model` is NF4 (the 16-bit-only paths, the fast decoder and merging,
    must not take it)."""
    return any(is_nf4(p) for p in model.parameters())


def scaler_block_size(numel: int) -> int | None:
    """The second-level block (scales per scale): QLoRA's 256, or the largest power of two below it
    that divides the weight's number of blocks (torchao needs whole blocks); None if none >= 8 does."""
    if numel % BLOCK:
        return None
    blocks = numel // BLOCK
    size = SCALER_BLOCK
    while size >= 8:
        if blocks % size == 0:
            return size
        size //= 2
    return None


@dataclass
class QuantizedBase:
    """What a model's NF4 base holds: weights quantised, their bytes in 16 bits and in NF4, and the
    projections left as they were (NF4 needs whole blocks)."""
    quantized: int
    bytes_16bit: int
    bytes_nf4: int
    kept: list[str]

    def line(self) -> str:
        text = (f"4-bit NF4 base: {self.quantized} projection weights, {self.bytes_16bit / 2**30:.2f} GiB in "
                f"16 bits -> {self.bytes_nf4 / 2**30:.2f} GiB")
        if self.kept:
            shown = ", ".join(self.kept[:3]) + (f" and {len(self.kept) - 3} more" if len(self.kept) > 3 else "")
            text += f"; kept in 16 bits (not whole blocks of {BLOCK} x 8 weights): {shown}"
        return text


def nf4_bytes(weight) -> int:
    return sum(t.numel() * t.element_size() for t in
               (weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.nf4))


def _projections(lm, names: set[str]):
    for index, layer in enumerate(lm.model.layers):
        for path, module in layer.named_modules():
            if path.rsplit(".", 1)[-1] in names and isinstance(getattr(module, "weight", None), torch.Tensor):
                yield f"layers.{index}.{path}", module


@torch.no_grad()
def quantize_base(lm, names: set[str], device: str) -> None:
    """Replace the weight of every decoder-layer module of transformers model `lm` named in `names`
    (q_proj, ...) by its NF4 form on `device`, in place: each weight moves there in 16 bits, is
    quantised there (fast on a GPU) and only its NF4 form stays. Before LoRA is attached."""
    nf4 = _torchao_nf4()
    for _, module in _projections(lm, names):
        w = module.weight
        size = scaler_block_size(w.numel())
        if is_nf4(w) or size is None:
            continue
        q = nf4.NF4Tensor.from_tensor(w.detach().to(device).contiguous(), BLOCK, size)
        module.weight = torch.nn.Parameter(q, requires_grad=False)


def describe(lm, names: set[str]) -> QuantizedBase | None:
    """The NF4 base of `lm` (a transformers or peft model), or None when nothing in it is NF4."""
    lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    found = QuantizedBase(0, 0, 0, [])
    for path, module in _projections(lm, names):
        w = getattr(module, "base_layer", module).weight
        if is_nf4(w):
            found.quantized += 1
            found.bytes_16bit += w.numel() * w.element_size()
            found.bytes_nf4 += nf4_bytes(w)
        else:
            found.kept.append(path)
    return found if found.quantized else None


def dequantize(weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """An NF4 weight in its dtype ([out, in]; written into `out` when given, a contiguous buffer of
    the weight's shape and dtype); any other tensor is returned as it is. Equal to torchao's
    `get_original_weight`, bit for bit."""
    if not is_nf4(weight):
        return weight if out is None else out.copy_(weight)
    if enabled(weight.device):
        return _dequantize_triton(weight, out)
    w = weight.get_original_weight()
    return w if out is None else out.copy_(w)


class QuantizedWeight:
    """The NF4 weights of linear modules reading the same input (a fused projection, models/arch.py),
    kept apart (each is its module's own tensor, which peft and the plain path read) and de-quantised
    together into one [sum of outs, in] tensor when a pass needs it."""

    def __init__(self, parts: list):
        self.parts = parts
        self.shape = torch.Size([sum(p.shape[0] for p in parts), parts[0].shape[1]])
        self.dtype, self.device = parts[0].dtype, parts[0].device

    def dequantized(self) -> torch.Tensor:
        if len(self.parts) == 1:
            return dequantize(self.parts[0])
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        start = 0
        for part in self.parts:
            dequantize(part, out[start:start + part.shape[0]])
            start += part.shape[0]
        return out


class _QuantizedMatmul(torch.autograd.Function):
    """x @ W.T for a frozen 4-bit W, de-quantised in the forward pass and again in the backward pass:
    the 16-bit weight lives only while its GEMM runs, never kept for backward."""

    @staticmethod
    def forward(ctx, x, weight: QuantizedWeight):
        ctx.weight = weight
        return x @ weight.dequantized().t()

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight.dequantized(), None


def quantized_matmul(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x [T, in] @ the de-quantised weight's transpose -> [T, sum of outs]; gradient for x only."""
    return _QuantizedMatmul.apply(x, weight)


if triton is not None:

    @triton.jit
    def _rounded(x, dt: tl.constexpr, BF16: tl.constexpr):
        """fp32 `x` rounded to the output dtype's precision (nearest, ties to even), kept in fp32. For
        bf16 by the bits: Triton's CPU interpreter truncates in its own fp32 -> bf16 conversion."""
        if BF16:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            return bits.to(tl.float32, bitcast=True)
        return x.to(dt).to(tl.float32)

    @triton.jit
    def _dequantize_kernel(data, scalers, factors, mean, table, out, n_bytes, HALF_BLOCK: tl.constexpr,
                           SCALER_BLOCK: tl.constexpr, BYTES: tl.constexpr, BF16: tl.constexpr):
        """BYTES packed bytes (2 weights each, high nibble first) -> 2 * BYTES weights, rounded to the
        output dtype where torchao's operations round: the block scale (int8 / factor), plus the
        mean, then table value * scale."""
        start = tl.program_id(0) * BYTES
        offs = start + tl.arange(0, BYTES)
        keep = offs < n_bytes
        dt = out.dtype.element_ty
        byte = tl.load(data + offs, mask=keep, other=0).to(tl.int32)
        block = offs // HALF_BLOCK
        q = tl.load(scalers + block, mask=keep, other=0).to(tl.float32)
        f = tl.load(factors + block // SCALER_BLOCK, mask=keep, other=1.0).to(tl.float32)
        scale = _rounded(tl.math.div_rn(q, f), dt, BF16)
        scale = _rounded(scale + tl.load(mean).to(tl.float32), dt, BF16)
        high = _rounded(tl.load(table + (byte >> 4)).to(tl.float32) * scale, dt, BF16)
        low = _rounded(tl.load(table + (byte & 15)).to(tl.float32) * scale, dt, BF16)
        at = 2 * start + tl.arange(0, 2 * BYTES)
        tl.store(out + at, tl.interleave(high, low).to(dt), mask=at < 2 * n_bytes)


def _dequantize_triton(weight, out=None) -> torch.Tensor:
    out = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device) if out is None else out
    n = weight.quantized_data.numel()
    bytes_per_program = 1024
    _dequantize_kernel[(triton.cdiv(n, bytes_per_program),)](
        weight.quantized_data, weight.quantized_scalers, weight.quantization_factor, weight.scaler_mean,
        weight.nf4, out, n, HALF_BLOCK=weight.block_size // 2, SCALER_BLOCK=weight.scaler_block_size,
        BYTES=bytes_per_program, BF16=weight.dtype == torch.bfloat16)
    return out
