"""Training speed of the self-llm job: the tutorial's HF Trainer recipe vs `chatlora train`, one run.

    python bench/make_index_model.py /tmp/index-1.9b            # random Index-1.9B-shaped weights
    python bench/train_speed.py /tmp/index-1.9b --steps 30 --warmup 10 --json results.json

Every path sees the same tokenized huanhuan examples (chatlora's `index` template), the self-llm recipe's LoRA
(r 8, alpha 32, dropout 0.1, q,k,v,o,gate,up,down), 16 examples per optimizer step, lr 1e-4, bf16
weights. The reference is the tutorial's: `transformers.Trainer`, batch 4 x accumulation 4,
gradient checkpointing, `DataCollatorForSeq2Seq` padding to the longest. chatlora's variants
(`VARIANTS`: plain peft model, fused pass eager, the default fused pass + CUDA graphs (also with
its model built by transformers and peft instead of read from the weights, for the start-up), the lowmem
preset, 64 examples per step, and on the 4-bit NF4 base: default, lowmem, plain) each run
`chatlora train` in a fresh process. `--references none,nf4` also runs the recipe on the NF4 base
(the HF QLoRA recipe, torchao's layers); `--held-out-steps N` trains bf16 LoRA and QLoRA N steps each
and compares their held-out losses. Reported: real
(unpadded) tokens/s and seconds per optimizer step (medians over the timed steps, after warm-up,
device synchronized), peak GPU memory, time to the end of the first step (model load, data, capture);
the loss of the reference, the plain path and the fast path on the same first optimizer step with the
same initial adapter (dropout off); per-step losses of the plain and fast paths trained side by side;
with --full-job, the whole 3-epoch command. With --repeat N, each variant runs N times in interleaved
rounds and the run with the median rate is reported (every run's rate beside it). The table comes last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))

from chatlora.config import load_config  # noqa: E402
from chatlora.data.dataset import dataset_for_config  # noqa: E402
from chatlora.models.load import load_model  # noqa: E402
from chatlora.models.lora import attach  # noqa: E402
from chatlora.train.gradients import accumulate_gradients  # noqa: E402
from chatlora.train.loop import train  # noqa: E402
from chatlora.train.steps import StepPlan, pack  # noqa: E402


def job_config(model_dir: str, preset: str | None = None, quantize: str = "none", **train):
    overrides = ["data.held_out_fraction=0", "train.eval_every=0", "train.save_every=0", f"model.quantize={quantize}"]
    overrides += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(overrides=overrides, flags={"model.path": model_dir}, preset=preset)


def reference_trainer(cfg, examples, steps: int, warmup: int, quantize: str = "none") -> dict:
    """The tutorial's training, exactly: HF Trainer + peft, batch 4 x 4, gradient checkpointing.
    `quantize="nf4"`: the same on the 4-bit NF4 base (torchao's layers, as chatlora loads it), the
    HF QLoRA recipe."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = dataset_for_config(cfg)
    base, tok = data.base, data.tok
    model = load_model(base, "bfloat16", "cuda", quantize)
    model.enable_input_require_grads()  # what the tutorial's peft + checkpointing setup needs
    model = attach(model, cfg.lora)
    rows = [{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids), "labels": e.labels}
            for e in examples]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4,
                             gradient_accumulation_steps=4, learning_rate=1e-4, max_steps=warmup + steps,
                             gradient_checkpointing=True, logging_steps=10, save_strategy="no",
                             report_to=[], disable_tqdm=True, seed=cfg.train.seed)
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(model=model, args=args, train_dataset=rows,
                      data_collator=_seq2seq_collator(tok.pad_id), callbacks=[Clock()])
    trainer.train()
    step_seconds = [b - a for a, b in zip(times[warmup - 1:], times[warmup:])]
    tokens_per_step = 16 * sum(len(e.input_ids) for e in examples) / len(examples)
    del trainer, model
    return _summary(step_seconds, tokens_per_step, torch.cuda.max_memory_allocated())


def _seq2seq_collator(pad_id: int):
    """DataCollatorForSeq2Seq(padding=True) semantics: pad input_ids with pad, labels with -100
    (our tokenizer is not a transformers one, so the collator is written out)."""
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        out = {k: [] for k in ("input_ids", "attention_mask", "labels")}
        for r in rows:
            n = width - len(r["input_ids"])
            out["input_ids"].append(r["input_ids"] + [pad_id] * n)
            out["attention_mask"].append(r["attention_mask"] + [0] * n)
            out["labels"].append(r["labels"] + [-100] * n)
        return {k: torch.tensor(v) for k, v in out.items()}
    return collate


