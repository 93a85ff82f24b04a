"""Fast decoding on a GPU: a static KV cache and the one-token step captured as CUDA graphs.

The eager transformers forward spends ~57 ms per token of an Index-1.9B-sized model launching
kernels from Python (bench/NOTES.md); the weights take ~1 ms to read. `StaticDecoder` runs the same
function (decodemodel.py: fused GEMMs and Triton kernels) from a preallocated cache:
  - one cache for keys and values per (rows, columns) size; each (rows, columns, attended columns)
    shape of the step is captured once and replayed;
  - each row writes its own next column, so rows join and leave between steps;
  - picks happen on the GPU (`advance`), so the host can queue a step before reading the last.
Rounding differs from transformers' operation order. In bf16 neither incremental path equals a full
forward exactly, and both are about as far from it: median logits error 0.035 for ours against 0.032
for transformers', argmax agreement 88% for both (bench/NOTES.md, `bench/decode_speed.py`).
In float32, greedy tokens equal `generate`'s (tests).

    decoder = static_decoder(model)          # None off-GPU or for unsupported models
    logits = decoder.start(ids, mask, positions, max_new_tokens)   # prefill (left-padded rows)
    logits = decoder.step(tokens, positions)                       # one token for every row

Continuous batching (batcher.py) uses the row-level calls instead: `fit` (a cache of the right
size, live rows moved into it), `join` (prefill prompts into free rows) and `feed` (their first ids),
`advance` (a step with greedy picks on the GPU, no host sync), `mark_seen`, `leave`.

A LoRA adapter is merged into the weights once (`peft merge_adapter`: the peft model then computes
the merged function too, so every path sees the same model).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from chatlora.decode.arithmetic import DecodeModel
from chatlora.decode.sampling import penalize
from chatlora.train.fused import architecture_reason

ATTEND_BUCKET = 128     # the step attends to the first multiple of this many cache columns
CACHE_BUCKET = 512      # cache length: prompt + new tokens, rounded up (few sizes: few captures)
MAX_BATCH = 64
MAX_STATES = 6          # caches kept (with their captured steps), least recently used dropped first...
STATE_MEMORY = 0.3      # ...and within this share of the GPU's memory
PREFILL_BUCKET = 64     # a join's prompt columns: a multiple of this
PREFILL_GRAPH_TOKENS = 4096   # joins of up to this many (padded) tokens run as captured graphs


_MAKING = threading.Lock()


def _batch_for(rows: int) -> int:
    """Rows of the cache that holds `rows`: the next power of two (few shapes to capture)."""
    return 1 << max(0, (max(rows, 1) - 1).bit_length())


def _cap_for(columns: int) -> int:
    """Columns of the cache that holds `columns`: CACHE_BUCKET times a power of two."""
    return CACHE_BUCKET * _batch_for(-(-columns // CACHE_BUCKET))


def static_decoder(model) -> "StaticDecoder | None":
    """The model's decoder (made once and kept on the model), or None where it does not apply."""
    if os.environ.get("CHATLORA_FAST_DECODE", "1") == "0" or not torch.cuda.is_available():
        return None
    with _MAKING:   # one decoder per model, whichever thread asks first
        return _decoder_of(model)


def _decoder_of(model) -> "StaticDecoder | None":
    decoder = getattr(model, "_chatlora_decoder", None)
    if decoder is None:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        if next(lm.parameters()).device.type != "cuda" or architecture_reason(lm):
            return None
        if hasattr(model, "merge_adapter"):
            model.merge_adapter()
        decoder = StaticDecoder(lm)
        model._chatlora_decoder = decoder
    return decoder


