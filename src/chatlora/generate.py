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

from dataclasses import dataclass, replace

import inspect

import torch

from chatlora.fastdecode import penalize, static_decoder


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
    """Several prompts decoded together (left-padded, one forward per token for all rows); each row
    has its own sampling, stops on its own, and can be dropped by `should_stop(row)`. Yields
    `(row, token)`; `finish_reasons[row]` is set when a row ends. Greedy rows give the same tokens
    as `Generation` alone (tested)."""

    def __init__(self, model, prompts: list[list[int]], stop_ids, samplings: list[Sampling], pad_id: int = 0,
                 should_stop=lambda row: False):
        self.model, self.prompts, self.stop_ids, self.samplings = model, prompts, set(stop_ids), samplings
        self.pad_id, self.should_stop = pad_id, should_stop
        self.device = next(model.parameters()).device
        self.generators = []
        for s in samplings:
            g = torch.Generator(device=self.device)
            g.manual_seed(s.seed) if s.seed is not None else g.seed()
            self.generators.append(g)
        self.finish_reasons: list[str | None] = [None] * len(prompts)

    @torch.inference_mode()
    def __iter__(self):
        from transformers import DynamicCache

        rows, width = len(self.prompts), max(len(p) for p in self.prompts)
        ids = torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros((rows, width), dtype=torch.long, device=self.device)
        for r, p in enumerate(self.prompts):
            ids[r, width - len(p):] = torch.tensor(p, device=self.device)
            mask[r, width - len(p):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        counts = [0] * rows
        decoder = static_decoder(self.model)
        if decoder is not None:  # static cache + CUDA graphs (fastdecode.py): same operations, fewer launches
            last = decoder.start(ids, mask, positions, max(s.max_new_tokens for s in self.samplings))
        else:
            decode = _decode_kwargs(self.model, DynamicCache())
            last = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **decode).logits[:, -1]
        # Which ids each row has seen, and its repetition penalty: applied to all rows at once.
        seen = torch.zeros((rows, last.shape[-1]), dtype=torch.bool, device=self.device)
        for r, p in enumerate(self.prompts):
            seen[r, torch.tensor(p, device=self.device)] = True
        penalty = torch.tensor([[s.repetition_penalty] for s in self.samplings], device=self.device)
        if decoder is not None and all(s.temperature == 0 for s in self.samplings):
            yield from self._greedy_on_device(decoder, last, seen, penalty, positions[:, -1] + 1, counts)
            return
        every_row = torch.arange(rows, device=self.device)
        sampled = [(r, replace(s, repetition_penalty=1.0)) for r, s in enumerate(self.samplings) if s.temperature != 0]
        while True:
            logits = penalize(last.float(), seen, penalty)
            picks = logits.argmax(-1)
            for r, s in sampled:   # next_token's filters after the penalty, on the device
                if self.finish_reasons[r] is None:
                    picks[r:r + 1] = draw(logits[r], _NONE_SEEN, s, self.generators[r])
            picks = picks.tolist()  # one host sync a step for every row
            tokens = [self._step(r, picks[r], counts) if self.finish_reasons[r] is None
                      else self.pad_id for r in range(rows)]
            if all(f is not None for f in self.finish_reasons):
                return
            for r, token in enumerate(tokens):
                if self.finish_reasons[r] is None:
                    yield r, token
            step = torch.tensor(tokens, device=self.device)
            seen[every_row, step] = True
            positions = positions[:, -1:] + 1
            if decoder is not None:
                last = decoder.step(step, positions[:, 0])
                continue
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long, device=self.device)], dim=1)
            last = self.model(input_ids=step[:, None], attention_mask=mask, position_ids=positions, **decode).logits[:, -1]

    def _greedy_on_device(self, decoder, last, seen, penalty, positions, counts):
        """All rows greedy: the decoder picks on the GPU and runs a step ahead of this loop."""
        rows = len(self.prompts)
        for tokens in decoder.greedy(last, seen, penalty, positions, max(s.max_new_tokens for s in self.samplings)):
            for r, token in enumerate(tokens):
                if self.finish_reasons[r] is None:
                    token = self._step(r, token, counts)
                    if self.finish_reasons[r] is None:
                        yield r, token
            if all(f is not None for f in self.finish_reasons):
                return
        for r in range(rows):  # every row has its max_new_tokens
            if self.finish_reasons[r] is None:
                self.finish_reasons[r] = "length"

    def _step(self, r: int, token: int, counts) -> int:
        """Row r's next token (its pick), or finish the row (then its token is padding)."""
        s = self.samplings[r]
        if self.should_stop(r) or counts[r] >= s.max_new_tokens:
            self.finish_reasons[r] = "length"
            return self.pad_id
        if token in self.stop_ids:
            self.finish_reasons[r] = "stop"
            return self.pad_id
        counts[r] += 1
        return token


_NONE_SEEN = torch.zeros(0, dtype=torch.long)


def generate_ids(model, prompt_ids: list[int], stop_ids, sampling: Sampling) -> tuple[list[int], str]:
    """All generated ids at once (no stop id included) and the finish reason."""
    gen = Generation(model, prompt_ids, stop_ids, sampling)
    tokens = list(gen)
    return tokens, gen.finish_reason
