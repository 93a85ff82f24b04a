"""The one decode loop: requests join a batch of rows, step together, and leave it when they end.

Every generation runs here (engine.py: `Generation` is a batch of one, `BatchGeneration` many, the
server's worker admits requests as they come), over a backend with the row API: the static decoder
(static.py: a static KV cache and captured steps on a GPU; rows join a running batch) or the plain one
(plain.py: transformers' forward; the given prompts join an empty batch, and `admit` is not asked:
requests that come meanwhile wait for the caller's next batch). One pass of the loop:
  1. admit: waiting requests (the first prompts, then whatever `admit(room)` hands over) are
     prefilled together into free rows, after moving the live rows to a larger cache if needed
     (`fit`); their first picks come from the prefill's logits;
  2. step: one step for every row, greedy picks on the device; the sampling rows then draw together
     from the step's penalized logits, each with its own settings and generator (sampling.Picks);
  3. read back: the picks go to (pinned) host memory without waiting; the host handles the previous
     step's picks (stop ids, limits, `should_stop`) while the device runs this one, so a finished row
     costs one wasted step. Rows that end leave the batch; when few rows are left, they move to a
     smaller cache (a step of 16 rows costs ~30% more than a step of one).

Stop and length handling live here alone (`_read`): a stop id ends a request with "stop" (the id is
not yielded), its `max_new_tokens`-th token or `should_stop` with "length". Picks follow sampling.py,
so a greedy or seeded request gives the tokens it would give alone, whenever it joins (tested).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from chatlora.decode.sampling import Picks, Sampling, penalize

READBACK_SLOTS = 8        # pinned host buffers for picks in flight (at most 3 are)


@dataclass(eq=False)
class Request:
    prompt: list[int]
    sampling: Sampling
    generator: torch.Generator
    count: int = 0            # tokens yielded
    finish: str | None = None
    row: int = -1             # the backend's row while decoding
    end: int = 0              # cache columns the row needs: its prompt's width + its tokens + 1


@dataclass
class InFlight:
    """Picks on their way to the host: the read-back buffer's slot, and which request each row holds."""
    slot: int
    rows: list[tuple[int, int]]   # (position in the picks, request number)


