"""Where chatlora's Triton kernels can run, for every layer that has some (the decoder's, the NF4
de-quantisation): `triton` and `tl` (None without Triton: CPU-only installs keep torch's operations),
and `available(device)`: a CUDA device, or Triton's CPU interpreter under TRITON_INTERPRET=1 (tests);
`switched_on()`: unless CHATLORA_TRITON=0 turns every kernel off (torch's operations instead);
`enabled(device)`: both; `in_cache(names)`: whether Triton's on-disk cache holds any of those kernels
(a machine's first run compiles them before its first step, which the user is told).
"""

from __future__ import annotations

import os
from pathlib import Path

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


def cache_dir() -> Path:
    """Where Triton keeps compiled kernels: its configured directory, TRITON_CACHE_DIR, or its default."""
    configured = getattr(getattr(getattr(triton, "knobs", None), "cache", None), "dir", None)
    return Path(configured or os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache")


def in_cache(names) -> bool:
    """Whether any kernel named in `names` has a compiled copy in Triton's cache (each compiled kernel
    is a folder holding `<name>.json` beside its binaries)."""
    root = cache_dir()
    wanted = {f"{name}.json" for name in names}
    return root.is_dir() and any(path.name in wanted for path in root.glob("*/*.json"))
