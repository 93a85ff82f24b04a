"""Where chatlora's Triton kernels can run, for every layer that has some (the decoder's, the NF4
de-quantisation): `triton` and `tl` (None without Triton: CPU-only installs keep torch's operations),
and `available(device)`: a CUDA device, or Triton's CPU interpreter under TRITON_INTERPRET=1 (tests);
`switched_on()`: unless CHATLORA_TRITON=0 turns every kernel off (torch's operations instead);
`enabled(device)`: both.
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


def switched_on() -> bool:
    return os.environ.get("CHATLORA_TRITON", "1") != "0"


def enabled(device: torch.device) -> bool:
    return available(device) and switched_on()
