"""The decode loop's backend over transformers' own forward (the CPU, a model the static decoder does
not cover, or `generate.decoder: plain`): the row API of static.py over a DynamicCache.

Rows join together into an empty batch only (`accepts_joins` is False): their prompts are padded on
the left and prefilled as one batch; every step then runs one forward for all rows, the attention mask
growing by a column. A row that leaves keeps being computed, fed padding, until the batch ends (as
transformers' batched `generate` does); its results are not read. The picks are those of every
backend: the repetition penalty over each row's seen ids, then the argmax (sampling rows draw in the
loop). Greedy output equals `model.generate`'s (tests).
"""

from __future__ import annotations

import inspect

import torch

from chatlora.decode.sampling import penalize


def forward_kwargs(model, cache) -> dict:
    """forward() keywords for decoding: the KV cache (`cache` from transformers 5.2x, `past_key_values`
    before) and, where supported, logits for the last position only (as `generate` does: the prefill
    then skips the vocabulary projection of every prompt position)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    kwargs = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


class PlainDecoder:
    accepts_joins = False
    max_rows = 1024

    def __init__(self, model, pad_id: int = 0):
        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.vocab = 0   # the logits' width, known from the first join
        self.live: list[bool] = []
        self.mask = self.positions = self.cache = None
        self.seen = self.penalty = self._tokens = None

    @property
    def batch(self) -> int:
        return len(self.live)

    @property
    def tokens(self) -> torch.Tensor:
        """Each row's next input id [batch] (the picks of the last `advance`)."""
        return self._tokens

    def free_rows(self) -> list[int]:
        return [r for r, on in enumerate(self.live) if not on]

    def fit(self, rows: int, columns: int) -> dict[int, int]:
        """A batch of exactly `rows` rows, once no row is live (rows never move here)."""
        if not any(self.live):
            self.live = [False] * rows
        return {r: r for r, on in enumerate(self.live) if on}

    def join_width(self, width: int) -> int:
        return width

    @torch.inference_mode()
    def join(self, rows: list[int], ids, mask, positions) -> torch.Tensor:
        """Prefills the batch with left-padded prompts (`ids`, `mask`, `positions` [J, W], J = the
        batch); returns the last column's logits [J, vocab] (fp32)."""
        from transformers import DynamicCache

        if any(self.live) or rows != list(range(self.batch)):
            raise ValueError("the plain decoder takes a whole batch at once, into no live rows")
        self.cache, self.mask, self.positions = DynamicCache(), mask, positions
        for r in rows:
            self.live[r] = True
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         **forward_kwargs(self.model, self.cache))
        self.vocab = out.logits.shape[-1]
        return out.logits[:, -1].float()

    def feed(self, rows: list[int], tokens, seen, penalty) -> None:
        """The rows' next input ids ([J]), their seen ids ([J, vocab] bool) and penalties ([J, 1])."""
        self._tokens, self.seen, self.penalty = tokens, seen, penalty

    @torch.inference_mode()
    def advance(self) -> torch.Tensor:
        """One forward for every row; returns the penalized logits [batch, vocab] (fp32), whose
        argmax becomes `tokens`."""
        self.positions = self.positions[:, -1:] + 1
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = self.model(input_ids=self._tokens[:, None], attention_mask=self.mask, position_ids=self.positions,
                            **forward_kwargs(self.model, self.cache)).logits[:, -1]
        penalized = penalize(logits.float(), self.seen, self.penalty)
        self._tokens = penalized.argmax(-1)
        return penalized

    def mark_seen(self) -> None:
        self.seen.scatter_(1, self._tokens[:, None], True)

    def leave(self, rows: list[int]) -> None:
        """The rows stop counting; they are fed padding from here on (their results are not read)."""
        for r in rows:
            self.live[r] = False
        if rows:
            self._tokens[torch.tensor(rows, device=self.device)] = self.pad_id
