"""Fast decoding on a GPU: a static KV cache and the one-token step captured as CUDA graphs.

The eager transformers forward spends ~57 ms per token of an Index-1.9B-sized model launching
kernels from Python (bench/NOTES.md); the weights take ~1 ms to read. `StaticDecoder` computes the
same function as transformers' Llama forward with fewer, fused kernels per layer (measured: a step of
~1,600 kernels in transformers' operation order spent 4.9 ms where the weights need 1 ms):
  - q/k/v and gate/up as one GEMM each (the modules keep views into the fused weight, as in training);
  - the residual adds inside the output projections' GEMMs (in-place `addmm_`);
  - one-token steps of up to 16 rows in six Triton kernels per layer (`_fused_step`, kernels.py):
    each projection reads its weight once with RMSNorm or SiLU*mul in front and the residual add
    behind, plus RoPE + the cache write and attention; more rows keep cuBLAS with Triton RMSNorm,
    RoPE and SiLU*mul between. The kernels are checked against the torch operations at start-up
    (the prefill and any fallback use `F.rms_norm`, torch's RoPE and SDPA);
  - one preallocated cache for keys and values; each (batch, cache length, attended length) shape of
    the step is captured once and replayed;
  - greedy batches pick their next token on the GPU and run a step ahead of the host (`greedy`).
Rounding differs from transformers' operation order. In bf16 neither incremental path equals a full
forward exactly, and both are about as far from it: median logits error 0.035 for ours against 0.032
for transformers', argmax agreement 88% for both (bench/NOTES.md, `bench/decode_speed.py`).
In float32, greedy tokens equal `generate`'s (tests).

    decoder = static_decoder(model)          # None off-GPU or for unsupported models
    logits = decoder.start(ids, mask, positions, max_new_tokens)   # prefill (left-padded rows)
    logits = decoder.step(tokens, positions)                       # one token for every row
    for ids in decoder.greedy(logits, seen, penalty, positions, n):   # or: greedy picks on the GPU
        ...

A LoRA adapter is merged into the weights once (`peft merge_adapter`: the peft model then computes
the merged function too, so every path sees the same model).
"""

from __future__ import annotations

import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

from chatlora import kernels
from chatlora.fastpath import architecture_reason, fuse_weights, rope_tables, rotate

ATTEND_BUCKET = 128     # the step attends to the first multiple of this many cache columns
CACHE_BUCKET = 256      # cache length: prompt + new tokens, rounded up
MAX_BATCH = 64


