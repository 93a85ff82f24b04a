"""The token engine: prompt ids in, generated ids out, one at a time. Knows no text and no HTTP.

Sampling follows Hugging Face's order and definitions (so greedy output equals `model.generate`'s,
tested): repetition penalty over every id already in the sequence (logit / p if positive, * p if
negative), then temperature, top-k, top-p; temperature 0 is greedy.

    gen = Generation(model, prompt_ids, stop_ids=[2], sampling=Sampling(temperature=0))
    for token in gen:
        ...
    gen.finish_reason   # "stop" (a stop id came; it is not yielded) or "length"
"""

from __future__ import annotations

from dataclasses import dataclass

import inspect

import torch


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
    logits = logits.float()
    if s.repetition_penalty != 1.0 and seen.numel():
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / s.repetition_penalty, picked * s.repetition_penalty)
    if s.temperature == 0:
        return int(logits.argmax())
    logits = logits / s.temperature
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.numel())).values[-1]
        logits[logits < kth] = float("-inf")
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - s.top_p
        remove[-1] = False  # always keep the most likely token
        logits[order[remove]] = float("-inf")
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_argument(model) -> str:
    """The forward() keyword for the KV cache: `cache` from transformers 5.2x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


class Generation:
    """An iterator over generated ids with a KV cache; `finish_reason` is set when it ends."""

    def __init__(self, model, prompt_ids: list[int], stop_ids, sampling: Sampling):
        self.model, self.prompt, self.stop_ids, self.s = model, list(prompt_ids), set(stop_ids), sampling
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device)
        if sampling.seed is not None:
            self.generator.manual_seed(sampling.seed)
        else:
            self.generator.seed()
        self.finish_reason: str | None = None
        self.tokens: list[int] = []

    @torch.inference_mode()
    def __iter__(self):
        from transformers import DynamicCache

        ids = torch.tensor([self.prompt], device=self.device)
        seen = torch.tensor(sorted(set(self.prompt)), dtype=torch.long, device=self.device)
        cache = {_cache_argument(self.model): DynamicCache()}  # filled in place by every forward
        out = self.model(input_ids=ids, use_cache=True, **cache)
        for _ in range(self.s.max_new_tokens):
            token = next_token(out.logits[0, -1], seen, self.s, self.generator)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(token)
            yield token
            if token not in seen:
                seen = torch.cat([seen, torch.tensor([token], device=self.device)])
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), use_cache=True, **cache)
        self.finish_reason = "length"


def generate_ids(model, prompt_ids: list[int], stop_ids, sampling: Sampling) -> tuple[list[int], str]:
    """All generated ids at once (no stop id included) and the finish reason."""
    gen = Generation(model, prompt_ids, stop_ids, sampling)
    tokens = list(gen)
    return tokens, gen.finish_reason
