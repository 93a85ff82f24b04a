"""Decode speed: the self-llm tutorial's inference path vs chatlora's engine, in one run.

    python bench/make_index_model.py /tmp/index-1.9b
    python bench/decode_speed.py /tmp/index-1.9b --new-tokens 256 --json results.json

A LoRA adapter (r 8, the seven projections, random B so it is not a no-op) sits on an
Index-1.9B-shaped model. Paths, all greedy after a 40-token prompt, no stop token:
- tutorial: `PeftModel` (adapter unmerged) + `model.generate`, batch 1 and batch 16 (the tutorial's way);
- chatlora: `decode.engine.Generation` at batch 1 and `decode.engine.BatchGeneration` at batch 16 (on a GPU:
  the static-cache decoder with captured steps, adapter merged; src/chatlora/decode/static.py).
Reported: generated tokens/s, time to first token, and how many rows' greedy tokens equal
transformers' `generate` on the same (merged) model, with the earliest position where any differs.
The table comes last. Runs on CPU too (slowly) with `--device cpu`, for a smoke test.
(Result files before 2026-11-30 call the tutorial path "seed".)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.decode.engine import BatchGeneration, Generation, Sampling  # noqa: E402
from chatlora.models.load import load_model, prepare_base  # noqa: E402
from chatlora.models.lora import attach  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tutorial_path(model, prompts, new_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    ids = torch.tensor(prompts, device=device)
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, repetition_penalty=1.0,
                             eos_token_id=None, pad_token_id=0)
    sync(device)
    return time.perf_counter() - start, out[:, ids.shape[1]:].tolist()


def chatlora_path(model, prompts, new_tokens: int, device: str) -> tuple[float, float, list[list[int]]]:
    s = Sampling(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    sync(device)
    start = time.perf_counter()
    first = None
    tokens: list[list[int]] = [[] for _ in prompts]
    gen = Generation(model, prompts[0], [], s) if len(prompts) == 1 else BatchGeneration(model, prompts, [], [s] * len(prompts))
    for item in gen:
        row, token = (0, item) if len(prompts) == 1 else item
        if first is None:
            sync(device)
            first = time.perf_counter() - start
        tokens[row].append(token)
    sync(device)
    return time.perf_counter() - start, first, tokens


def logits_agreement(model, prompt: list[int], tokens: list[int], device: str) -> dict:
    """Teacher-forced on one greedy continuation: the logits of chatlora's decoder and of transformers'
    incremental decoding (DynamicCache, as generate runs), each against one full forward over the
    whole sequence. Both incremental paths differ from the full forward by rounding; what matters is
    that ours is no further from it than transformers' own, and how small the top-2 margins are
    where greedy picks can flip."""
    from transformers import DynamicCache

    from chatlora.decode.static import static_decoder

    n = len(prompt)
    with torch.inference_mode():
        full = model(input_ids=torch.tensor([prompt + tokens[:-1]], device=device)).logits[0, n - 1:].float()
        dec = static_decoder(model)
        if dec is None:  # CPU smoke run: the same decoder, uncaptured
            from chatlora.decode.static import StaticDecoder

            if hasattr(model, "merge_adapter"):
                model.merge_adapter()
            dec = StaticDecoder(model.get_base_model(), graphs=False)
        ours = dec.teacher_forced(prompt, tokens)
        cache = DynamicCache()
        hf = [model(input_ids=torch.tensor([prompt], device=device), past_key_values=cache,
                    use_cache=True).logits[0, -1].float()]
        for t in tokens[:-1]:
            hf.append(model(input_ids=torch.tensor([[t]], device=device), past_key_values=cache,
                            use_cache=True).logits[0, -1].float())
    out = {}
    for name, logits in (("chatlora", ours), ("transformers_incremental", torch.stack(hf))):
        rel = (logits - full).norm(dim=-1) / full.norm(dim=-1)
        out[name] = {"median_rel_error": rel.median().item(), "max_rel_error": rel.max().item(),
                     "argmax_agreement": (logits.argmax(-1) == full.argmax(-1)).float().mean().item()}
    top2 = full.topk(2, dim=-1).values
    margin = top2[:, 0] - top2[:, 1]
    out["full_forward_top2_margin_median"] = margin.median().item()
    out["full_forward_logit_std"] = full.std(dim=-1).median().item()
    return out


def adapted_model(model_dir: str, dtype: str, device: str):
    """The model with the LoRA adapter, its B matrices random (seeded) so that it is not a no-op."""
    torch.manual_seed(0)
    model = attach(load_model(prepare_base(model_dir), dtype, device), load_config().lora).eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.01)
    return model


def float32_identity(model_dir: str, prompts, new_tokens: int) -> dict:
    """Greedy tokens of chatlora's decoder against transformers' `generate` on the same float32 model
    (adapter merged, as the decoder runs it), batch 1 and batch 16. In bf16 the two differ by rounding
    and greedy picks flip at this random model's near-ties (see logits_agreement_batch1); in float32
    the rounding is ~1e-7 and the tokens should be the same."""
    model = adapted_model(model_dir, "float32", "cuda")
    out = {}
    for b in (1, len(prompts)):
        _, _, ours = chatlora_path(model, prompts[:b], new_tokens, "cuda")
        theirs = tutorial_path(model, prompts[:b], new_tokens, "cuda")[1]
        out[f"batch{b}"] = {"rows_identical": sum(x == y for x, y in zip(ours, theirs)), "rows": b,
                            "tokens_identical": sum(u == v for x, y in zip(ours, theirs) for u, v in zip(x, y)),
                            "tokens": b * new_tokens, "divergences": divergences(model, prompts, ours, theirs)}
    return out


def divergences(model, prompts, ours, theirs) -> list[dict]:
    """Where a row's tokens first differ: one full forward over the shared prefix says how far apart
    the two picks were (a near-tie that rounding can flip, or a real difference)."""
    found = []
    for r, (x, y) in enumerate(zip(ours, theirs)):
        i = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), None)
        if i is None:
            continue
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompts[r] + x[:i]], device="cuda")).logits[0, -1].float()
        top = logits.topk(2).values
        found.append({"row": r, "position": i, "ours": x[i], "generate": y[i],
                      "full_forward_gap_between_the_picks": (logits[x[i]] - logits[y[i]]).item(),
                      "full_forward_top2_margin": (top[0] - top[1]).item(), "logit_std": logits.std().item()})
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--windows", type=int, default=3, help="timed runs of chatlora's path (median)")
    parser.add_argument("--fp32-identity", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare greedy tokens with generate in float32")
    parser.add_argument("--json")
    args = parser.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    model = adapted_model(args.model_dir, dtype, args.device)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 3000, (40,), generator=g).tolist() for _ in range(args.batch)]
    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "torch": torch.__version__, "new_tokens": args.new_tokens, "rows": []}
    batches = (1, args.batch)
    tutorial_path(model, prompts[:1], 8, args.device)  # warm-up
    tutorial = {b: tutorial_path(model, prompts[:b], args.new_tokens, args.device) for b in batches}
    # chatlora: the adapter is merged on first use; the first run of each batch size captures its
    # steps (reported as "first run"), the second is timed.
    first_run = {b: chatlora_path(model, prompts[:b], args.new_tokens, args.device)[0] for b in batches}
    ours = {}
    for b in batches:   # the median of `--windows` timed runs
        runs = sorted((chatlora_path(model, prompts[:b], args.new_tokens, args.device) for _ in range(args.windows)),
                      key=lambda r: r[0])
        ours[b] = runs[len(runs) // 2]
    # "plain generate on the same model": transformers' generate on the merged model
    merged = {b: tutorial_path(model, prompts[:b], args.new_tokens, args.device)[1] for b in batches}
    for b in batches:
        seconds, tutorial_tokens = tutorial[b]
        t, ttft, tokens = ours[b]
        same_rows = sum(x == y for x, y in zip(tokens, merged[b]))
        first_diff = min((next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x))
                          for x, y in zip(tokens, merged[b])), default=None)
        total = b * args.new_tokens
        results["rows"].append({"batch": b, "tutorial_tokens_per_s": total / seconds,
                                "chatlora_tokens_per_s": total / t, "chatlora_first_run_s": first_run[b],
                                "chatlora_ttft_s": ttft, "rows_identical_to_generate_on_merged_model": same_rows,
                                "earliest_divergence": first_diff,
                                "same_as_unmerged_tutorial": tokens == tutorial_tokens})
    results["logits_agreement_batch1"] = logits_agreement(model, prompts[0], ours[1][2][0], args.device)
    from chatlora.decode.static import static_decoder

    dec = static_decoder(model)
    results["triton_decode_kernels"] = bool(dec and dec.kernels)
    if args.fp32_identity and args.device == "cuda":
        del model, dec
        torch.cuda.empty_cache()
        results["float32_identity"] = float32_identity(args.model_dir, prompts, args.new_tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n{'batch':>5}{'tutorial tok/s':>12}{'chatlora tok/s':>16}{'x tutorial':>8}{'TTFT s':>8}{'rows = generate':>17}")
    for r in results["rows"]:
        print(f"{r['batch']:>5}{r['tutorial_tokens_per_s']:>12.1f}{r['chatlora_tokens_per_s']:>16.1f}"
              f"{r['chatlora_tokens_per_s'] / r['tutorial_tokens_per_s']:>8.1f}{r['chatlora_ttft_s']:>8.3f}"
              f"{r['rows_identical_to_generate_on_merged_model']:>11}/{r['batch']}")
    for name, r in results.get("float32_identity", {}).items():
        print(f"float32 {name}: {r['rows_identical']}/{r['rows']} rows, {r['tokens_identical']}/{r['tokens']} tokens "
              f"identical to generate")


if __name__ == "__main__":
    main()
