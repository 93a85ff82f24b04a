"""Which launch shapes (tiles, spans, warps) make the LoRA kernels fastest at a model's projections.

    python bench/lora_kernel_tiles.py MODEL_DIR [--tokens 768] [--json out.json]

Times the LoRA kernels of one pass (lora_kernels.py: the A product, the B product, their
gradients) over a model's four adapted projection groups (q/k/v, o, gate/up, down; LoRA r 8,
dropout 0.1, bf16, `--tokens` rows) with CUDA events, then tries each kernel's alternatives in
`CANDIDATES` in turn, keeping the others at their best so far. A kernel's alternatives are timed
with the kernels that read what it writes (an A product's spans are the B kernel's partial sums;
`_b_grad`'s spans du's, read by dA and dx), and every alternative's outputs must equal the current
launch's to 2e-2 relative (bf16) before it counts. Prints, per kernel, the current and the best
launch and their microseconds per pass (all layers), and the `LAUNCH` table to use. On a GPU.
(u's and du's float32 sums are atomic adds, so the forward's u may differ in its last bits from
run to run; the 2e-2 check is far above that.)
"""

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
from chatlora.train import lora_kernels as lk  # noqa: E402

CANDIDATES = {   # a kernel's launch settings -> the values tried (every combination)
    "a_forward": dict(BT=[16, 32, 64], BK=[64, 128], SPAN=[256, 512, 1024], num_warps=[2, 4, 8]),
    "b_forward": dict(BT=[32, 64, 128], BC=[32, 64, 128], num_warps=[4, 8]),
    "b_grad": dict(BT=[16, 32, 64], BC=[64, 128], SPAN=[256, 512, 1024], num_warps=[4, 8]),
    "a_grad": dict(BT=[16, 32, 64], BK=[64, 128], SPLIT=[64, 128, 256], num_warps=[2, 4, 8]),
    "x_grad": dict(BT=[16, 32, 64], BK=[64, 128], num_warps=[2, 4, 8]),
}
DEVICE, DTYPE = "cuda", torch.bfloat16
GROUP = {"a_forward": "forward", "b_forward": "forward", "b_grad": "backward", "a_grad": "backward",
         "x_grad": "backward"}


def projections(model_dir: str) -> tuple[list[tuple[int, list[int]]], int]:
    """(input width, each adapter's output width) of the four projection groups, and the layer count."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    h, heads = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim") or h // heads
    kv = c.get("num_key_value_heads", heads)
    f = c["intermediate_size"]
    return [(h, [heads * hd, kv * hd, kv * hd]), (heads * hd, [h]), (h, [f, f]), (f, [h])], c["num_hidden_layers"]


def make_inputs(groups, t: int, r: int = 8):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = []
    for d, widths in groups:
        n, total = len(widths), sum(widths)
        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, device=DEVICE, generator=g) * scale).to(DTYPE)
        out.append(dict(x=rand(t, d), a=rand(n, r, d, scale=d ** -0.5), b=rand(total, r, scale=0.02),
                        y=rand(t, total), dy=rand(t, total), columns=[sum(widths[:i]) for i in range(n)],
                        widths=widths, seed=torch.tensor([1234], device=DEVICE)))
    return out


def run_group(which: str, inputs) -> list[torch.Tensor]:
    """The kernels of `which` ("forward" or "backward") over every projection group; their outputs."""
    outs = []
    for i, k in enumerate(inputs):
        u_sum = lk.a_product(k["x"], k["a"], k["seed"], 8 * i, 0.1)
        y = k["y"].clone()
        u = lk.b_product_add(y, u_sum, k["b"], k["columns"], k["widths"])
        if which == "forward":
            outs += [y, u]
            continue
        du, db = lk.b_gradients(k["dy"], u, k["b"], k["columns"], k["widths"])
        outs += [db, lk.a_gradient(k["x"], du, k["seed"], 8 * i, 0.1), lk.x_gradient(du, k["a"], k["seed"], 8 * i, 0.1)]
    return outs


def microseconds(which: str, inputs, repeats: int = 30) -> float:
    """Median time of `which`'s kernels over all groups (backward: less the forward it needs)."""
    def once():
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_group(which, inputs)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3
    once()
    total = statistics.median(once() for _ in range(repeats))
    return total - (microseconds("forward", inputs, repeats) if which == "backward" else 0.0)


def agrees(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return all(((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-2 for a, b in zip(got, want))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("--tokens", type=int, default=768)
    parser.add_argument("--json")
    args = parser.parse_args()
    groups, layers = projections(args.model_dir)
    inputs = make_inputs(groups, args.tokens)
    current = {k: dict(v) for k, v in lk.LAUNCH.items()}
    wanted = {w: run_group(w, inputs) for w in ("forward", "backward")}
    before = {w: microseconds(w, inputs) for w in wanted}
    rows = []
    for kernel, options in CANDIDATES.items():
        which, best, best_us = GROUP[kernel], dict(lk.LAUNCH[kernel]), None
        for values in itertools.product(*options.values()):
            launch = dict(zip(options, values))
            if launch.get("SPAN", 0) % launch.get("BK", launch.get("BC", 1)) or launch.get("SPLIT", 0) % launch["BT"]:
                continue   # a span or split must be whole tiles
            lk.LAUNCH[kernel] = launch
            try:
                ok = agrees(run_group(which, inputs), wanted[which])
                us = microseconds(which, inputs) if ok else None
            except Exception as error:   # e.g. out of shared memory or registers for this tile
                print(f"{kernel} {launch}: {type(error).__name__}", file=sys.stderr)
                us = None
            if us is not None and (best_us is None or us < best_us):
                best, best_us = launch, us
        lk.LAUNCH[kernel] = best
        rows.append((kernel, current[kernel], best, best_us))
        print(f"{kernel}: best {best} ({which} {best_us:.1f} us over {len(groups)} groups)", flush=True)
    after = {w: microseconds(w, inputs) for w in wanted}
    print(f"\n{'kernels':<10}{'us per pass, current':>22}{'best':>10}   (x {layers} layers)")
    for w in wanted:
        print(f"{w:<10}{before[w] * layers:>22.0f}{after[w] * layers:>10.0f}")
    print("\nLAUNCH = {")
    for kernel, launch in lk.LAUNCH.items():
        print(f'    "{kernel}": dict({", ".join(f"{k}={v}" for k, v in launch.items())}),')
    print("}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "tokens": args.tokens, "groups": groups, "layers": layers, "current": current, "best": lk.LAUNCH,
            "us_per_layer_before": before, "us_per_layer_after": after,
            "per_kernel": [{"kernel": k, "current": c, "best": b, "group_us": u} for k, c, b, u in rows]}, indent=1))


if __name__ == "__main__":
    main()
