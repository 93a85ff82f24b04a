"""One optimizer step's passes through the fused training pass (train/fused.py), and held-out
evaluation through its forward pass, each bucket shape captured once as a CUDA graph and replayed.

    step = FusedStep(peft_model, device, graphs=True)
    step.zero_grad()
    loss = step.accumulate(examples, micro_batch_examples=16, max_tokens=2048)   # into the peft parameters' .grad
    held_out = step.held_out_loss_sum(examples, 16, 2048)                        # forward passes only

A shape is captured on its second pass; its first runs eagerly on the capture stream, which warms
the shape up for its capture. On the H200 a capture cost 0.3-0.5 s against ~0.1 s for an eager
pass, and the self-llm job's 687 steps meet 5 of their 12 shapes once; the held-out set's passes,
the same at every evaluation, replay from the third evaluation on.

A capture can fail for reasons outside the pass (seen on fresh machines: the stream capture
invalidated midway, cudaErrorStreamCaptureInvalidated). The failed capture's state is undone (the
allocator's routing into the graph pool, the RNG generator's capture mode, the current stream, the
gradients the warm-ups added) and the shape is captured once more; if that fails too, that shape's
passes run eagerly, with a warning: the same arithmetic, more launches.
"""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import torch

from chatlora.train.fused import FusedForward
from chatlora.train.packed_row import PassShape, host_row, pass_shape, row_parts
from chatlora.train.steps import micro_batches, supervised_count

CAPTURE_TRIES = 2    # per bucket shape, before its passes run eagerly
CAPTURE_AT_USE = 2   # a shape's passes run eagerly until this one, which is captured and replayed


class GraphKey(NamedTuple):
    """What a captured pass computes: its bucket shape, and whether it runs backward (training) or
    the forward pass alone (held-out evaluation, no dropout)."""
    shape: PassShape
    backward: bool


@dataclass
class Captured:
    """One bucket shape's pass, captured: its input buffer, the graph, the loss it leaves."""
    row: torch.Tensor
    graph: torch.cuda.CUDAGraph
    loss: torch.Tensor


