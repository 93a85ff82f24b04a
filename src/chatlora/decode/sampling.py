"""How a next id is picked from logits, in Hugging Face's order and definitions (so greedy output
equals `model.generate`'s, tested): the repetition penalty over every id already in the sequence
(logit / p if positive, * p if negative), then temperature, top-k, top-p; temperature 0 is greedy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NONE_SEEN = torch.zeros(0, dtype=torch.long)   # `draw`'s seen ids where the penalty is already applied



@dataclass
class Sampling:
    max_new_tokens: int = 300
    temperature: float = 0.3
    top_k: int = 5
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    seed: int | None = None

    @classmethod
    def from_config(cls, g, **changes) -> "Sampling":
        values = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                      top_p=g.top_p, repetition_penalty=g.repetition_penalty)
        values.update({k: v for k, v in changes.items() if v is not None})
        return cls(**values)


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator) -> int:
    """Pick one id from the last position's logits [vocab] given the ids `seen` so far."""
    return int(draw(logits, seen, s, generator))


def draw(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """`next_token` without reading the pick back: a one-element tensor on the logits' device, so that
    a batch's rows are all drawn before one host sync."""
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if s.temperature == 0:
        return logits.argmax().reshape(1)
    return RowSampler([s], [generator], logits.shape[-1], logits.device).draw(logits[None])


class RowSampler:
    """Rows that sample (temperature > 0) drawn together, each with its own temperature, top-k, top-p
    and generator: one top-k over the vocabulary for all rows (the largest k of them), then each
    row's filters over those candidates (`draw` is this with one row, so a row draws the same ids
    alone or in any batch; a seeded row repeats itself). top-k keeps exactly k ids (Hugging Face's
    keeps ties with the k-th too); top-p is Hugging Face's: ascending order, cumulative softmax,
    drop while at most 1 - p, always keep the most likely. The pick is the first id whose cumulative
    probability passes a uniform number from the row's generator. A batch of 16 rows costs a few
    kernels, where drawing row by row cost ~1.2 ms per row and step on an H200 (bench/NOTES.md)."""

    def __init__(self, samplings: list[Sampling], generators, vocab: int, device):
        ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in samplings]
        self.width, self.generators, self.device = max(ks), generators, device
        self.temperature = torch.tensor([[s.temperature] for s in samplings], device=device)
        self.top_k = torch.tensor(ks, device=device)[:, None]
        self.top_p = torch.tensor([[s.top_p] for s in samplings], device=device)
        self.filter_p = any(s.top_p < 1.0 for s in samplings)

    def draw(self, logits: torch.Tensor) -> torch.Tensor:
        """Ids [R] from logits [R, vocab] (fp32, repetition penalty already applied)."""
        values, ids = torch.topk(logits / self.temperature, self.width, dim=-1)   # largest first
        ranks = torch.arange(self.width, device=self.device)[None]
        values = values.masked_fill(ranks >= self.top_k, float("-inf"))
        if self.filter_p:
            ascending = values.flip(-1)
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False
            values = ascending.masked_fill(drop, float("-inf")).flip(-1)
        cdf = values.softmax(-1).cumsum(-1)
        u = torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])
        pick = torch.searchsorted(cdf, (u[:, None] * cdf[:, -1:]).contiguous(), right=True)
        return ids.gather(1, pick.clamp_(max=self.width - 1))[:, 0]


def penalize(logits, seen, penalty):
    """The repetition penalty for rows at once (`next_token`'s rule): logits of ids `seen`
    ([B, vocab] bool) divided by the row's penalty ([B, 1]) where positive, multiplied where not."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
