"""AdamW over the fused pass's one flat adapter buffer, seen from outside as AdamW over the parameters.

The fused pass (train/fused.py) keeps every LoRA weight in one flat tensor: the peft parameters are
views into it and their gradients views into its gradient. AdamW is elementwise, so one update of
the flat tensor is the update of every parameter, bit for bit, in a handful of kernels; over the
parameters (504 tensors at the Index-1.9B shape) the fused multi-tensor AdamW and the clipping took
3.4 ms of a 37.5 ms step on the H200 (bench/NOTES.md, "Training kernels").

Its `state_dict` is laid out per parameter, exactly as `torch.optim.AdamW(params)` gives it (the
moments as views into the flat moments), and `load_state_dict` takes that layout: checkpoints,
resume and a switch between the fused and the plain path see no difference
(tests/test_fastpath.py compares the updates and the checkpoint files).
"""

from __future__ import annotations

import math

import torch

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")   # AdamW's state per element; "step" is one count


class FlatAdamW:
    """`torch.optim.AdamW(params, **settings)` computed on `flat`, the one tensor every parameter of
    `params` is a view into (its `.grad` likewise). One parameter group."""

    def __init__(self, params: list[torch.Tensor], flat: torch.Tensor, **settings):
        self.params, self.flat = params, flat
        self.inner = torch.optim.AdamW([flat], **settings)
        storage = flat.untyped_storage().data_ptr()
        self._spans = []   # per parameter: where its elements start in `flat`, and its shape
        for p in params:
            if p.untyped_storage().data_ptr() != storage or not p.is_contiguous():
                raise ValueError("FlatAdamW needs every parameter to be a contiguous view into the flat tensor")
            self._spans.append(((p.data_ptr() - flat.data_ptr()) // flat.element_size(), p.shape))

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def found_inf(self):
        return getattr(self.inner, "found_inf", None)

    @found_inf.setter
    def found_inf(self, flag: torch.Tensor) -> None:   # fused AdamW skips the update where it is set
        self.inner.found_inf = flag

    def step(self) -> None:
        self.inner.step()

    def state_dict(self) -> dict:
        """AdamW's state dict over the parameters: each moment a view into the flat one."""
        sd = self.inner.state_dict()
        group = {**sd["param_groups"][0], "params": list(range(len(self.params)))}
        flat_state = sd["state"].get(0)
        state = {}
        if flat_state is not None:
            for i, (start, shape) in enumerate(self._spans):
                state[i] = {key: value[start:start + math.prod(shape)].view(shape) if key in MOMENTS else value
                            for key, value in flat_state.items()}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        """Takes the layout `state_dict` gives (AdamW's over the parameters)."""
        (group,) = sd["param_groups"]
        state = sd["state"]
        flat_state = {}
        if state:
            for key, value in state[0].items():
                if key in MOMENTS:
                    whole = torch.empty(self.flat.shape, dtype=value.dtype, device=value.device)
                    for i, (start, shape) in enumerate(self._spans):
                        whole[start:start + math.prod(shape)] = state[i][key].reshape(-1)
                    flat_state[key] = whole
                else:   # the step count: one for all (each parameter's is the same), a copy of it
                    flat_state[key] = value.clone() if torch.is_tensor(value) else value
        self.inner.load_state_dict({"state": {0: flat_state} if flat_state else {},
                                    "param_groups": [{**group, "params": [0]}]})
