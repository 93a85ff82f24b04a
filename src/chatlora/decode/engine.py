"""The token engine: prompt ids in, generated ids out, one at a time. Knows no text and no HTTP.

Picks follow sampling.py (Hugging Face's order and definitions: greedy output equals
`model.generate`'s, tested).

    gen = Generation(model, prompt_ids, stop_ids=[2], sampling=Sampling(temperature=0))
    for token in gen:
        ...
    gen.finish_reason   # "stop" (a stop id came; it is not yielded) or "length"
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import torch

from chatlora.decode.loop import Batcher, Request, left_padded
from chatlora.decode.sampling import NONE_SEEN, Sampling, draw, next_token, penalize
from chatlora.decode.static import static_decoder

__all__ = ["BatchGeneration", "Generation", "Sampling", "draw", "generate_ids", "next_token"]


def _decode_kwargs(model, cache) -> dict:
    """forward() keywords for decoding: the KV cache (`cache` from transformers 5.2x, `past_key_values`
    before) and, where supported, logits for the last position only (as `generate` does: the prefill
    then skips the vocabulary projection of every prompt position)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


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

        if static_decoder(self.model) is not None:  # GPU: the captured decoder, through the batched loop
            batch = BatchGeneration(self.model, [self.prompt], self.stop_ids, [self.s])
            batch.generators = [self.generator]
            for _, token in batch:
                self.tokens.append(token)
                yield token
            self.finish_reason = batch.finish_reasons[0]
            return
        ids = torch.tensor([self.prompt], device=self.device)
        seen = torch.tensor(sorted(set(self.prompt)), dtype=torch.long, device=self.device)
        decode = _decode_kwargs(self.model, DynamicCache())  # the cache is filled in place by every forward
        out = self.model(input_ids=ids, **decode)
        for _ in range(self.s.max_new_tokens):
            token = next_token(out.logits[0, -1], seen, self.s, self.generator)
            if token in self.stop_ids:
                self.finish_reason = "stop"
                return
            self.tokens.append(token)
            yield token
            if token not in seen:
                seen = torch.cat([seen, torch.tensor([token], device=self.device)])
            out = self.model(input_ids=torch.tensor([[token]], device=self.device), **decode)
        self.finish_reason = "length"


class BatchGeneration:
    """Several prompts decoded together; each row has its own sampling, stops on its own, and can be
    dropped by `should_stop(row)`. Yields `(row, token)`; `finish_reasons[row]` is set when a row
    ends ("stop": a stop id came, not yielded; "length"), and `on_finish(row, reason)` told. Greedy
    rows give the same tokens as `Generation` alone (tested).

    With the GPU decoder (fastdecode.py) this is continuous batching (batcher.py): `admit(room)`,
    called between steps, may hand over up to `room` more `(prompt, sampling)` pairs, which join the
    running rows as rows len(prompts), len(prompts) + 1, ...; at most `max_rows` decode at once.
    Without the decoder the prompts run as one left-padded batch and `admit` is not called."""

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
        decoder = static_decoder(self.model)
        if decoder is not None:  # static cache + CUDA graphs (fastdecode.py): requests join and leave
            admit = self.admit and (lambda room: [self._request(p, s) for p, s in self.admit(room)])
            yield from Batcher(decoder, self.requests, self.stop_ids, self.max_rows, self.should_stop,
                               self._ended, admit)
            return
        yield from self._eager()

    def _eager(self):
        """transformers' forward with a DynamicCache: one left-padded batch, one forward per token."""
        from transformers import DynamicCache

        reqs, rows = self.requests, len(self.requests)
        ids, mask = (t.to(self.device) for t in left_padded([r.prompt for r in reqs], self.pad_id))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        decode = _decode_kwargs(self.model, DynamicCache())
        last = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **decode).logits[:, -1]
        # Which ids each row has seen, and its repetition penalty: applied to all rows at once.
        seen = torch.zeros((rows, last.shape[-1]), dtype=torch.bool, device=self.device)
        for r, req in enumerate(reqs):
            seen[r, torch.tensor(req.prompt, device=self.device)] = True
        penalty = torch.tensor([[r.sampling.repetition_penalty] for r in reqs], device=self.device)
        every_row = torch.arange(rows, device=self.device)
        sampled = [(r, replace(req.sampling, repetition_penalty=1.0)) for r, req in enumerate(reqs)
                   if req.sampling.temperature != 0]
        while True:
            logits = penalize(last.float(), seen, penalty)
            picks = logits.argmax(-1)
            for r, s in sampled:   # next_token's filters after the penalty, on the device
                if self.finish_reasons[r] is None:
                    picks[r:r + 1] = draw(logits[r], NONE_SEEN, s, reqs[r].generator)
            picks = picks.tolist()  # one host sync a step for every row
            tokens = [self._step(r, picks[r]) if self.finish_reasons[r] is None else self.pad_id
                      for r in range(rows)]
            if all(f is not None for f in self.finish_reasons):
                return
            for r, token in enumerate(tokens):
                if self.finish_reasons[r] is None:
                    yield r, token
            step = torch.tensor(tokens, device=self.device)
            seen[every_row, step] = True
            positions = positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long, device=self.device)], dim=1)
            last = self.model(input_ids=step[:, None], attention_mask=mask, position_ids=positions, **decode).logits[:, -1]

    def _step(self, r: int, token: int) -> int:
        """Row r's next token (its pick), or finish the row (then its token is padding)."""
        req = self.requests[r]
        if self.should_stop(r) or req.count >= req.sampling.max_new_tokens:
            self._ended(r, "length")
            return self.pad_id
        if token in self.stop_ids:
            self._ended(r, "stop")
            return self.pad_id
        req.count += 1
        return token


def generate_ids(model, prompt_ids: list[int], stop_ids, sampling: Sampling) -> tuple[list[int], str]:
    """All generated ids at once (no stop id included) and the finish reason."""
    gen = Generation(model, prompt_ids, stop_ids, sampling)
    tokens = list(gen)
    return tokens, gen.finish_reason
