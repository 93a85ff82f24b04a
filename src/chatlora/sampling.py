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
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))   # (masks, not boolean indexing:
    if s.top_p < 1.0:                                               # no host sync on a GPU)
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - s.top_p
        remove[-1] = False  # always keep the most likely token
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(0, order, remove), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)


def penalize(logits, seen, penalty):
    """The repetition penalty for rows at once (`next_token`'s rule): logits of ids `seen`
    ([B, vocab] bool) divided by the row's penalty ([B, 1]) where positive, multiplied where not."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