VARIANTS = {  # name: (label, preset, train overrides, base weights)
    "plain": ("chatlora, plain peft model (fast_path=plain)", None, {"fast_path": "plain"}, "none"),
    "eager": ("chatlora, fused pass, no graphs (fast_path=eager)", None, {"fast_path": "eager"}, "none"),
    "graphs": ("chatlora train (default: fused pass + CUDA graphs)", None, {}, "none"),
    "graphs_torch_ops": ("chatlora train, torch's ops for Triton's (CHATLORA_TRITON=0)", None, {}, "none"),
    "graphs_transformers": ("chatlora train, model built by transformers + peft (CHATLORA_NATIVE_MODEL=0)",
                            None, {}, "none"),
    "lowmem": ("chatlora train --preset lowmem", "lowmem", {}, "none"),
    "one_pass": ("chatlora, a step's 16 examples in one pass (micro_batch_tokens=4096)", None,
                 {"micro_batch_tokens": 4096}, "none"),
    "batch64": ("chatlora, 64 examples per step", None,
                {"examples_per_step": 64, "micro_batch_examples": 64, "micro_batch_tokens": 4096}, "none"),
    "nf4": ("chatlora train --quantize nf4", None, {}, "nf4"),
    "nf4_lowmem": ("chatlora train --quantize nf4 --preset lowmem", "lowmem", {}, "nf4"),
    "nf4_plain": ("chatlora, plain peft on the NF4 base (fast_path=plain)", None, {"fast_path": "plain"}, "nf4"),
}

VARIANT_ENVIRONMENT = {"graphs_torch_ops": {"CHATLORA_TRITON": "0"},   # set in the variant's own process
                       "graphs_transformers": {"CHATLORA_NATIVE_MODEL": "0"}}


def chatlora_path(model_dir: str, name: str, steps: int, warmup: int) -> dict:
    label, preset, overrides, quantize = VARIANTS[name]
    cfg = job_config(model_dir, preset=preset, quantize=quantize, **overrides)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    run = Path(tempfile.mkdtemp()) / "run"
    cfg.train.max_steps = warmup + steps
    train(cfg, run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    timed = rows[warmup:]
    step_seconds = [r["tokens"] / r["tokens_per_s"] for r in timed]
    tokens_per_step = statistics.mean(r["tokens"] for r in timed)
    out = _summary(step_seconds, tokens_per_step, torch.cuda.max_memory_allocated())
    out["time_to_first_step_s"] = rows[0]["elapsed_s"]
    out["startup_s"] = rows[0].get("startup_s")   # data, libraries, device, model, optimizer, ready
    out["label"] = label
    out["losses"] = [r["loss"] for r in rows]
    return out


def in_subprocess(args, name: str) -> dict:
    """`chatlora_path` in a fresh process: its peak memory and time to first step are its own."""
    import subprocess

    out = Path(tempfile.mkdtemp()) / f"{name}.json"
    env = dict(os.environ, **VARIANT_ENVIRONMENT.get(name, {}))
    subprocess.run([sys.executable, __file__, args.model_dir, "--worker", name, "--steps", str(args.steps),
                    "--warmup", str(args.warmup), "--json", str(out)], check=True, env=env)
    return json.loads(out.read_text())


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (the lower middle one of an even count), with every run's rate."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    out["tokens_per_s_each_run"] = [r["tokens_per_s"] for r in runs]
    return out


def first_step_losses(cfg, examples) -> dict:
    """The reference's loss, the plain peft path's and the fast path's (graphs) on the same first
    optimizer step, same initial adapter (B != 0), dropout off: the same function three ways."""
    from chatlora.train.fused_step import FusedStep

    data = dataset_for_config(cfg)
    base, tok = data.base, data.tok
    cfg.lora.dropout = 0.0
    torch.manual_seed(0)
    model = attach(load_model(base, "bfloat16", "cuda"), cfg.lora)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    model.eval()
    step = [examples[i] for i in StepPlan(len(examples), 16, cfg.train.seed).indices(0)]
    plain = accumulate_gradients(model, step, 16, lambda ex: pack(ex, "cuda"), 2048).item()
    collate = _seq2seq_collator(tok.pad_id)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, 16, 4):
            batch = collate([{"input_ids": e.input_ids, "attention_mask": [1] * len(e.input_ids),
                              "labels": e.labels} for e in step[i:i + 4]])
            n = int((batch["labels"][:, 1:] != -100).sum())
            loss = model(**{k: v.cuda() for k, v in batch.items()}).loss.float().item()
            total, count = total + loss * n, count + n
    fast = FusedStep(model, "cuda", graphs=True, capture_at_use=1)
    fast.zero_grad()
    graphs = [fast.accumulate(step, 16, 2048).item() for _ in range(2)]  # capture, then a replay
    return {"reference": total / count, "plain": plain, "graphs_captured": graphs[0], "graphs_replayed": graphs[1]}


