"""The token engine: prompt ids in, generated ids out, one at a time. Knows no text and no HTTP.

Every generation is the decode loop (loop.py) over the model's backend: the static decoder on a GPU
where it applies (static.py), transformers' forward otherwise (plain.py). Picks follow sampling.py
(Hugging Face's order and definitions: greedy output equals `model.generate`'s, tested).

    gen = Generation(model, prompt_ids, stop_ids=[2], sampling=Sampling(temperature=0))
    for token in gen:
        ...
    gen.finish_reason   # "stop" (a stop id came; it is not yielded) or "length"

    batch = BatchGeneration(model, prompts, stop_ids, samplings)   # yields (row, token)
    warm_up(model, rows=16)        # the server: capture what serving up to 16 rows meets, first
"""

from __future__ import annotations

import torch

from chatlora.decode.loop import DecodeLoop, Request
from chatlora.decode.plain import PlainDecoder
from chatlora.decode.sampling import Sampling, draw, next_token
from chatlora.decode.static import Options, static_decoder, use_options

__all__ = ["BatchGeneration", "Generation", "Sampling", "configure", "draw", "generate_ids", "next_token",
           "warm_up"]


class BatchGeneration:
    """Several prompts decoded together; each row has its own sampling, stops on its own, and can be
    dropped by `should_stop(row)`. Yields `(row, token)`; `finish_reasons[row]` is set when a row
    ends ("stop": a stop id came, not yielded; "length"), and `on_finish(row, reason)` told. Greedy
    rows give the same tokens as `Generation` alone (tested).

    On a GPU, `admit(room)`, called between steps, may hand over up to `room` more `(prompt,
    sampling)` pairs, rows len(prompts), len(prompts) + 1, ..., which join the running rows
    (continuous batching); with transformers' forward it is not called. At most `max_rows` decode
    at once (more prompts wait for a free row)."""

    def __init__(self, model, prompts: list[list[int]], stop_ids, samplings: list[Sampling], pad_id: int = 0,
                 should_stop=lambda row: False, admit=None, max_rows: int | None = None, on_finish=None):
        self.model, self.stop_ids, self.pad_id = model, set(stop_ids), pad_id
        self.should_stop, self.admit, self.on_finish = should_stop, admit, on_finish
        self.max_rows = max_rows or len(prompts)
        self.device = next(model.parameters()).device
        self.requests = [self._request(p, s) for p, s in zip(prompts, samplings)]
        self.finish_reasons: list[str | None] = [None] * len(prompts)

    def _ended(self, row: int, reason: str) -> None:
        self.finish_reasons += [None] * (row + 1 - len(self.finish_reasons))
        self.finish_reasons[row] = reason
        if self.on_finish is not None:
            self.on_finish(row, reason)

    @property
    def generators(self) -> list[torch.Generator]:
        return [r.generator for r in self.requests]

    @generators.setter
    def generators(self, generators) -> None:
        for r, g in zip(self.requests, generators):
            r.generator = g

    def _request(self, prompt: list[int], s: Sampling) -> Request:
        g = torch.Generator(device=self.device)
        g.manual_seed(s.seed) if s.seed is not None else g.seed()
        return Request(list(prompt), s, g)

    @torch.inference_mode()
    def __iter__(self):
        backend = static_decoder(self.model) or PlainDecoder(self.model, self.pad_id)
        admit = self.admit and (lambda room: [self._request(p, s) for p, s in self.admit(room)])
        yield from DecodeLoop(backend, self.requests, self.stop_ids, self.max_rows, self.should_stop,
                              self._ended, admit)


class Generation:
    """One prompt's generated ids, one at a time (a batch of one); `finish_reason` is set when it ends."""

    def __init__(self, model, prompt_ids: list[int], stop_ids, sampling: Sampling):
        self.batch = BatchGeneration(model, [prompt_ids], stop_ids, [sampling])
        self.generator = self.batch.generators[0]
        self.finish_reason: str | None = None
        self.tokens: list[int] = []

    def __iter__(self):
        for _, token in self.batch:
            self.tokens.append(token)
            yield token
        self.finish_reason = self.batch.finish_reasons[0]


def generate_ids(model, prompt_ids: list[int], stop_ids, sampling: Sampling) -> tuple[list[int], str]:
    """All generated ids at once (no stop id included) and the finish reason."""
    gen = Generation(model, prompt_ids, stop_ids, sampling)
    tokens = list(gen)
    return tokens, gen.finish_reason


def configure(model, settings) -> None:
    """How `model` decodes, from a run's `generate` settings (`decoder`, `kernels`)."""
    use_options(model, Options(static=settings.decoder == "auto", kernels=settings.kernels))


def warm_up(model, rows: int) -> float | None:
    """Captures, on a GPU, what decoding up to `rows` rows at once first meets (steps, prefills, the
    kernels' compiles), so that no request waits for them; returns the seconds it took, or None where
    there is nothing to capture (no GPU decoder)."""
    import time

    decoder = static_decoder(model)
    if decoder is None:
        return None
    began = time.monotonic()
    decoder.warm_up(rows)
    return time.monotonic() - began
