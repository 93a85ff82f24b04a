"""The fused training pass's last step: the vocabulary projection and the cross-entropy at the
supervised positions, in chunks of rows, with the input's gradient computed in the forward pass.

Why: the logits are the pass's largest tensor (supervised positions x vocabulary: 640 x 65,029 for
the self-llm job). Kept for backward with their float32 log-softmax they took 12 bytes per entry.
Here no logits outlive their chunk: the forward pass computes the loss and x's gradient,
(softmax - one-hot) @ weight, and keeps only that ([rows, hidden]); backward scales it.

On a GPU (`kernel=True`) each chunk's logits are one buffer in the compute dtype, overwritten in
place by their gradient (kernels.cross_entropy_grad_: 2 bytes per entry, one kernel). The buffer's
rows are padded to a multiple of `ALIGN` entries, and the gradient's product over the vocabulary is
split at the last multiple of `ALIGN`: with Index's vocabulary of 65,029 either GEMM otherwise gets
only cuBLAS's slow unaligned kernels (measured on the H200: 1.7 ms of a 31 ms pass for the two). Elsewhere the same arithmetic in torch's operations, in float32.

tests/test_fastpath.py compares both with float64 torch's cross-entropy; tests/test_kernels.py the
kernel under Triton's interpreter, tests/test_gpu.py compiled.
"""

from __future__ import annotations

import torch

from chatlora.templates import IGNORE
from chatlora.train import kernels

HEAD_LOGITS = 2 ** 26   # logits per chunk (on a GPU 128 MiB in bf16; 256 MiB in float32 elsewhere)
ALIGN = 64              # logits per buffer row are padded to a multiple of this (GPU path)


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Sum of the cross-entropies of x @ weight.T at `targets` (IGNORE skipped), `rows` rows at a
    time; the forward pass also computes x's gradient and keeps only that. `weight` is frozen."""

    @staticmethod
    def forward(ctx, x, weight, targets, rows: int, kernel: bool):
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        vocab = weight.shape[0]
        aligned = vocab - vocab % ALIGN
        if kernel:
            buffer = torch.empty(min(rows, x.shape[0]), aligned + (ALIGN if aligned < vocab else 0),
                                 dtype=x.dtype, device=x.device)
        for start in range(0, x.shape[0], rows):
            xc, target = x[start:start + rows], targets[start:start + rows]
            if kernel:
                logits = buffer[:xc.shape[0]]
                torch.mm(xc, weight[:aligned].t(), out=logits[:, :aligned])
                if aligned < vocab:
                    torch.mm(xc, weight[aligned:].t(), out=logits[:, aligned:vocab])
                total = total + kernels.cross_entropy_grad_(logits[:, :vocab], target, IGNORE).sum()
                p = logits[:, :vocab]
            else:
                logits = (xc @ weight.t()).float()
                valid = (target != IGNORE)[:, None]
                index = target.clamp(min=0)[:, None]
                lse = torch.logsumexp(logits, dim=-1, keepdim=True)
                total = total + ((lse - logits.gather(1, index)) * valid).sum()
                p = (logits - lse).exp_().scatter_add_(1, index, -valid.float()).mul_(valid).to(x.dtype)
            if grad is not None and kernel and aligned < vocab:   # an aligned product, then the tail's
                torch.mm(p[:, :aligned], weight[:aligned], out=grad[start:start + rows])
                grad[start:start + rows].addmm_(p[:, aligned:], weight[aligned:])
            elif grad is not None:
                torch.mm(p, weight, out=grad[start:start + rows])
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None


def chunked_cross_entropy(x, weight, targets, kernel: bool = False, rows: int | None = None) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets, ignore_index=IGNORE, reduction="sum")`, computed in
    chunks of `rows` rows (default: at most HEAD_LOGITS logits each). `kernel`: the GPU path, with
    the Triton kernel (kernels.available must hold for x's device)."""
    rows = rows or max(1, HEAD_LOGITS // weight.shape[0])
    return _ChunkedCrossEntropy.apply(x, weight, targets, rows, kernel)
