"""The training-memory estimate (chatlora.train.memory) against peaks measured on the H200.

    python bench/make_index_model.py /tmp/m/index-1.9b --layers 1          # tokenizers and templates only:
    python bench/make_family_model.py qwen3-1.7b /tmp/m/qwen3-1.7b --layers 1 --qwen-vocabulary qwen.tiktoken
    python bench/make_family_model.py qwen2.5-1.5b /tmp/m/qwen2.5-1.5b --layers 1 --qwen-vocabulary qwen.tiktoken
    python bench/make_family_model.py llama-3.2-1b /tmp/m/llama-3.2-1b --layers 1
    python bench/memory_estimate.py /tmp/m

Runs on a CPU. For each measured run (`bench/train_speed.py`'s peak, committed under bench/results/),
the bundled data goes through the same model directory's tokenizer and template as the benchmark's
(one layer suffices: the estimate takes the full shape from the benchmark's settings), the run's first
optimizer steps (warm-up + timed: 25) are planned as training plans them, and the estimate for
their largest pass is printed beside the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).parent))

from make_family_model import SHAPES  # noqa: E402
from make_index_model import INDEX_1_9B  # noqa: E402

from chatlora.config import load_config  # noqa: E402
from chatlora.data.dataset import dataset_for_config  # noqa: E402
from chatlora.train.memory import GIB, ModelShape, estimate, largest_pass  # noqa: E402

RESULTS = Path(__file__).parent / "results"
MEASURED = [  # model, variant, results file with its peak, the run's key there, steps it planned (warm-up + timed)
    ("index-1.9b", "graphs", "2026-11-30-h200-train-index-1.9b-in-place-dx.json", "graphs", 25),
    ("index-1.9b", "lowmem", "2026-11-30-h200-train-index-1.9b-in-place-dx.json", "lowmem", 25),
    ("index-1.9b", "batch64", "2026-11-30-h200-train-index-1.9b-in-place-dx.json", "batch64", 25),
    ("index-1.9b", "nf4", "2026-11-30-h200-train-index-1.9b-in-place-dx.json", "nf4", 25),
    ("index-1.9b", "nf4_lowmem", "2026-11-30-h200-train-index-1.9b-in-place-dx.json", "nf4_lowmem", 25),
    ("qwen3-1.7b", "graphs", "2026-11-30-h200-train-families-in-place-dx.json", "qwen3-1.7b", 25),
    ("qwen2.5-1.5b", "graphs", "2026-11-30-h200-train-families-in-place-dx.json", "qwen2.5-1.5b", 25),
    ("llama-3.2-1b", "graphs", "2026-11-30-h200-train-families-in-place-dx.json", "llama-3.2-1b", 25),
]
VARIANTS = {  # variant: (preset, train overrides, 4-bit base)
    "graphs": (None, {}, False), "lowmem": ("lowmem", {}, False),
    "batch64": (None, {"examples_per_step": 64, "micro_batch_examples": 64, "micro_batch_tokens": 4096}, False),
    "nf4": (None, {}, True), "nf4_lowmem": ("lowmem", {}, True)}


def full_shape(model: str) -> ModelShape:
    if model == "index-1.9b":
        return ModelShape.from_config(dict(INDEX_1_9B, model_type="llama"))
    _, settings = SHAPES[model]
    return ModelShape.from_config(settings)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("models", type=Path, help="folder of one-layer model directories named as above")
    args = parser.parse_args()
    rows = []
    for model, variant, results, key, steps in MEASURED:
        preset, train, nf4 = VARIANTS[variant]
        overrides = ["data.held_out_fraction=0"] + [f"train.{k}={v}" for k, v in train.items()]
        cfg = load_config(overrides=overrides, flags={"model.path": str(args.models / model)}, preset=preset)
        examples = dataset_for_config(cfg).dataset.train
        largest = largest_pass(examples, cfg.train, steps)
        got = estimate(full_shape(model), dtype="bfloat16", rank=cfg.lora.r, targets=cfg.lora.targets,
                       checkpoint=cfg.train.gradient_checkpointing, largest=largest,
                       nf4=nf4)
        measured = json.loads((RESULTS / results).read_text())[key]["peak_gib"]
        rows.append({"model": model, "variant": variant, "largest_pass": largest._asdict(),
                     "estimate": got.as_json(), "measured_gib": round(measured, 2),
                     "error": round(got.total / GIB / measured - 1, 3)})
    print(json.dumps(rows, indent=1))
    print(f"\n{'model':<14}{'variant':<11}{'pass tokens':>12}{'supervised':>11}{'weights':>9}{'adapters':>9}"
          f"{'activ.':>8}{'head':>7}{'estimate':>9}{'measured':>9}{'error':>7}")
    for r in rows:
        e, p = r["estimate"], r["largest_pass"]
        print(f"{r['model']:<14}{r['variant']:<11}{p['tokens']:>12}{p['supervised']:>11}{e['weights']:>9.2f}"
              f"{e['adapters']:>9.2f}{e['activations']:>8.2f}{e['head']:>7.2f}{e['total']:>9.2f}"
              f"{r['measured_gib']:>9.2f}{r['error']:>+7.1%}")


if __name__ == "__main__":
    main()
