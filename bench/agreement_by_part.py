"""Which part of the fused pass moves its per-step losses away from the plain peft path's.

    python bench/make_index_model.py /tmp/idx
    python bench/agreement_by_part.py /tmp/idx out.json default,all_kernels_off,lora_kernels_off,norm_torch

Trains the self-llm job 30 steps with dropout off (both paths then compute the same function) on the
plain path once, then on the fused pass + CUDA graphs with each named part swapped for torch's
operations (`PARTS`), and prints, per run, the largest and the mean signed relative difference of
its step losses from the plain path's, and its held-out loss. On a GPU.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "src"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import train_speed as ts  # noqa: E402

from chatlora.models.arch import rotate  # noqa: E402
from chatlora.train import fused, loop, lora_kernels  # noqa: E402
from chatlora.train import kernels as tk  # noqa: E402


def rms_torch(x, w, eps):   # transformers' RMSNorm
    h = x.float()
    return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def silu_torch(gate_up):
    g, u = gate_up.chunk(2, -1)
    return F.silu(g) * u


def rope_torch(y, cos, sin, heads, kv_heads):   # kernels.rope_qkv's result by torch's operations
    t, hd = y.shape[0], cos.shape[-1]
    qk = y[:, :(heads + kv_heads) * hd].reshape(t, heads + kv_heads, hd)
    v = y[:, (heads + kv_heads) * hd:].reshape(t, kv_heads, hd)
    return rotate(qk, cos[:, None, :], sin[:, None, :]), v


ce = fused.chunked_cross_entropy
PARTS = {
    "default": [],
    "all_kernels_off": [(os.environ, "CHATLORA_TRITON", "0")],
    "lora_kernels_off": [(lora_kernels, "covers", lambda w: False)],
    "norm_torch": [(tk, "rms_norm", rms_torch)],
    "silu_torch": [(tk, "silu_mul", silu_torch)],
    "rope_torch": [(tk, "rope_qkv", rope_torch)],
    "ce_torch": [(fused, "chunked_cross_entropy", lambda *a, **k: ce(*a, **{**k, "kernel": False}))],
    "adamw_per_param": [(loop, "FlatAdamW", lambda params, flat, **s: torch.optim.AdamW(params, **s))],
}


def run(model_dir: str, mode: str, part: str) -> tuple[list[float], float]:
    """(step losses, final held-out loss) of 30 steps on `mode` ("plain" or "graphs") with `part` swapped."""
    saved = []
    for obj, name, value in PARTS[part]:
        if obj is os.environ:
            saved.append((obj, name, os.environ.get(name)))
            os.environ[name] = value
        else:
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, value)
    try:
        run = ts.agreement_run(model_dir, mode, 30)
        return run["losses"], run["held_out_loss"]
    finally:
        for obj, name, value in saved:
            if obj is os.environ and value is None:
                os.environ.pop(name)
            elif obj is os.environ:
                os.environ[name] = value
            else:
                setattr(obj, name, value)


def main() -> None:
    model_dir, out_path, parts = sys.argv[1], Path(sys.argv[2]), sys.argv[3].split(",")
    out = {"plain": run(model_dir, "plain", "default")}
    for part in parts:
        out[part] = run(model_dir, "graphs", part)
        out_path.write_text(json.dumps(out))
    plain = out["plain"][0]
    print(f"{'fast path with':<20}{'max rel':>10}{'mean signed':>13}{'held-out':>10}")
    for k, (losses, held) in out.items():
        d = [(b - a) / a for a, b in zip(plain, losses)]
        print(f"{k:<20}{max(map(abs, d)):>10.2e}{sum(d) / len(d):>+13.2e}{held:>10.5f}")


if __name__ == "__main__":
    main()