class StaticDecoder:
    """Rows of a batch decode together in one cache; each row writes its own next column (`slot`), so
    requests can join a running batch (`join`) and leave it (`leave`) between two steps, and the
    live rows can move to a cache of another size (`fit`)."""

    def __init__(self, lm, graphs: bool = True):
        self.net = DecodeModel(lm)
        self.lm, self.graphs, self.kernels = lm, graphs, self.net.kernels
        self.device, self.dtype = self.net.device, self.net.dtype
        self._states: OrderedDict = OrderedDict()   # (batch, cache length) -> cache + captured steps
        self.state = None
        self.steps = self.row_steps = 0   # `advance` calls, and live rows summed over them
        self.slots: list[int] = []    # each row's next cache column (host copy of state["slot"])
        self.live: list[bool] = []    # rows holding a request; free rows stay at column 0

    # ---------------------------------------------------------------- rows

    @property
    def batch(self) -> int:
        return self.state["batch"] if self.state else 0

    @property
    def tokens(self) -> torch.Tensor:
        """Each row's next input id [batch] (the picks of the last `advance`)."""
        return self.state["tokens"]

    def free_rows(self) -> list[int]:
        return [r for r, on in enumerate(self.live) if not on]

    def reset(self, rows: int, columns: int) -> None:
        """A cache for at least `rows` rows of `columns` columns, every row free."""
        self.state = self._state(_batch_for(rows), _cap_for(columns))
        self._clear(self.state)
        self.slots, self.live = [0] * self.batch, [False] * self.batch

    def fit(self, rows: int, columns: int) -> dict[int, int]:
        """Moves the live rows, their caches and their decoding state into a cache for `rows` rows
        (rounded up to a power of two) of at least `columns` columns, unless the present one has
        that size and enough columns; returns where each live row went ({old: new}, in order)."""
        live = [r for r, on in enumerate(self.live) if on]
        batch, old = _batch_for(rows), self.state
        if old is not None and old["batch"] == batch and old["cap"] >= columns:
            return {r: r for r in live}
        if len(live) > batch:
            raise ValueError(f"{len(live)} live rows do not fit in {batch}")
        cap = _cap_for(max([columns] + [self.slots[r] + 1 for r in live]))
        new = self._state(batch, cap, keep=old)
        self._clear(new)
        slots = self.slots
        self.state, self.slots, self.live = new, [0] * batch, [False] * batch
        if live:
            src = torch.tensor(live, device=self.device)
            dst = torch.arange(len(live), device=self.device)
            used = max(slots[r] for r in live)
            for name in ("k", "v"):
                new[name][:, dst, :, :used] = old[name][:, src, :, :used]
            new["valid"][dst, :used] = old["valid"][src, :used]
            for name in ("tokens", "positions", "slot", "live", "seen", "penalty"):
                new[name][dst] = old[name][src]
            for d, r in enumerate(live):
                self.slots[d], self.live[d] = slots[r], True
        return {r: d for d, r in enumerate(live)}

    def join_width(self, width: int) -> int:
        """Cache columns a join of prompts up to `width` tokens takes: padded (on the left, masked) to
        a multiple of PREFILL_BUCKET, so that few prefill shapes need capturing."""
        return -(-width // PREFILL_BUCKET) * PREFILL_BUCKET

    @torch.inference_mode()
    def join(self, rows: list[int], ids, mask, positions) -> torch.Tensor:
        """Prefills free `rows` with left-padded prompts (`ids`, `mask`, `positions` [J, W] each) into
        their cache columns [0, join_width(W)); they decode from the next step on, each from its next
        input id (`feed`). Returns the last column's logits [J, vocab] (fp32).

        Up to PREFILL_GRAPH_TOKENS (rows rounded up to a power of two, times the padded width), the
        prefill runs as a captured graph; the extra rows repeat the first (the same values written
        twice to its cache row)."""
        s, j, width = self.state, len(rows), self.join_width(ids.shape[1])
        if width >= s["cap"]:
            raise ValueError(f"a {width}-column prompt does not fit a cache of {s['cap']} columns")
        index, pad = torch.tensor(rows, device=self.device), width - ids.shape[1]
        ids, mask, positions = (F.pad(t, (pad, 0)) for t in (ids, mask, positions))
        rounded = _batch_for(j)
        if rounded * width <= PREFILL_GRAPH_TOKENS and rounded > j:
            index, ids, mask, positions = (torch.cat([t, t[:1].expand(rounded - j, *t.shape[1:])])
                                           for t in (index, ids, mask, positions))
        for r in rows:
            self.slots[r], self.live[r] = width, True
        return self._prefill(s, index, ids, mask, positions)[:j]

    def feed(self, rows: list[int], tokens, seen, penalty) -> None:
        """Rows' next input ids ([J]), the ids they have seen ([J, vocab] bool, `tokens` included) and
        their repetition penalties ([J, 1]), for `advance`'s picks."""
        s, index = self.state, torch.tensor(rows, device=self.device)
        s["tokens"][index] = tokens
        s["seen"][index] = seen
        s["penalty"][index] = penalty

    def leave(self, rows: list[int]) -> None:
        """Frees rows: they stop advancing and hold nothing from here on."""
        if not rows:
            return
        s, index = self.state, torch.tensor(rows, device=self.device)
        s["live"][index] = 0
        s["slot"][index] = 0
        s["positions"][index] = 0
        s["valid"][index] = False
        for r in rows:
            self.slots[r], self.live[r] = 0, False

    @torch.inference_mode()
    def advance(self) -> torch.Tensor:
        """One captured step for every row with greedy picks on the device: the logits, the
        repetition penalty over each row's seen ids and the argmax, which becomes `tokens`, the next
        step's input. Returns the penalized logits [batch, vocab] (fp32; valid until the next step),
        from which a sampling row draws its own pick instead (writing it into `tokens`); then
        `mark_seen`. The host need not wait for a step before queuing the next one."""
        s = self.state
        self._check_room()
        penalized = self._run(s, self._attend(), pick=True)
        self.slots = [c + on for c, on in zip(self.slots, self.live)]
        self.steps, self.row_steps = self.steps + 1, self.row_steps + sum(self.live)
        return penalized

    def mark_seen(self) -> None:
        """Adds each row's next input id to the ids it has seen (the repetition penalty's)."""
        s = self.state
        s["seen"].scatter_(1, s["tokens"][:, None], True)

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> None:
        """Captures what serving up to `max_rows` rows first meets, so that no request waits for a
        capture (or a kernel compile, ~1 s): for every cache of a power of two rows up to it
        (CACHE_BUCKET columns), its step at every attention bucket and the prefills of a power of two
        rows of up to PREFILL_BUCKET tokens. Longer prompts and replies are captured when first met.
        Every row is free afterwards."""
        batch = 1
        while batch <= _batch_for(min(max_rows, MAX_BATCH)):
            rows = 1
            while rows <= batch:
                self.reset(batch, CACHE_BUCKET)
                ids = torch.ones(rows, 1, dtype=torch.long, device=self.device)
                self.join(list(range(rows)), ids, torch.ones_like(ids), torch.zeros_like(ids))
                rows *= 2
            for attend in range(ATTEND_BUCKET, CACHE_BUCKET + 1, ATTEND_BUCKET):
                for _ in range(2):   # the first runs eagerly and captures, the second replays
                    self.slots = [attend - 1] * batch   # (the host's copy alone: sets the bucket)
                    self.advance()
            batch *= 2
        self.reset(1, CACHE_BUCKET)

    @torch.inference_mode()
    def start(self, ids, mask, positions, max_new_tokens: int) -> torch.Tensor:
        """A fresh batch of left-padded rows ([B, W] each) prefilled; returns the last column's logits
        [B, vocab] (fp32). `step` then decodes them with ids from the host."""
        rows, width = ids.shape
        if rows > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} rows decode together")
        self.reset(rows, self.join_width(width) + max_new_tokens + 1)
        return self.join(list(range(rows)), ids, mask, positions)

    @torch.inference_mode()
    def step(self, tokens, positions) -> torch.Tensor:
        """One token for the first len(tokens) rows ([B] ids and positions, from the host); returns
        their logits [B, vocab] (fp32)."""
        s, n = self.state, tokens.shape[0]
        self._check_room()
        s["tokens"][:n] = tokens
        s["positions"][:n] = positions
        s["slot"].copy_(torch.tensor(self.slots, device=self.device))
        logits = self._run(s, self._attend(), pick=False)[:n].clone()
        self.slots = [c + on for c, on in zip(self.slots, self.live)]
        return logits

    @torch.inference_mode()
    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] predicting each of `tokens` after `prompt`, fed one by one
        (for comparing the decoder with a full forward over the same sequence)."""
        n, dev = len(prompt), self.device
        out = [self.start(torch.tensor([prompt], device=dev), torch.ones(1, n, dtype=torch.long, device=dev),
                          torch.arange(n, device=dev)[None], len(tokens))[0]]
        for i, t in enumerate(tokens[:-1]):
            out.append(self.step(torch.tensor([t], device=dev), torch.tensor([n + i], device=dev))[0])
        return torch.stack(out)

    # ---------------------------------------------------------------- internals

    def _check_room(self) -> None:
        full = [r for r, (c, on) in enumerate(zip(self.slots, self.live)) if on and c >= self.state["cap"]]
        if full:
            raise ValueError(f"rows {full} have filled their {self.state['cap']} cache columns")

    def _state(self, batch: int, cap: int, keep=None) -> dict:
        """The cache for (batch, cap), made or reused (with its captured steps). Made ones are kept,
        the least recently used dropped first, within STATE_MEMORY of the GPU's memory (the state
        `keep` is never dropped while in use)."""
        key = (batch, cap)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        shape = (len(self.net.layers), batch, self.net.kv_heads, cap, self.net.head_dim)
        size = 2 * torch.Size(shape).numel() * self.dtype.itemsize
        budget = STATE_MEMORY * torch.cuda.get_device_properties(self.device).total_memory \
            if self.device.type == "cuda" else float("inf")
        held = lambda: sum(s["bytes"] for s in self._states.values())  # noqa: E731
        for old in [k for k, s in self._states.items() if s is not keep]:
            if len(self._states) < MAX_STATES and held() + size <= budget:
                break
            del self._states[old]
        d = self.device
        state = {"batch": batch, "cap": cap, "graphs": {}, "bytes": size,
                 "pool": torch.cuda.graph_pool_handle() if self.graphs else None,
                 "k": torch.zeros(shape, dtype=self.dtype, device=d),
                 "v": torch.zeros(shape, dtype=self.dtype, device=d),
                 "valid": torch.zeros(batch, cap, dtype=torch.bool, device=d),
                 "tokens": torch.zeros(batch, dtype=torch.long, device=d),
                 "positions": torch.zeros(batch, dtype=torch.long, device=d),
                 "slot": torch.zeros(batch, dtype=torch.long, device=d),
                 "live": torch.zeros(batch, dtype=torch.long, device=d),
                 "seen": torch.zeros(batch, self.net.vocab, dtype=torch.bool, device=d),
                 "penalty": torch.ones(batch, 1, device=d)}
        self._states[key] = state
        return state

    @staticmethod
    def _clear(s) -> None:
        for name in ("valid", "tokens", "positions", "slot", "live", "seen"):
            s[name].zero_()
        s["penalty"].fill_(1.0)

    def _attend(self) -> int:
        """Cache columns the next step attends to: every row's filled ones, rounded up to a bucket."""
        return min(self.state["cap"], -(-(max(self.slots) + 1) // ATTEND_BUCKET) * ATTEND_BUCKET)

    def _prefill(self, s, index, ids, mask, positions) -> torch.Tensor:
        """`_join_rows`, captured per (rows, width) within PREFILL_GRAPH_TOKENS."""
        key = ("join",) + tuple(ids.shape)
        if not self.graphs or ids.numel() > PREFILL_GRAPH_TOKENS:
            return self._join_rows(s, index, ids, mask, positions)
        if key not in s["graphs"]:
            inputs = [t.clone() for t in (index, ids, mask, positions)]
            out = self._join_rows(s, *inputs)   # the real prefill, eager; then captured
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=s["pool"]):
                static = self._join_rows(s, *inputs)
            s["graphs"][key] = (graph, (inputs, static))
            return out
        graph, (inputs, static) = s["graphs"][key]
        for buf, t in zip(inputs, (index, ids, mask, positions)):
            buf.copy_(t)
        graph.replay()
        return static

    def _join_rows(self, s, index, ids, mask, positions) -> torch.Tensor:
        """Rows `index` take their prompts: valid columns, next position and column, live; then the
        prefill (keys and values into their cache rows) and its last column's logits."""
        width = ids.shape[1]   # (scalars through index_fill_: indexed assignment copies them from the host)
        s["valid"].index_fill_(0, index, False)
        s["valid"][index, :width] = mask.bool()
        s["positions"][index] = positions[:, -1] + 1
        s["slot"].index_fill_(0, index, width)
        s["live"].index_fill_(0, index, 1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & mask.bool()[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # padding: no empty row
        return self.net.prefill(s, index, ids, positions, self.net.additive(allowed[:, None]))

    def _run(self, s, attend: int, pick: bool) -> torch.Tensor:
        """One step: eager without graphs; else the captured step for (attend, pick), captured after
        running it eagerly the first time (the eager run is the real step)."""
        if not self.graphs:
            return self._step(s, attend, pick)
        key = (attend, pick)
        if key not in s["graphs"]:
            out = self._step(s, attend, pick)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=s["pool"]):
                static = self._step(s, attend, pick)
            s["graphs"][key] = (graph, static)
            return out
        graph, static = s["graphs"][key]
        graph.replay()
        return static

    def _step(self, s, attend: int, pick: bool):
        """Every row's token through the model, its keys and values written at the row's slot;
        with `pick`, the penalized logits' argmax becomes the next input and the live rows move on."""
        s["valid"].scatter_(1, s["slot"][:, None], True)
        if self.net.fused(s["batch"]):
            logits = self.net.fused_step(s, attend)
        else:
            logits = self.net.unfused_step(s, attend)
        if not pick:
            return logits
        penalized = penalize(logits, s["seen"], s["penalty"])
        s["tokens"].copy_(penalized.argmax(-1))
        s["positions"].add_(s["live"])
        s["slot"].add_(s["live"])
        return penalized

