"""The packed row that one fused training pass reads (train/fused.py): a step's examples laid end to
end in one int64 vector, padded to a bucket shape so that a few shapes repeat and each is captured
as a CUDA graph once.

    shape = pass_shape(examples)        # PassShape(tokens, supervised, sequences)
    row = host_row(examples, shape)     # built on the host, copied into the captured pass's input
    parts = row_parts(row, shape)       # named views: ids, positions, segments, supervised, targets, starts

Tokens take multiples of `BUCKET_TOKENS` (coarser for long rows, `bucket`), supervised positions
halves of that, sequence slots powers of two.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from chatlora.templates import IGNORE
from chatlora.train.steps import supervised_count, targets_of

BUCKET_TOKENS = 128
BUCKET_SUPERVISED = 64
SUPERVISED_PARTS = 2     # supervised positions are padded to a multiple of tokens / SUPERVISED_PARTS


class PassShape(NamedTuple):
    """The padded shape of one pass (`pass_shape`): each shape is captured once."""
    tokens: int       # the packed row's length
    supervised: int   # supervised positions (the vocabulary projection's rows)
    sequences: int    # sequence slots for attention: the examples, the padding, then empty slots


def bucket(n: int, minimum: int) -> int:
    """n rounded up to a multiple of `minimum`, or of 1/16-1/8 of n when that is coarser: a few
    shapes cover any mix of lengths (each new shape costs one capture) at a bounded padding share."""
    step = max(minimum, 1 << max(0, n.bit_length() - 4))
    return max(step, -(-n // step) * step)


def pass_shape(examples) -> PassShape:
    """The padded shape of a pass over `examples`. Supervised positions only size the vocabulary
    projection (~1.2 us per row of a 25 ms step at the Index-1.9B shape on the H200), so they take
    coarse steps of half the token bucket: each new shape costs a capture (0.3-0.5 s), and halves
    leave the self-llm job 12 shapes where eighths left 22, for ~0.1 ms more per step.
    Sequence slots hold the examples and the padding (at least 16, doubling): empty slots cost the
    flash kernel nothing, and the self-llm job's passes all take 32."""
    tokens = bucket(sum(len(e.input_ids) for e in examples), BUCKET_TOKENS)
    step = max(BUCKET_SUPERVISED, tokens // SUPERVISED_PARTS)
    supervised = min(tokens, -(-supervised_count(examples) // step) * step)
    return PassShape(tokens, supervised, max(16, 1 << len(examples).bit_length()))


def host_row(examples, shape: PassShape) -> torch.Tensor:
    """One pass's inputs as a single int64 vector: ids, positions, segment of each token (padding:
    segment -1), supervised positions and their targets (padding: position 0, target IGNORE), then
    where each sequence slot starts and the row's length (the examples, the padding, empty slots)."""
    ids, pos, seg, tgt, starts = [], [], [], [], [0]
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids += e.input_ids
        pos += range(n)
        seg += [i] * n
        tgt += targets_of(e.labels)
        starts.append(len(ids))
    sup = [i for i, t in enumerate(tgt) if t != IGNORE]
    sup_tgt = [tgt[i] for i in sup]
    pad = shape.tokens - len(ids)
    ids += [0] * pad
    pos += range(pad)
    seg += [-1] * pad
    sup += [0] * (shape.supervised - len(sup))
    sup_tgt += [IGNORE] * (shape.supervised - len(sup_tgt))
    starts += [shape.tokens] * (shape.sequences + 1 - len(starts))
    return torch.tensor(ids + pos + seg + sup + sup_tgt + starts, dtype=torch.long)


def row_parts(row, shape: PassShape) -> dict[str, torch.Tensor]:
    """`host_row`'s vector cut into `FusedForward.loss_sum`'s named inputs."""
    names = ("ids", "positions", "segments", "supervised", "targets", "starts")
    sizes = (shape.tokens,) * 3 + (shape.supervised,) * 2 + (shape.sequences + 1,)
    return dict(zip(names, row.split(sizes)))
