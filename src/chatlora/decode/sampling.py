"""How a next id is picked from logits, in Hugging Face's order and definitions (so greedy output
equals `model.generate`'s, tested): the repetition penalty over every id already in the sequence
(logit / p if positive, * p if negative), then temperature, top-k, top-p; temperature 0 is greedy.

One penalty (`penalize`) and one greedy-or-sample decision (`Picks`) serve every path: the decode
loop's rows (loop.py) and a single pick (`draw`, `next_token`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatlora.config import GenerateConfig

_DEFAULTS = GenerateConfig()   # the one source of the defaults: the config's generate group


@dataclass
class Sampling:
    max_new_tokens: int = _DEFAULTS.max_new_tokens
    temperature: float = _DEFAULTS.temperature
    top_k: int = _DEFAULTS.top_k
    top_p: float = _DEFAULTS.top_p
    repetition_penalty: float = _DEFAULTS.repetition_penalty
    seed: int | None = None

    @classmethod
    def from_config(cls, g: GenerateConfig, **changes) -> "Sampling":
        values = dict(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_k=g.top_k,
                      top_p=g.top_p, repetition_penalty=g.repetition_penalty)
        values.update({k: v for k, v in changes.items() if v is not None})
        return cls(**values)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def penalize(logits, seen, penalty):
    """The repetition penalty for rows at once: logits [B, vocab] of ids `seen` ([B, vocab] bool)
    divided by the row's penalty ([B, 1]) where positive, multiplied where not."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


class Picks:
    """The one greedy-or-sample decision for a batch of rows: each row's argmax, except the rows that
    sample (temperature > 0), which draw together (RowSampler) with their own settings and generators.

        picks = Picks(samplings, generators, vocab, device)
        ids = picks.choose(penalized)                 # [rows]
        picks.choose(penalized, greedy=ids_on_device) # the argmax already taken (the decoder's step)
    """

    def __init__(self, samplings: list[Sampling], generators, vocab: int, device):
        self.sampled = [i for i, s in enumerate(samplings) if not s.greedy]
        self.index = torch.tensor(self.sampled, device=device) if self.sampled else None
        self.sampler = RowSampler([samplings[i] for i in self.sampled], [generators[i] for i in self.sampled],
                                  vocab, device) if self.sampled else None

    def choose(self, penalized, greedy=None):
        """Ids [rows] from penalized logits [rows, vocab] (fp32); `greedy` (written into) holds the
        rows' argmax when the caller has it already."""
        picks = penalized.argmax(-1) if greedy is None else greedy
        if self.sampler is not None:
            picks[self.index] = self.sampler.draw(penalized[self.index])
        return picks


def draw(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator) -> torch.Tensor:
    """One pick from logits [vocab] given the ids `seen` so far ([n] ids), without reading it back:
    a one-element tensor on the logits' device (the decode loop's rule for a batch of one)."""
    logits = logits.float()[None]
    if s.repetition_penalty != 1.0 and seen.numel():
        mask = torch.zeros_like(logits, dtype=torch.bool)
        mask[0, seen.to(logits.device)] = True
        logits = penalize(logits, mask, torch.tensor([[s.repetition_penalty]], device=logits.device))
    return Picks([s], [generator], logits.shape[-1], logits.device).choose(logits)


def next_token(logits: torch.Tensor, seen: torch.Tensor, s: Sampling, generator) -> int:
    """`draw`, read back."""
    return int(draw(logits, seen, s, generator))


class RowSampler:
    """Rows that sample (temperature > 0) drawn together, each with its own temperature, top-k, top-p
    and generator: one top-k over the vocabulary for all rows (the largest k of them), then each
    row's filters over those candidates (a row draws the same ids alone or in any batch; a seeded
    row repeats itself). top-k keeps exactly k ids (Hugging Face's keeps ties with the k-th too);
    top-p is Hugging Face's: ascending order, cumulative softmax, drop while at most 1 - p, always
    keep the most likely. The pick is the first id whose cumulative probability passes a uniform
    number from the row's generator. A batch of 16 rows costs a few kernels, where drawing row by
    row cost ~1.2 ms per row and step on an H200 (bench/NOTES.md)."""

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