class FusedStep:
    """Forward + backward of one optimizer step's examples through `FusedForward`, pass by pass,
    with the loss normalization of `gradients.accumulate_gradients` (sum / supervised tokens of the step).
    `graphs=True` (CUDA) captures each bucket shape on its `capture_at_use`-th pass and replays it
    from then on; `checkpoint=True` recomputes each layer in backward (memory for speed)."""

    def __init__(self, model, device, graphs: bool = False, checkpoint: bool = False,
                 capture_at_use: int = CAPTURE_AT_USE):
        self.net = FusedForward(model)
        self.device = torch.device(device)
        self.graphs, self.checkpoint, self.capture_at_use = graphs, checkpoint, capture_at_use
        self.divisor = torch.ones((), device=self.device)
        self._captured: dict[GraphKey, Captured | None] = {}   # None: the capture failed, run eagerly
        self._eager_passes: Counter[GraphKey] = Counter()       # on the capture stream, before the capture
        self.capture_failures: list[str] = []                   # what each failed capture raised
        self._pool = None
        self._side = None

    def zero_grad(self) -> None:
        self.net.flat.grad.zero_()

    def clip_grad_norm_(self, max_norm: float | None) -> torch.Tensor:
        """`torch.nn.utils.clip_grad_norm_` over the adapter gradients, on the one flat buffer
        (the total norm is the flat gradient's norm): two kernels instead of one per parameter."""
        grad = self.net.flat.grad
        norm = torch.linalg.vector_norm(grad)
        if max_norm is not None:
            grad.mul_((max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def accumulate(self, examples, micro_batch_examples: int, max_tokens: int | None,
                   supervised: int | None = None) -> torch.Tensor:
        """Backward over the step's examples (loss divided by `supervised`, default: theirs); returns
        the step's loss (0-d tensor, no host sync)."""
        self.divisor.fill_(supervised or supervised_count(examples))
        total = torch.zeros((), device=self.device)
        for chunk in micro_batches(examples, micro_batch_examples, max_tokens):
            shape = pass_shape(chunk)
            total = total + self._run(GraphKey(shape, backward=True), host_row(chunk, shape))
        return total

    def held_out_loss_sum(self, examples, micro_batch_examples: int, max_tokens: int | None) -> torch.Tensor:
        """Sum of cross-entropies over every supervised token of `examples`, forward passes only, no
        dropout and no gradients (0-d tensor, no host sync): evaluation at the fused pass's speed.
        A forward pass keeps nothing for backward, so each takes every example `max_tokens` allows
        (the self-llm job's 75 held-out examples: 3 passes, not 5 of 16 examples)."""
        total = torch.zeros((), device=self.device)
        with torch.no_grad():
            for chunk in micro_batches(examples, len(examples) if max_tokens else micro_batch_examples, max_tokens):
                shape = pass_shape(chunk)
                total = total + self._run(GraphKey(shape, backward=False), host_row(chunk, shape))
        return total

    def _run(self, key: GraphKey, row: torch.Tensor) -> torch.Tensor:
        """One pass over the host row `row`: its captured graph replayed, or an eager pass."""
        captured = self._graph(key, row) if self.graphs else None
        if captured is None:
            return self._eager(key, row.to(self.device))
        captured.row.copy_(row.pin_memory(), non_blocking=True)
        captured.graph.replay()
        return captured.loss.clone()

    def _pass(self, key: GraphKey, row: torch.Tensor) -> torch.Tensor:
        """The pass itself: the loss (training: divided by the step's supervised count, gradients
        added into the flat buffer's), detached."""
        if not key.backward:
            return self.net.loss_sum(**row_parts(row, key.shape), dropout=False)
        loss = self.net.loss_sum(**row_parts(row, key.shape), checkpoint=self.checkpoint) / self.divisor
        loss.backward()
        return loss.detach()

    def _eager(self, key: GraphKey, row: torch.Tensor) -> torch.Tensor:
        """An eager pass; with graphs on, on the capture stream, where it warms the shape up for its capture."""
        if not self.graphs:
            return self._pass(key, row)
        self._eager_passes[key] += 1
        return self._on_side_stream(lambda: self._pass(key, row))

    def _on_side_stream(self, work):
        if self._side is None:  # one stream for every eager pass before a capture: each new stream
            self._side = torch.cuda.Stream()  # costs cuBLAS a workspace it keeps (measured: +64 MiB per capture)
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            result = work()
        torch.cuda.current_stream().wait_stream(self._side)
        return result

    def _graph(self, key: GraphKey, row: torch.Tensor) -> Captured | None:
        """The captured pass for `key` (captured on its `capture_at_use`-th pass), or None: met fewer
        times than that (the caller runs it eagerly), or its capture failed `CAPTURE_TRIES` times
        (its passes then run eagerly)."""
        if key not in self._captured:
            if self._eager_passes[key] < self.capture_at_use - 1:
                return None
            saved = self.net.flat.grad.clone()
            static = row.to(self.device)
            self._warm_up(key, static)
            captured = None
            for _ in range(CAPTURE_TRIES):
                before = torch.cuda.current_stream()
                try:
                    captured = self._capture(key, static)
                    break
                except RuntimeError as error:   # what CUDA or torch raised while capturing
                    failure = str(error).splitlines()[0]
                    self.capture_failures.append(f"{key}: {error}")
                    self._undo_failed_capture(before)
            self.net.flat.grad.copy_(saved)   # the warm-ups' gradients (and a failed capture's)
            if captured is None:
                warnings.warn(f"the CUDA graph of a {'training' if key.backward else 'held-out'} pass of "
                              f"shape {key.shape} could not be captured ({failure}); its passes run "
                              f"without a graph (the same arithmetic, slower)")
            self._captured[key] = captured
        return self._captured[key]

    def _warm_up(self, key: GraphKey, static: torch.Tensor) -> None:
        """Eager passes on the capture stream before a capture, their results discarded: the first
        capture comes after two passes, later ones after one (a shape's earlier eager passes count)."""
        wanted = 1 if self._captured else 2
        for _ in range(max(0, wanted - self._eager_passes[key])):
            self._on_side_stream(lambda: self._pass(key, static))

    def _capture(self, key: GraphKey, static: torch.Tensor) -> Captured:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # Captured on the warm-up stream: what the warm-ups left bound to their stream (cuBLAS
        # workspaces, autograd nodes that remember it) is then the capturing stream's own. On
        # torch's separate capture stream, a first capture on a fresh machine could be
        # invalidated (cudaErrorStreamCaptureImplicit, 2026-11-30, H200). "thread_local": a CUDA
        # call another thread makes meanwhile cannot invalidate this capture.
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side, capture_error_mode="thread_local"):
            loss = self._pass(key, static)
        return Captured(static, graph, loss)

    def _undo_failed_capture(self, stream: torch.cuda.Stream) -> None:
        """What a failed capture leaves behind, undone. torch ends the stream's capture on the way out,
        but where ending it fails it stops there: allocations would still be routed into the graph
        pool, the RNG generator would stay in capture mode ("Offset increment outside graph
        capture" on its next draw) and the capture stream would stay current. (Seen on the H200 with
        torch 2.11: a later capture into the same pool then failed with "already recording".)"""
        torch.cuda.set_stream(stream)
        try:
            torch._C._cuda_endAllocateToPool(self.device.index or 0, self._pool)
        except RuntimeError as error:   # e.g. already ended: the capture failed after torch's own clean-up
            self.capture_failures.append(f"ending the pool's routing: {error}")
        self._pool = None   # later captures share a fresh pool: the failed one may still be recording
        closing = torch.cuda.CUDAGraph()   # a capture that ends cleanly takes the generator out of capture mode
        with torch.cuda.graph(closing, stream=self._side):
            torch.zeros((), device=self.device).add_(1)
        del closing
        torch.cuda.synchronize(self.device)
