"""The Triton decode kernels (kernels.py) against the torch operations they replace, on CPU under
Triton's interpreter, in float32 (tests/test_gpu.py runs them compiled on a GPU, in bf16 too).

The interpreter is chosen when the kernels are defined, so the check runs in its own process with
TRITON_INTERPRET=1."""

import importlib
import os
import subprocess
import sys
import textwrap

import pytest

if os.environ.get("CI"):  # CI installs the test extras: a missing triton is a set-up bug, not a skip
    importlib.import_module("triton")
else:
    pytest.importorskip("triton")

CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F

    from chatlora import kernels

    assert kernels.available(torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    b, nq, nkv, hd, cap = 3, 4, 2, 16, 8
    y, cos, sin = torch.randn(b, (nq + 2 * nkv) * hd, generator=g), torch.randn(b, hd, generator=g), torch.randn(b, hd, generator=g)
    w = torch.randn(y.shape[1], generator=g)
    slot = torch.tensor([5])
    kc, vc = torch.randn(b, nkv, cap, hd, generator=g), torch.randn(b, nkv, cap, hd, generator=g)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = kernels.rope_to_cache(y, cos, sin, slot, kc, vc, nq, nkv)
    q_ref = kernels.rope_to_cache_reference(y, cos, sin, slot, kc_ref, vc_ref, nq, nkv)
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kc, kc_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(vc, vc_ref)
    torch.testing.assert_close(kernels.rms_norm(y, w, 1e-6), F.rms_norm(y, (y.shape[1],), w, 1e-6), rtol=1e-5, atol=1e-5)
    half = y.shape[1] // 2
    torch.testing.assert_close(kernels.silu_mul(y), F.silu(y[:, :half]) * y[:, half:], rtol=1e-5, atol=1e-5)
    print("kernels match")
""")


def test_decode_kernels_equal_the_torch_operations_under_the_interpreter():
    done = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1", CHATLORA_TRITON="1"))
    assert done.returncode == 0 and "kernels match" in done.stdout, done.stderr[-3000:]


def test_a_broken_kernel_is_caught():
    """The check above fails when a kernel is wrong (here: RoPE's sin sign flipped by the caller)."""
    broken = CHECK.replace("q = kernels.rope_to_cache(y, cos, sin,", "q = kernels.rope_to_cache(y, cos, -sin,")
    assert broken != CHECK
    done = subprocess.run([sys.executable, "-c", broken], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TRITON_INTERPRET="1", CHATLORA_TRITON="1"))
    assert done.returncode != 0 and "kernels match" not in done.stdout