class DecodeLoop:
    def __init__(self, backend, requests: list[Request], stop_ids, max_rows: int, should_stop, ended,
                 admit=None):
        """Requests are numbered in order: `requests` from 0, then those `admit(room)` returns (at most
        `room` Requests each time). `should_stop(i)` is asked before each token of request i;
        `ended(i, reason)` is told when it ends ("stop" or "length"); then it is forgotten here."""
        self.backend, self.stop_ids, self.ended = backend, set(stop_ids), ended
        self.requests = dict(enumerate(requests))
        self.count = len(requests)
        self.max_rows, self.should_stop, self.admit = min(max_rows, backend.max_rows), should_stop, admit
        self.device = backend.device
        cuda = self.device.type == "cuda"
        self.host = torch.zeros(READBACK_SLOTS, backend.max_rows, dtype=torch.long, pin_memory=cuda)
        self.events = [torch.cuda.Event() if cuda else None for _ in range(READBACK_SLOTS)]
        self.issued = 0
        self.live: dict[int, int] = {}   # backend row -> request number
        self.picks: Picks | None = None  # the live rows' picks (made again when rows change)

    def __iter__(self):
        """Yields (request number, token) until every request, the admitted ones included, has ended."""
        self.backend.leave([r for r, on in enumerate(self.backend.live) if on])   # rows left by a failed run
        waiting = deque(self.requests)
        pending: deque[InFlight] = deque()
        while True:
            open_batch = self.backend.accepts_joins or not (self.live or pending)
            room = self.max_rows - len(self.live) - len(waiting)
            if self.admit is not None and room > 0 and self.backend.accepts_joins:
                for request in self.admit(room):
                    self.requests[self.count] = request
                    waiting.append(self.count)
                    self.count += 1
            joining = min(len(waiting), self.max_rows - len(self.live)) if open_batch else 0
            if joining:   # the rest wait for a free row
                pending.append(self._join([waiting.popleft() for _ in range(joining)]))
            stepped = bool(self.live)
            if stepped:
                pending.append(self._step())
            while pending and (len(pending) > 1 or not stepped):
                yield from self._read(pending.popleft())
            if not self.live and not pending and not waiting and not stepped:
                return
            self._shrink()

    # ---------------------------------------------------------------- the three parts

    def _join(self, joining: list[int]) -> InFlight:
        """Prefills `joining` requests into free rows; returns their first picks' read-back."""
        backend, reqs = self.backend, [self.requests[i] for i in joining]
        ids, mask = (t.to(self.device) for t in left_padded([r.prompt for r in reqs], pad_id=0))
        width = backend.join_width(ids.shape[1])
        for r in reqs:
            r.end = width + r.sampling.max_new_tokens + 1
        self._fit(len(self.live) + len(reqs), max(r.end for r in reqs))
        rows = backend.free_rows()[:len(reqs)]
        logits = backend.join(rows, ids, mask, (mask.cumsum(-1) - 1).clamp(min=0))
        seen = torch.zeros(len(reqs), logits.shape[-1], dtype=torch.bool, device=self.device)
        # the prompts' ids; padding marks the row's last id again (boolean indexing would sync the host)
        seen.scatter_(1, torch.where(mask.bool(), ids, ids[:, -1:]), True)
        penalty = torch.tensor([[r.sampling.repetition_penalty] for r in reqs], device=self.device)
        picks = self._picks_of(reqs).choose(penalize(logits, seen, penalty))
        seen.scatter_(1, picks[:, None], True)
        backend.feed(rows, picks, seen, penalty)
        for row, i in zip(rows, joining):
            self.live[row], self.requests[i].row = i, row
        self.picks = None
        return InFlight(self._readback(picks), list(enumerate(joining)))

    def _step(self) -> InFlight:
        """One step for every row; returns its picks' read-back."""
        backend = self.backend
        penalized = backend.advance()
        if self.picks is None:   # the rows that sample (changed by joins, leaves and moves)
            by_row = [self.requests.get(self.live.get(row)) for row in range(backend.batch)]
            self.picks = self._picks_of(by_row)
        self.picks.choose(penalized, greedy=backend.tokens)   # sampling rows' draws into the greedy picks
        backend.mark_seen()
        return InFlight(self._readback(backend.tokens), list(self.live.items()))

    def _read(self, flight: InFlight):
        """Handles read-back picks: each live request's token is yielded, or ends the request."""
        if self.events[flight.slot] is not None:
            self.events[flight.slot].synchronize()
        picks, leaving = self.host[flight.slot].tolist(), []
        for position, i in flight.rows:
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
            self.backend.leave(leaving)
            self.picks = None

    # ---------------------------------------------------------------- helpers

    def _picks_of(self, reqs: list[Request | None]) -> Picks:
        """Picks for rows holding `reqs` (None: a free row, greedy)."""
        greedy = Sampling(temperature=0)
        return Picks([r.sampling if r else greedy for r in reqs], [r.generator if r else None for r in reqs],
                     self.backend.vocab, self.device)

    def _readback(self, picks) -> int:
        """Starts copying picks to a pinned host buffer; returns the buffer's slot."""
        slot = self.issued % READBACK_SLOTS
        self.issued += 1
        self.host[slot, :picks.shape[0]].copy_(picks, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        return slot

    def _fit(self, rows: int, columns: int) -> None:
        """The backend's cache sized for `rows` rows and `columns` columns (live rows' needs kept)."""
        columns = max([columns] + [self.requests[i].end for i in self.live.values()])
        moved = self.backend.fit(max(rows, 1), columns)
        if any(old != new for old, new in moved.items()):
            self.picks = None
            self.live = {moved[row]: i for row, i in self.live.items()}
            for row, i in self.live.items():
                self.requests[i].row = row

    def _shrink(self) -> None:
        """Live rows move to a smaller cache once they fill a quarter of theirs or less."""
        if self.live and self.backend.accepts_joins and 4 * len(self.live) <= self.backend.batch:
            self._fit(len(self.live), 0)


def left_padded(prompts: list[list[int]], pad_id: int):
    """[J, W] ids and mask (1 on the prompt) of prompts padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.stack([F.pad(torch.tensor(p), (width - len(p), 0), value=pad_id) for p in prompts])
    return ids, (torch.arange(width)[None] >= torch.tensor([width - len(p) for p in prompts])[:, None]).long()
