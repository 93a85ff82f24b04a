"""Continuous batching on the static decoder (fastdecode.py): requests join a running batch between
two steps and leave it when they end, so no request waits for another to finish.

`generate.BatchGeneration` runs this loop whenever the model has a decoder (a GPU). One pass of the
loop:
  1. admit: waiting requests (the first prompts, then whatever `admit(room)` hands over) are
     prefilled together into free rows, after moving the live rows to a larger cache if needed
     (`StaticDecoder.fit`); their first picks come from the prefill's logits;
  2. step: one captured step for every row, greedy picks on the GPU; the sampling rows then draw
     together from the step's penalized logits, each with its own settings and generator;
  3. read back: the picks go to pinned host memory without waiting; the host handles the previous
     step's picks (stop ids, limits, `should_stop`) while the GPU runs this one, so a finished row
     costs one wasted step. Rows that end leave the batch; when few rows are left, they move to a
     smaller cache (a step of 16 rows costs ~30% more than a step of one).

Picks are those of `sampling.next_token` (the repetition penalty, then greedy or the sampling
filters with the row's own generator), so a greedy or seeded row gives the tokens it would give
alone, whenever it joins (tested in float32).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatlora.decode.sampling import RowSampler, Sampling, penalize
from chatlora.decode.static import MAX_BATCH

READBACK_SLOTS = 8   # pinned host buffers for picks in flight (at most 3 are)


@dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator
    count: int = 0            # tokens yielded
    finish: str | None = None
    row: int = -1             # decoder row while decoding
    end: int = 0              # cache columns the row needs: its prompt's width + its tokens + 1


class Batcher:
    def __init__(self, decoder, requests: list[Request], stop_ids, max_rows: int, should_stop, ended,
                 admit=None):
        """Requests are numbered in order: `requests` from 0, then those `admit(room)` returns (at most
        `room` Requests each time). `should_stop(i)` is asked before each token of request i;
        `ended(i, reason)` is told when it ends ("stop" or "length"); then it is forgotten here."""
        self.decoder, self.stop_ids, self.ended = decoder, set(stop_ids), ended
        self.requests = dict(enumerate(requests))
        self.count = len(requests)
        self.max_rows, self.should_stop, self.admit = min(max_rows, MAX_BATCH), should_stop, admit
        self.device = decoder.device
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(READBACK_SLOTS, MAX_BATCH, dtype=torch.long, pin_memory=cuda)
        self.events = [torch.cuda.Event() if cuda else None for _ in range(READBACK_SLOTS)]
        self.issued = 0
        self.live: dict[int, int] = {}   # decoder row -> request index
        self.sampling = None             # (rows, RowSampler) of the live rows that sample, or ()

    def __iter__(self):
        """Yields (request index, token) until every request, the admitted ones included, has ended."""
        self.decoder.leave([r for r, on in enumerate(self.decoder.live) if on])   # rows left by a failed run
        waiting = deque(self.requests)
        pending: deque = deque()   # picks on their way to the host: (slot, [(position, request)])
        while True:
            room = self.max_rows - len(self.live) - len(waiting)
            if self.admit is not None and room > 0:
                for request in self.admit(room):
                    self.requests[self.count] = request
                    waiting.append(self.count)
                    self.count += 1
            joining = min(len(waiting), self.max_rows - len(self.live))   # the rest wait for a free row
            if joining:
                pending.append(self._join([waiting.popleft() for _ in range(joining)]))
            stepped = bool(self.live)
            if stepped:
                pending.append(self._step())
            while pending and (len(pending) > 1 or not stepped):
                yield from self._read(*pending.popleft())
            if not self.live and not pending and not waiting and not stepped:
                return
            self._shrink()

    # ---------------------------------------------------------------- the three parts

    def _join(self, joining: list[int]):
        """Prefills `joining` requests into free rows; returns their first picks' read-back."""
        dec, reqs = self.decoder, [self.requests[i] for i in joining]
        ids, mask = (t.to(self.device) for t in left_padded([r.prompt for r in reqs], pad_id=0))
        width = dec.join_width(ids.shape[1])
        for r in reqs:
            r.end = width + r.sampling.max_new_tokens + 1
        self._fit(len(self.live) + len(reqs), max(r.end for r in reqs))
        rows = dec.free_rows()[:len(reqs)]
        logits = dec.join(rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        seen = torch.zeros(len(reqs), logits.shape[-1], dtype=torch.bool, device=self.device)
        # the prompts' ids; padding marks the row's last id again (boolean indexing would sync the host)
        seen.scatter_(1, torch.where(mask.bool(), ids, ids[:, -1:]), True)
        penalty = torch.tensor([[r.sampling.repetition_penalty] for r in reqs], device=self.device)
        penalized = penalize(logits, seen, penalty)
        picks = penalized.argmax(-1)
        sampling = [j for j, r in enumerate(reqs) if r.sampling.temperature != 0]
        if sampling:
            index = torch.tensor(sampling, device=self.device)
            picks[index] = self._sampler([reqs[j] for j in sampling]).draw(penalized[index])
        seen.scatter_(1, picks[:, None], True)
        dec.feed(rows, picks, seen, penalty)
        for row, i in zip(rows, joining):
            self.live[row], self.requests[i].row = i, row
        self.sampling = None
        return self._readback(picks), list(enumerate(joining))

    def _step(self):
        """One step for every row; returns its picks' read-back."""
        dec = self.decoder
        penalized = dec.advance()
        if self.sampling is None:   # the sampling rows (changed by joins, leaves and moves)
            rows = [row for row, i in self.live.items() if self.requests[i].sampling.temperature != 0]
            self.sampling = rows and (torch.tensor(rows, device=self.device),
                                      self._sampler([self.requests[self.live[row]] for row in rows]))
        if self.sampling:   # they draw from the penalized logits instead of the greedy pick
            index, sampler = self.sampling
            dec.tokens[index] = sampler.draw(penalized[index])
        dec.mark_seen()
        return self._readback(dec.tokens), list(self.live.items())

    def _read(self, slot: int, pairs):
        """Handles read-back picks: each live request's token is yielded, or ends the request."""
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        picks, leaving = self.host[slot].tolist(), []
        for position, i in pairs:
            r = self.requests.get(i)
            if r is None:   # it ended after this step was queued
                continue
            token = picks[position]
            if self.should_stop(i):
                r.finish = "length"
            elif token in self.stop_ids:
                r.finish = "stop"
            else:
                r.count += 1
                yield i, token
                if r.count >= r.sampling.max_new_tokens:
                    r.finish = "length"
            if r.finish is not None:
                leaving.append(r.row)
                del self.live[r.row], self.requests[i]
                self.ended(i, r.finish)
        if leaving:
            self.decoder.leave(leaving)
            self.sampling = None

    # ---------------------------------------------------------------- helpers

    def _sampler(self, reqs: list[Request]) -> RowSampler:
        return RowSampler([r.sampling for r in reqs], [r.generator for r in reqs], self.decoder.net.vocab, self.device)

    def _readback(self, picks) -> int:
        """Starts copying picks to a pinned host buffer; returns the buffer's slot."""
        slot = self.issued % READBACK_SLOTS
        self.issued += 1
        self.host[slot, :picks.shape[0]].copy_(picks, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        return slot

    def _fit(self, rows: int, columns: int) -> None:
        """The decoder's cache sized for `rows` rows and `columns` columns (live rows' needs kept)."""
        columns = max([columns] + [self.requests[i].end for i in self.live.values()])
        moved = self.decoder.fit(max(rows, 1), columns)
        if any(old != new for old, new in moved.items()):
            self.sampling = None
            self.live = {moved[row]: i for row, i in self.live.items()}
            for row, i in self.live.items():
                self.requests[i].row = row

    def _shrink(self) -> None:
        """Live rows move to a smaller cache once they fill a quarter of theirs or less."""
        if self.live and 4 * len(self.live) <= self.decoder.batch:
            self._fit(len(self.live), 0)



def left_padded(prompts: list[list[int]], pad_id: int):
    """[J, W] ids and mask (1 on the prompt) of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(torch.tensor(p), (width - len(p), 0), value=pad_id) for p in prompts])
    return ids, (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
