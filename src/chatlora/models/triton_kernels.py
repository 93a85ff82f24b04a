"""Where chatlora's Triton kernels can run, for every layer that has some (the decoder's, the NF4
de-quantisation): `triton` and `tl` (None without Triton: CPU-only installs keep torch's operations),
and `available(device)`: a CUDA device, or Triton's CPU interpreter under TRITON_INTERPRET=1 (tests).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None


def available(device: torch.device) -> bool:
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
