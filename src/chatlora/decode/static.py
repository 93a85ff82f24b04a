"""Fast decoding on a GPU: a static KV cache and the one-token step captured as CUDA graphs.

The eager transformers forward spends ~57 ms per token of an Index-1.9B-sized model launching
kernels from Python (bench/NOTES.md); the weights take ~1 ms to read. `StaticDecoder` runs the same
function (arithmetic.py: fused GEMMs and Triton kernels) from a preallocated cache:
  - one cache for keys and values per (rows, columns) size; each (rows, columns, attended columns)
    shape of the step is captured once and replayed;
  - each row writes its own next column, so rows join and leave between steps;
  - picks happen on the GPU (`advance`), so the host can queue a step before reading the last.
Rounding differs from transformers' operation order. In bf16 neither incremental path equals a full
forward exactly, and both are about as far from it: median logits error 0.035 for ours against 0.032
for transformers', argmax agreement 88% for both (bench/NOTES.md, `bench/decode_speed.py`).
In float32, greedy tokens equal `generate`'s (tests).

    decoder = static_decoder(model)          # None off-GPU, for unsupported models, a 4-bit base, or switched off

It is a backend of the decode loop (loop.py), through the row API that plain.py implements too:
`fit` (a cache of the right size, live rows moved into it), `join` (prefill prompts into free rows)
and `feed` (their first ids), `advance` (a step with greedy picks on the GPU, no host sync),
`mark_seen`, `leave`. Rows join a running batch (`accepts_joins`).

A LoRA adapter is merged into the weights once (`peft merge_adapter`: the peft model then computes
the merged function too, so every path sees the same model).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from chatlora.decode.arithmetic import DecodeModel
from chatlora.decode.sampling import penalize
from chatlora.models import triton_kernels
from chatlora.models.arch import unsupported_reason
from chatlora.models.quantize import is_quantized

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


@dataclass
class Options:
    """How a model decodes (`generate.decoder` and `generate.kernels`, set on the model by
    `use_options`); the environment overrides them: CHATLORA_FAST_DECODE=0, CHATLORA_TRITON=0."""
    static: bool = True     # the static cache and captured steps where they apply; False: transformers'
    kernels: bool = True    # the Triton kernels in one-token steps where they pass their check


def use_options(model, options: Options) -> None:
    model._chatlora_decode = options


def options_of(model) -> Options:
    options = getattr(model, "_chatlora_decode", None) or Options()
    return Options(static=options.static and os.environ.get("CHATLORA_FAST_DECODE", "1") != "0",
                   kernels=options.kernels and triton_kernels.switched_on())


def static_decoder(model) -> "StaticDecoder | None":
    """The model's decoder (made once and kept on the model), or None where it does not apply."""
    options = options_of(model)
    if not options.static or not torch.cuda.is_available():
        return None
    with _MAKING:   # one decoder per model, whichever thread asks first
        decoder = getattr(model, "_chatlora_decoder", None)
        if decoder is None:
            lm = model.get_base_model() if hasattr(model, "get_base_model") else model
            if next(lm.parameters()).device.type != "cuda" or unsupported_reason(lm) or is_quantized(lm):
                return None
            if hasattr(model, "merge_adapter"):
                model.merge_adapter()
            decoder = StaticDecoder(lm, kernels=options.kernels)
            model._chatlora_decoder = decoder
        return decoder


@dataclass(eq=False)
class CacheState:
    """A cache for `batch` rows of `cap` columns, the rows' decoding state, and the steps and
    prefills captured on it. Keys and values are [layers, rows, kv heads, columns, head dim]."""
    batch: int
    cap: int
    bytes: int
    pool: object                       # the captured graphs' memory pool (None without graphs)
    k: torch.Tensor
    v: torch.Tensor
    valid: torch.Tensor                # [rows, columns] bool: the columns each row attends to
    tokens: torch.Tensor               # [rows]: each row's next input id
    positions: torch.Tensor            # [rows]: its position
    slot: torch.Tensor                 # [rows]: the cache column it writes next
    live: torch.Tensor                 # [rows]: 1 where a request decodes
    seen: torch.Tensor                 # [rows, vocab] bool: ids the repetition penalty applies to
    penalty: torch.Tensor              # [rows, 1]
    graphs: dict = field(default_factory=dict)   # attended columns, or ("join", rows, width) -> Captured

    def clear(self) -> None:
        for t in (self.valid, self.tokens, self.positions, self.slot, self.live, self.seen):
            t.zero_()
        self.penalty.fill_(1.0)


@dataclass
class Captured:
    """A captured step or prefill: the graph, the buffers its inputs are copied into, its output."""
    graph: object
    inputs: list
    output: torch.Tensor