def agreement_run(model_dir: str, mode: str, steps: int) -> dict:
    """`steps` steps of the job on `mode` with dropout off (every path then computes the same
    function) and 2% held out: the per-step losses and the final held-out loss."""
    cfg = job_config(model_dir, fast_path=mode, max_steps=steps)
    cfg.data.held_out_fraction, cfg.lora.dropout = 0.02, 0.0
    run = Path(tempfile.mkdtemp()) / "run"
    train(cfg, run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {"losses": [r["loss"] for r in rows if "loss" in r],
            "held_out_loss": [r["held_out_loss"] for r in rows if "held_out_loss" in r][-1]}


def loss_agreement(model_dir: str, steps: int) -> dict:
    """The plain peft path and the default fast path trained side by side from the same seed,
    dropout off: per-step losses and the final held-out loss (`agreement_run`). The plain path runs
    twice: its own run-to-run difference (cuBLAS and flash attention's backward are not
    deterministic on a GPU) is the floor the fast path's difference is read against."""
    out = {mode: agreement_run(model_dir, mode, steps) for mode in ("plain", "graphs")}
    out["plain_again"] = agreement_run(model_dir, "plain", steps)

    def max_relative(a, b):
        return max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    out["max_relative_step_loss_difference"] = max_relative(out["plain"], out["graphs"])
    out["max_relative_step_loss_difference_plain_vs_plain"] = max_relative(out["plain"], out["plain_again"])
    return out


def held_out_agreement(model_dir: str, steps: int) -> dict:
    """bf16 LoRA and QLoRA (the NF4 base) trained side by side, the default fused pass, same seed and
    data (dropout on, as the job has it): the held-out loss after `steps` steps, and its start."""
    out = {}
    for quantize in ("none", "nf4"):
        cfg = job_config(model_dir, quantize=quantize, max_steps=steps, eval_every=steps)
        cfg.data.held_out_fraction = 0.05
        run = Path(tempfile.mkdtemp()) / "run"
        train(cfg, run)
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        held = [r["held_out_loss"] for r in rows if "held_out_loss" in r]
        out[quantize] = {"held_out_loss_start": held[0], "held_out_loss": held[-1],
                         "final_train_loss": [r["loss"] for r in rows if "loss" in r][-1]}
    out["relative_difference"] = (out["nf4"]["held_out_loss"] - out["none"]["held_out_loss"]) / out["none"]["held_out_loss"]
    return out


def full_job(model_dir: str, workdir: Path) -> dict:
    """The whole self-llm job as a user runs it: `chatlora train` with every default (3 epochs, held-out
    loss, checkpoints), model from the safetensors copy in the cache, data from the tokenized cache."""
    import subprocess

    subprocess.run([sys.executable, "-m", "chatlora", "data", "check", "--model", model_dir], check=True,
                   stdout=subprocess.DEVNULL)  # warms the tokenized-data cache, as a previous run would
    run = workdir / "full-run"
    began = time.perf_counter()
    subprocess.run([sys.executable, "-m", "chatlora", "train", "--model", model_dir, "--output", str(run)],
                   check=True)
    command = time.perf_counter() - began
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    first = steps[0]["tokens"] / steps[0]["tokens_per_s"]
    loop = steps[-1]["elapsed_s"] - (steps[0]["elapsed_s"] - first)
    tokens = sum(r["tokens"] for r in steps)
    return {"command_s": command, "training_loop_s": loop, "steps": len(steps), "tokens": tokens,
            "tokens_per_s": tokens / loop, "final_loss": steps[-1]["loss"], "startup_s": steps[0].get("startup_s"),
            "time_to_first_step_s": steps[0]["elapsed_s"],
            "held_out_loss": [r["held_out_loss"] for r in rows if "held_out_loss" in r]}


def _summary(step_seconds, tokens_per_step, peak) -> dict:
    median = statistics.median(step_seconds)
    return {"seconds_per_step": median, "tokens_per_s": tokens_per_step / median,
            "peak_gib": peak / 2**30, "timed_steps": len(step_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--reference-steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS), help="chatlora variants to time")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each variant this many times, interleaved; report the median run")
    parser.add_argument("--agreement-steps", type=int, default=30, help="0 = skip the loss comparison")
    parser.add_argument("--references", default="none",
                        help="the HF recipe on these bases: none (bf16), nf4 (QLoRA, torchao), or both: none,nf4")
    parser.add_argument("--held-out-steps", type=int, default=0,
                        help="also train bf16 LoRA and QLoRA this many steps and compare held-out losses")
    parser.add_argument("--skip-first-step", action="store_true", help="skip the first-step loss comparison")
    parser.add_argument("--full-job", action="store_true", help="also time the whole 3-epoch command")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one variant in this process (clean memory)
    args = parser.parse_args()
    if args.worker:
        Path(args.json).write_text(json.dumps(chatlora_path(args.model_dir, args.worker, args.steps, args.warmup)))
        return
    cfg = job_config(args.model_dir)
    ds = dataset_for_config(cfg).dataset
    results = {"date": str(date.today()), "gpu": torch.cuda.get_device_name(),
               "torch": torch.__version__, "transformers": __import__("transformers").__version__,
               "peft": __import__("peft").__version__, "examples": len(ds.train),
               "mean_tokens_per_example": sum(len(e.input_ids) for e in ds.train) / len(ds.train)}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if not args.skip_first_step:
        results["first_step_loss"] = first_step_losses(cfg, ds.train)
    torch.cuda.empty_cache()
    references = args.references.split(",")
    for quantize in references:
        name = "reference" if quantize == "none" else f"reference_{quantize}"
        results[name] = reference_trainer(cfg, ds.train, args.reference_steps, 3, quantize)
        results[name]["label"] = ("self-llm recipe (HF Trainer, 4x4, ckpt, pad)" if quantize == "none" else
                                  f"HF QLoRA recipe ({quantize}, torchao; 4x4, ckpt, pad)")
        torch.cuda.empty_cache()
        save()
    variants = args.variants.split(",")
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for _ in range(args.repeat):   # rounds of every variant: drift on the machine touches each alike
        for name in variants:
            runs[name].append(in_subprocess(args, name))
            results[name] = median_run(runs[name])
            save()
    if args.agreement_steps:
        results["loss_agreement"] = loss_agreement(args.model_dir, args.agreement_steps)
        save()
    if args.held_out_steps:
        results["held_out_agreement"] = held_out_agreement(args.model_dir, args.held_out_steps)
        save()
    if args.full_job:
        results["full_job"] = full_job(args.model_dir, Path(tempfile.mkdtemp()))
        save()
    print(json.dumps(results, indent=1)[:3000])
    print(f"\n{'path':<56}{'tokens/s':>9}{'s/step':>8}{'GiB':>7}{'1st step s':>11}{'x ref':>7}")
    shown = [("reference" if q == "none" else f"reference_{q}") for q in references] + variants
    for name in shown:   # each against the recipe on its own base (x ref)
        r = results[name]
        nf4 = name == "reference_nf4" or (name in VARIANTS and VARIANTS[name][3] == "nf4")
        ref = results.get("reference_nf4" if nf4 else "reference", {}).get("tokens_per_s", float("nan"))
        print(f"{r['label']:<56}{r['tokens_per_s']:>9.0f}{r['seconds_per_step']:>8.4f}{r['peak_gib']:>7.2f}"
              f"{r.get('time_to_first_step_s', float('nan')):>11.1f}{r['tokens_per_s'] / ref:>7.1f}")
    if args.repeat > 1:
        print("tokens/s of each run:", {n: [round(x) for x in results[n]["tokens_per_s_each_run"]]
                                         for n in args.variants.split(",")})
    if "first_step_loss" in results:
        print("first-step loss:", {k: round(v, 5) for k, v in results["first_step_loss"].items()})
    if "held_out_agreement" in results:
        h = results["held_out_agreement"]
        print(f"held-out loss after {args.held_out_steps} steps: bf16 LoRA {h['none']['held_out_loss']:.4f}, "
              f"QLoRA {h['nf4']['held_out_loss']:.4f} ({100 * h['relative_difference']:+.2f}%; both started at "
              f"{h['none']['held_out_loss_start']:.4f} / {h['nf4']['held_out_loss_start']:.4f})")
    if "loss_agreement" in results:
        a = results["loss_agreement"]
        print(f"{args.agreement_steps} steps, dropout off: max relative step-loss difference plain vs graphs "
              f"{a['max_relative_step_loss_difference']:.2e}; held-out loss plain {a['plain']['held_out_loss']:.5f}"
              f" graphs {a['graphs']['held_out_loss']:.5f}; plain vs plain again (run to run) "
              f"{a['max_relative_step_loss_difference_plain_vs_plain']:.2e}, held-out {a['plain_again']['held_out_loss']:.5f}")
    if "full_job" in results:
        f = results["full_job"]
        print(f"full 3-epoch job: command {f['command_s']:.1f} s, training loop {f['training_loop_s']:.1f} s, "
              f"{f['tokens_per_s']:.0f} tokens/s, held-out loss {f['held_out_loss']}")


if __name__ == "__main__":
    main()