def penalize(logits, seen, penalty):
    """The repetition penalty for rows at once (`generate.next_token`'s rule): logits of ids `seen`
    ([B, vocab] bool) divided by the row's penalty ([B, 1]) where positive, multiplied where not."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def static_decoder(model) -> "StaticDecoder | None":
    """The model's decoder (made once and kept on the model), or None where it does not apply."""
    if os.environ.get("CHATLORA_FAST_DECODE", "1") == "0" or not torch.cuda.is_available():
        return None
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
    def __init__(self, lm, graphs: bool = True):
        c = lm.config
        self.lm, self.graphs = lm, graphs
        self.heads, self.kv_heads = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // self.heads
        self.hidden, self.eps = c.hidden_size, c.rms_norm_eps
        rotary = lm.model.rotary_emb
        self.inv_freq, self.rope_scale = rotary.inv_freq.float(), float(getattr(rotary, "attention_scaling", 1.0))
        self.device = next(lm.parameters()).device
        self.dtype = lm.model.embed_tokens.weight.dtype
        self.layers = [(l.input_layernorm.weight, l.post_attention_layernorm.weight,
                        fuse_weights([l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]),
                        l.self_attn.o_proj.weight, fuse_weights([l.mlp.gate_proj, l.mlp.up_proj]),
                        l.mlp.down_proj.weight)
                       for l in lm.model.layers]
        self.kernels = kernels.available(self.device) and self._kernels_work()
        self._states: OrderedDict = OrderedDict()   # (batch, cache length) -> cache + captured steps
        self.state = None
        self.rows = 0

    # ---------------------------------------------------------------- public

    @torch.inference_mode()
    def start(self, ids, mask, positions, max_new_tokens: int) -> torch.Tensor:
        """Prefill left-padded rows ([B, W] each); returns the last column's logits [B, vocab] (fp32)."""
        rows, width = ids.shape
        batch = 1 << max(0, (rows - 1).bit_length())
        if batch > MAX_BATCH:
            raise ValueError(f"at most {MAX_BATCH} rows decode together")
        cap = -(-(width + max_new_tokens + 1) // CACHE_BUCKET) * CACHE_BUCKET
        self.state = self._state(batch, cap)
        s, self.rows, self.slot = self.state, rows, width
        s["valid"].zero_()
        s["valid"][:rows, :width] = mask.bool()
        pad = batch - rows
        ids = F.pad(ids, (0, 0, 0, pad))
        positions = F.pad(positions, (0, 0, 0, pad))
        causal = torch.ones(width, width, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None] & s["valid"][:, None, :width]
        allowed |= torch.eye(width, dtype=torch.bool, device=self.device)[None]  # padded rows: no empty row
        logits = self._forward(ids, positions, None, width, self._additive(allowed[:, None]))
        return logits[:rows]

    @torch.inference_mode()
    def step(self, tokens, positions) -> torch.Tensor:
        """One token per row ([B] ids and positions); returns logits [B, vocab] (fp32)."""
        s = self.state
        if self.slot >= s["cap"]:
            raise ValueError("the static cache is full: start() was given a smaller max_new_tokens")
        s["tokens"].zero_()
        s["tokens"][:self.rows] = tokens
        s["positions"].zero_()
        s["positions"][:self.rows] = positions
        s["slot"].fill_(self.slot)
        attend = self._attend()
        self.slot += 1
        return self._run(s, attend, pick=False)[:self.rows].clone()

    @torch.inference_mode()
    def greedy(self, logits, seen, penalty, positions, count: int):
        """Greedy decoding with the picks on the device: yields `count` lists of each row's next id.
        The first comes from `logits` (start()'s); each later one from a captured step that also
        applies the repetition `penalty` ([B, 1]) over the `seen` ids ([B, vocab] bool), takes the
        argmax and feeds it to the next step, so the host never stands between two steps: step n+1
        runs while the caller handles step n's ids (stopping early wastes one step). Same picks as
        `step` + penalty + argmax on the host (tested)."""
        s, rows = self.state, self.rows
        if "seen" not in s:
            s["seen"] = torch.zeros(s["batch"], logits.shape[-1], dtype=torch.bool, device=self.device)
            s["penalty"] = torch.ones(s["batch"], 1, device=self.device)
        s["seen"].zero_()
        s["seen"][:rows] = seen
        s["penalty"].fill_(1.0)
        s["penalty"][:rows] = penalty
        s["positions"].zero_()
        s["positions"][:rows] = positions
        s["slot"].fill_(self.slot)
        s["tokens"].zero_()
        self._pick(s, F.pad(logits.float(), (0, 0, 0, s["batch"] - rows)))
        cuda = self.device.type == "cuda"
        host = torch.empty(2, s["batch"], dtype=torch.long, pin_memory=cuda)
        done = [torch.cuda.Event() if cuda else None for _ in range(2)]
        host[0].copy_(s["tokens"])
        yield host[0, :rows].tolist()
        for n in range(1, count):
            if self.slot >= s["cap"]:
                raise ValueError("the static cache is full: start() was given a smaller max_new_tokens")
            self._run(s, self._attend(), pick=True)
            self.slot += 1
            host[n % 2].copy_(s["tokens"], non_blocking=cuda)
            if cuda:
                done[n % 2].record()
            if n > 1:
                yield self._ready(host, done, n - 1)
        if count > 1:
            yield self._ready(host, done, count - 1)

    def _ready(self, host, done, n: int) -> list[int]:
        if done[n % 2] is not None:
            done[n % 2].synchronize()
        return host[n % 2, :self.rows].tolist()

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

    def _state(self, batch: int, cap: int) -> dict:
        key = (batch, cap)
        if key in self._states:
            self._states.move_to_end(key)
            return self._states[key]
        while len(self._states) >= 2:   # keep the two most recent caches (and their graphs)
            self._states.popitem(last=False)
        shape = (len(self.layers), batch, self.kv_heads, cap, self.head_dim)
        state = {"batch": batch, "cap": cap, "graphs": {},
                 "pool": torch.cuda.graph_pool_handle() if self.graphs else None,
                 "k": torch.zeros(shape, dtype=self.dtype, device=self.device),
                 "v": torch.zeros(shape, dtype=self.dtype, device=self.device),
                 "valid": torch.zeros(batch, cap, dtype=torch.bool, device=self.device),
                 "tokens": torch.zeros(batch, dtype=torch.long, device=self.device),
                 "positions": torch.zeros(batch, dtype=torch.long, device=self.device),
                 "slot": torch.zeros(1, dtype=torch.long, device=self.device)}
        self._states[key] = state
        return state

    def _kernels_work(self) -> bool:
        """Runs the Triton kernels once (compiling them) against their torch references: the
        element-wise ones on a small example, `linear` on layer 0's weights and the head at one row
        and at two (its two code paths), attention with the model's heads on a small cache against
        the decoder's own SDPA. On any failure the decoder keeps the torch operations."""
        try:
            g = torch.Generator().manual_seed(0)
            rand = lambda *shape: torch.randn(*shape, generator=g).to(self.device, self.dtype)  # noqa: E731
            pairs = self._elementwise_pairs(rand)
            n1, n2, wqkv, wo, wgu, wd = self.layers[0]
            head, final = self.lm.lm_head.weight, self.lm.model.norm.weight
            norm = lambda x, w: F.rms_norm(x, (x.shape[1],), w, self.eps)  # noqa: E731
            for rows in (1, 2):
                h, a, gu = rand(rows, self.hidden), rand(rows, wo.shape[1]), rand(rows, wgu.shape[0])
                inter = wd.shape[1]
                pairs += [(kernels.linear(h, wqkv, norm=n1, eps=self.eps), norm(h, n1) @ wqkv.t()),
                          (kernels.linear(a, wo, residual=h.clone()), h + a @ wo.t()),
                          (kernels.linear(gu, wd, gated=True), (F.silu(gu[:, :inter]) * gu[:, inter:]) @ wd.t()),
                          (kernels.linear(h, head, norm=final, eps=self.eps, out_dtype=torch.float32),
                           norm(h, final) @ head.t())]
            hd = self.head_dim
            q, kc, vc = rand(2, self.heads, 1, hd), rand(2, self.kv_heads, 40, hd), rand(2, self.kv_heads, 40, hd)
            valid = torch.arange(40, device=self.device)[None] < torch.tensor([[30], [9]], device=self.device)
            want = self._attention(q, kc, vc, 32, self._additive(valid[:, None, None, :32]))
            pairs.append((kernels.decode_attention(q, kc, vc, valid, 32, hd ** -0.5), want.reshape(2, -1)))
            bad = [i for i, (ours, ref) in enumerate(pairs)
                   if not (ours.float() - ref.float()).norm() <= 0.02 * ref.float().norm()]
            if not bad:
                return True
            reason = f"outputs {bad} differ from the torch operations"
        except Exception as e:  # noqa: BLE001 - any compiler or driver failure: fall back
            reason = f"{type(e).__name__}: {e}"
        print(f"chatlora: the fused decode kernels are off ({reason}); decoding with torch operations")
        return False

    def _elementwise_pairs(self, rand) -> list:
        """(kernel output, torch reference) for RMSNorm, RoPE + the cache write and SiLU*mul."""
        nq, nkv, hd = 2, 1, self.head_dim
        y, cos, sin, w = rand(2, (nq + 2 * nkv) * hd), rand(2, hd), rand(2, hd), rand((nq + 2 * nkv) * hd)
        slot = torch.tensor([3], device=self.device)
        caches = [torch.zeros(2, 2, nkv, 4, hd, dtype=self.dtype, device=self.device) for _ in range(2)]
        q, ref_q = (rope(y, cos, sin, slot, *c, nq, nkv) for rope, c in
                    zip((kernels.rope_to_cache, kernels.rope_to_cache_reference), caches))
        half = y.shape[1] // 2
        return [(q, ref_q), (caches[0], caches[1]),
                (kernels.rms_norm(y, w, self.eps), F.rms_norm(y, (y.shape[1],), w, self.eps)),
                (kernels.silu_mul(y), F.silu(y[:, :half]) * y[:, half:])]

    def _attend(self) -> int:
        """Cache columns the next step attends to: the filled ones, rounded up to a bucket."""
        return min(self.state["cap"], -(-(self.slot + 1) // ATTEND_BUCKET) * ATTEND_BUCKET)

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
        s["valid"].index_fill_(1, s["slot"], True)
        if self._fused(s["batch"]):
            logits = self._fused_step(s, attend)
        else:
            mask = self._additive(s["valid"][:, None, None, :attend])
            logits = self._forward(s["tokens"][:, None], s["positions"][:, None], s["slot"], attend, mask)
        if pick:
            self._pick(s, logits)
            s["positions"].add_(1)
            s["slot"].add_(1)
        return logits

    def _pick(self, s, logits) -> None:
        """The next input ids: greedy over the penalized logits (as `generate.next_token`), marked seen."""
        token = penalize(logits, s["seen"], s["penalty"]).argmax(-1)
        s["seen"].scatter_(1, token[:, None], True)
        s["tokens"].copy_(token)

    def _additive(self, allowed):
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, float("-inf"))

    def _attention(self, q, kc, vc, attend: int, mask) -> torch.Tensor:
        """SDPA of q [B, nq, T, hd] over the first `attend` cache columns; [B, T, nq, hd] out."""
        keys, values = kc[:, :, :attend], vc[:, :, :attend]
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.head_dim ** -0.5).transpose(1, 2)

    def _fused(self, batch: int) -> bool:
        return self.kernels and batch <= kernels.LINEAR_ROWS

    def _fused_step(self, s, attend: int) -> torch.Tensor:
        """A one-token step for at most kernels.LINEAR_ROWS rows in six kernels per layer
        (kernels.py): q/k/v with RMSNorm in front; RoPE + the cache write; attention over the valid
        cache columns; o adding into the residual; gate/up with RMSNorm in front; down with SiLU*mul
        in front adding into the residual. The head takes the final RMSNorm and writes fp32 logits."""
        nq, nkv, hd, b = self.heads, self.kv_heads, self.head_dim, s["batch"]
        cos, sin = rope_tables(s["positions"][:, None], self.inv_freq, self.rope_scale, self.dtype)
        cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        h = F.embedding(s["tokens"], self.lm.model.embed_tokens.weight)
        ours = kernels.attention_wins(b, attend)
        mask = None if ours else self._additive(s["valid"][:, None, None, :attend])
        for i, (n1, n2, wqkv, wo, wgu, wd) in enumerate(self.layers):
            kc, vc = s["k"][i], s["v"][i]
            y = kernels.linear(h, wqkv, norm=n1, eps=self.eps)
            q = kernels.rope_to_cache(y, cos, sin, s["slot"], kc, vc, nq, nkv)
            if ours:
                a = kernels.decode_attention(q, kc, vc, s["valid"], attend, hd ** -0.5)
            else:
                a = self._attention(q, kc, vc, attend, mask).reshape(b, nq * hd)
            kernels.linear(a, wo, residual=h)
            gu = kernels.linear(h, wgu, norm=n2, eps=self.eps)
            kernels.linear(gu, wd, gated=True, residual=h)
        return kernels.linear(h, self.lm.lm_head.weight, norm=self.lm.model.norm.weight, eps=self.eps,
                              out_dtype=torch.float32)

    def _forward(self, ids, positions, slot, attend: int, mask):
        """Rows [B, T] through the model; K/V written at columns 0..T-1 (prefill, slot None) or at
        `slot` (a step); attention over the first `attend` columns. Logits of the last position."""
        s, (b, t) = self.state, ids.shape
        nq, nkv, hd = self.heads, self.kv_heads, self.head_dim
        cos, sin = rope_tables(positions, self.inv_freq, self.rope_scale, self.dtype)   # [B, T, hd]
        h = F.embedding(ids, self.lm.model.embed_tokens.weight).view(b * t, self.hidden)
        elementwise = self.kernels and slot is not None   # one-token steps: Triton RMSNorm, RoPE, SiLU*mul
        norm = ((lambda x, w: kernels.rms_norm(x, w, self.eps)) if elementwise
                else (lambda x, w: F.rms_norm(x, (self.hidden,), w, self.eps)))
        if slot is not None:
            cos, sin = cos.reshape(b, hd), sin.reshape(b, hd)
        for i, (n1, n2, wqkv, wo, wgu, wd) in enumerate(self.layers):
            y = norm(h, n1) @ wqkv.t()
            kc, vc = s["k"][i], s["v"][i]
            if slot is not None:   # one token per row, written at column `slot`
                q = (kernels.rope_to_cache if elementwise else kernels.rope_to_cache_reference)(
                    y, cos, sin, slot, kc, vc, nq, nkv)
            else:                  # prefill: columns 0..t-1
                qk = rotate(y[:, :(nq + nkv) * hd].view(b, t, nq + nkv, hd), cos[:, :, None], sin[:, :, None])
                q = qk[:, :, :nq].transpose(1, 2)
                kc[:, :, :t] = qk[:, :, nq:].transpose(1, 2)
                vc[:, :, :t] = y[:, (nq + nkv) * hd:].view(b, t, nkv, hd).transpose(1, 2)
            a = self._attention(q, kc, vc, attend, mask)
            # in place: out-of-place addmm first copies h into its output (a kernel per call)
            h = h.addmm_(a.reshape(b * t, nq * hd), wo.t())
            gu = norm(h, n2) @ wgu.t()
            if elementwise:
                act = kernels.silu_mul(gu)
            else:
                gate, up = gu.chunk(2, dim=-1)
                act = F.silu(gate) * up
            h = h.addmm_(act, wd.t())
        h = F.rms_norm(h.view(b, t, -1)[:, -1], (self.hidden,), self.lm.model.norm.weight, self.eps)
        # weight @ h.T: with an odd vocabulary (Index: 65,029) the [B, vocab] output's rows are
        # misaligned and cuBLAS falls back to a slow kernel (measured at batch 16: 0.31 ms of 3.4)
        return (self.lm.lm_head.weight @ h.t()).t().float()