class StaticDecoder:
    """Rows of a batch decode together in one cache; each row writes its own next column (`slot`), so
    requests can join a running batch (`join`) and leave it (`leave`) between two steps, and the
    live rows can move to a cache of another size (`fit`)."""

    accepts_joins = True
    max_rows = MAX_BATCH

    def __init__(self, lm, graphs: bool = True, kernels: bool = True):
        self.net = DecodeModel(lm, use_kernels=kernels)
        self.lm, self.graphs, self.kernels = lm, graphs, self.net.kernels
        self.device, self.dtype, self.vocab = self.net.device, self.net.dtype, self.net.vocab
        self._states: OrderedDict[tuple[int, int], CacheState] = OrderedDict()   # (batch, cap) -> cache
        self.state: CacheState | None = None
        self.steps = self.row_steps = 0   # `advance` calls, and live rows summed over them
        self.slots: list[int] = []    # each row's next cache column (host copy of state["slot"])
        self.live: list[bool] = []    # rows holding a request; free rows stay at column 0

    # ---------------------------------------------------------------- rows

    @property
    def batch(self) -> int:
        return self.state.batch if self.state else 0

    @property
    def tokens(self) -> torch.Tensor:
        """Each row's next input id [batch] (the picks of the last `advance`)."""
        return self.state.tokens

    def free_rows(self) -> list[int]:
        return [r for r, on in enumerate(self.live) if not on]

    def reset(self, rows: int, columns: int) -> None:
        """A cache for at least `rows` rows of `columns` columns, every row free."""
        self.state = self._state(_batch_for(rows), _cap_for(columns))
        self.state.clear()
        self.slots, self.live = [0] * self.batch, [False] * self.batch

    def fit(self, rows: int, columns: int) -> dict[int, int]:
        """Moves the live rows, their caches and their decoding state into a cache for `rows` rows
        (rounded up to a power of two) of at least `columns` columns, unless the present one has
        that size and enough columns; returns where each live row went ({old: new}, in order)."""
        live = [r for r, on in enumerate(self.live) if on]
        batch, old = _batch_for(rows), self.state
        if old is not None and old.batch == batch and old.cap >= columns:
            return {r: r for r in live}
        if len(live) > batch:
            raise ValueError(f"{len(live)} live rows do not fit in {batch}")
        cap = _cap_for(max([columns] + [self.slots[r] + 1 for r in live]))
        new = self._state(batch, cap, keep=old)
        new.clear()
        slots = self.slots
        self.state, self.slots, self.live = new, [0] * batch, [False] * batch
        if live:
            src = torch.tensor(live, device=self.device)
            dst = torch.arange(len(live), device=self.device)
            used = max(slots[r] for r in live)
            for name in ("k", "v"):
                getattr(new, name)[:, dst, :, :used] = getattr(old, name)[:, src, :, :used]
            new.valid[dst, :used] = old.valid[src, :used]
            for name in ("tokens", "positions", "slot", "live", "seen", "penalty"):
                getattr(new, name)[dst] = getattr(old, name)[src]
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
        if width >= s.cap:
            raise ValueError(f"a {width}-column prompt does not fit a cache of {s.cap} columns")
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
        s.tokens[index] = tokens
        s.seen[index] = seen
        s.penalty[index] = penalty

    def leave(self, rows: list[int]) -> None:
        """Frees rows: they stop advancing and hold nothing from here on."""
        if not rows:
            return
        s, index = self.state, torch.tensor(rows, device=self.device)
        s.live[index] = 0
        s.slot[index] = 0
        s.positions[index] = 0
        s.valid[index] = False
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
        penalized = self._run(s, self._attend())
        self.slots = [c + on for c, on in zip(self.slots, self.live)]
        self.steps, self.row_steps = self.steps + 1, self.row_steps + sum(self.live)
        return penalized

    def mark_seen(self) -> None:
        """Adds each row's next input id to the ids it has seen (the repetition penalty's)."""
        s = self.state
        s.seen.scatter_(1, s.tokens[:, None], True)

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
    def teacher_forced(self, prompt: list[int], tokens: list[int]) -> torch.Tensor:
        """Logits [len(tokens), vocab] predicting each of `tokens` after `prompt`, fed one by one
        through the row API (for comparing the decoder with a full forward over the same sequence):
        a join, then each given id fed as the row's next input instead of its pick."""
        n, dev = len(prompt), self.device
        self.reset(1, self.join_width(n) + len(tokens) + 1)
        ids = torch.tensor([prompt], device=dev)
        out = [self.join([0], ids, torch.ones_like(ids), torch.arange(n, device=dev)[None])[0]]
        for t in tokens[:-1]:   # no penalty: the row's penalty is 1 and its seen ids unused
            self.state.tokens[0] = t
            out.append(self.advance()[0].clone())
        self.leave([0])
        return torch.stack(out)

    # ---------------------------------------------------------------- internals

    def _check_room(self) -> None:
        full = [r for r, (c, on) in enumerate(zip(self.slots, self.live)) if on and c >= self.state.cap]
        if full:
            raise ValueError(f"rows {full} have filled their {self.state.cap} cache columns")

    def _state(self, batch: int, cap: int, keep: CacheState | None = None) -> CacheState:
        """The cache for (batch, cap), made or reused (with its captured steps). Made ones are kept,
        the least recently used dropped first, within STATE_MEMORY of the GPU's memory (the state
        `keep` is never dropped while in use)."""
        key = (batch, cap)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        shape = (len(self.net.layers), batch, self.net.arch.kv_heads, cap, self.net.arch.head_dim)
        size = 2 * torch.Size(shape).numel() * self.dtype.itemsize
        budget = STATE_MEMORY * torch.cuda.get_device_properties(self.device).total_memory \
            if self.device.type == "cuda" else float("inf")
        held = lambda: sum(s.bytes for s in self._states.values())  # noqa: E731
        for old in [k for k, s in self._states.items() if s is not keep]:
            if len(self._states) < MAX_STATES and held() + size <= budget:
                break
            del self._states[old]
        d = self.device
        longs = lambda: torch.zeros(batch, dtype=torch.long, device=d)  # noqa: E731
        state = CacheState(batch, cap, size, torch.cuda.graph_pool_handle() if self.graphs else None,
                           k=torch.zeros(shape, dtype=self.dtype, device=d),
                           v=torch.zeros(shape, dtype=self.dtype, device=d),
                           valid=torch.zeros(batch, cap, dtype=torch.bool, device=d),
                           tokens=longs(), positions=longs(), slot=longs(), live=longs(),
                           seen=torch.zeros(batch, self.vocab, dtype=torch.bool, device=d),
                           penalty=torch.ones(batch, 1, device=d))
        self._states[key] = state
        return state

    def _attend(self) -> int:
        """Cache columns the next step attends to: every row's filled ones, rounded up to a bucket."""
        return min(self.state.cap, -(-(max(self.slots) + 1) // ATTEND_BUCKET) * ATTEND_BUCKET)

    def _prefill(self, s, index, ids, mask, positions) -> torch.Tensor:
        """`_join_rows`, captured per (rows, width) within PREFILL_GRAPH_TOKENS."""
        key = ("join",) + tuple(ids.shape)
        if not self.graphs or ids.numel() > PREFILL_GRAPH_TOKENS:
            return self._join_rows(s, index, ids, mask, positions)
        if key not in s.graphs:
            inputs = [t.clone() for t in (index, ids, mask, positions)]
            out = self._join_rows(s, *inputs)   # the real prefill, eager; then captured
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=s.pool):
                static = self._join_rows(s, *inputs)
            s.graphs[key] = Captured(graph, inputs, static)
            return out
        captured = s.graphs[key]
        for buf, t in zip(captured.inputs, (index, ids, mask, positions)):
            buf.copy_(t)
        captured.graph.replay()
        return captured.output

    def _join_rows(self, s, index, ids, mask, positions) -> torch.Tensor:
        """Rows `index` take their prompts: valid columns, next position and column, live; then the
        prefill (keys and values into their cache rows) and its last column's logits."""
        width = ids.shape[1]   # (scalars through index_fill_: indexed assignment copies them from the host)
        columns = torch.arange(width, device=self.device)
        s.valid.index_fill_(0, index, False)
        # what the next step (column `width`) may see: the prompt's columns, within the window
        s.valid[index, :width] = mask.bool() & self.net.arch.in_window(width, columns)
        s.positions[index] = positions[:, -1] + 1
        s.slot.index_fill_(0, index, width)
        s.live.index_fill_(0, index, 1)
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        causal &= self.net.arch.in_window(columns[:, None], columns[None, :])
        allowed = causal[None] & mask.bool()[:, None, :]
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # padding: no empty row
        return self.net.prefill(s, index, ids, positions, self.net.additive(allowed[:, None]))

    def _run(self, s: CacheState, attend: int) -> torch.Tensor:
        """One step: eager without graphs; else the captured step for `attend` columns, captured after
        running it eagerly the first time (the eager run is the real step)."""
        if not self.graphs:
            return self._step(s, attend)
        if attend not in s.graphs:
            out = self._step(s, attend)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=s.pool):
                static = self._step(s, attend)
            s.graphs[attend] = Captured(graph, [], static)
            return out
        captured = s.graphs[attend]
        captured.graph.replay()
        return captured.output

    def _step(self, s: CacheState, attend: int):
        """Every row's token through the model, its keys and values written at the row's slot; the
        penalized logits' argmax becomes the next input and the live rows move on. With a sliding
        window, the column leaving the window is no longer valid (earlier ones have left already:
        a row's columns hold consecutive positions, its prompt's padding before them)."""
        s.valid.scatter_(1, s.slot[:, None], True)
        window = self.net.arch.window
        if window is not None:
            leaving = (s.slot - window)[:, None]
            kept = (leaving < 0) & s.valid.gather(1, leaving.clamp(min=0))   # column 0 stays as it is
            s.valid.scatter_(1, leaving.clamp(min=0), kept)
        if self.net.fused(s.batch):
            logits = self.net.fused_step(s, attend)
        else:
            logits = self.net.unfused_step(s, attend)
        penalized = penalize(logits, s.seen, s.penalty)
        s.tokens.copy_(penalized.argmax(-1))
        s.positions.add_(s.live)
        s.slot.add_(s.live)
        return penalized

