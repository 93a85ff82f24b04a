"""AdamW over the fused pass's one flat adapter buffer, seen from outside as AdamW over the parameters.

The fused pass (train/fused.py) keeps every LoRA weight in one flat tensor: the peft parameters are
views into it and their gradients views into its gradient. AdamW is elementwise, so one update of
the flat tensor is the update of every parameter, bit for bit, in a handful of kernels; over the
parameters (504 tensors at the Index-1.9B shape) the fused multi-tensor AdamW and the clipping took
3.4 ms of a 37.5 ms step on the H200 (bench/NOTES.md, "Training kernels").

The update is torch's fused AdamW kernel (`torch._fused_adamw_`, the one `torch.optim.AdamW(fused=True)`
launches, on CPU and GPU alike), called here directly: any use of `torch.optim` imports torch._dynamo
(2-3 s on the H200 machine, most of what stood between the model's load and the first step). The
step count, the update skipped on the device when `found_inf` is set, the state made at the first
step and the parameter group are those of `torch.optim.AdamW(..., fused=True)`.

Its `state_dict` is laid out per parameter, exactly as `torch.optim.AdamW(params, fused=True)` gives
it (the moments as views into the flat moments), and `load_state_dict` takes that layout: checkpoints,
resume and a switch between the fused and the plain path see no difference
(tests/test_fastpath.py compares the updates and the checkpoint files).
"""

from __future__ import annotations

import math

import torch

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")   # AdamW's state per element; "step" is one count
# torch.optim.AdamW's group entries that say how it runs, as they read with fused=True: always so here
HOW_IT_RUNS = {"foreach": None, "capturable": False, "differentiable": False, "fused": True,
               "decoupled_weight_decay": True}


class FlatAdamW:
    """`torch.optim.AdamW(params, fused=True, ...)` computed on `flat`, the one tensor every parameter
    of `params` is a view into (its `.grad` likewise). One parameter group."""

    def __init__(self, params: list[torch.Tensor], flat: torch.Tensor, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 amsgrad: bool = False):
        self.params, self.flat = params, flat
        # key for key and in order torch.optim.AdamW's group, so that the state dicts are the same files
        self.group = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "amsgrad": amsgrad,
                      "maximize": False, **HOW_IT_RUNS}
        self.state: dict[str, torch.Tensor] = {}   # made at the first step, as torch.optim makes it
        self.found_inf: torch.Tensor | None = None   # where set (1.0), the step's update is skipped on the device
        storage = flat.untyped_storage().data_ptr()
        self._spans = []   # per parameter: where its elements start in `flat`, and its shape
        for p in params:
            if p.untyped_storage().data_ptr() != storage or not p.is_contiguous():
                raise ValueError("FlatAdamW needs every parameter to be a contiguous view into the flat tensor")
            self._spans.append(((p.data_ptr() - flat.data_ptr()) // flat.element_size(), p.shape))

    @property
    def param_groups(self) -> list[dict]:   # the learning-rate schedule writes "lr" here, as into torch's
        return [self.group]

    def step(self) -> None:
        g, flat = self.group, self.flat
        if not self.state:
            self.state = {"step": torch.zeros((), dtype=torch.float32, device=flat.device),
                          "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            if g["amsgrad"]:
                self.state["max_exp_avg_sq"] = torch.zeros_like(flat)
        s = self.state
        s["step"].add_(1)
        beta1, beta2 = g["betas"]
        torch._fused_adamw_([flat.detach()], [flat.grad], [s["exp_avg"]], [s["exp_avg_sq"]],
                            [s["max_exp_avg_sq"]] if g["amsgrad"] else [], [s["step"]], amsgrad=g["amsgrad"],
                            lr=g["lr"], beta1=beta1, beta2=beta2, weight_decay=g["weight_decay"], eps=g["eps"],
                            maximize=g["maximize"], grad_scale=None, found_inf=self.found_inf)
        if self.found_inf is not None:   # a skipped step does not count, as in torch.optim
            s["step"].sub_(self.found_inf.to(s["step"].device))

    def state_dict(self) -> dict:
        """AdamW's state dict over the parameters: each moment a view into the flat one."""
        group = {**self.group, "params": list(range(len(self.params)))}
        state = {}
        if self.state:
            for i, (start, shape) in enumerate(self._spans):
                state[i] = {key: value[start:start + math.prod(shape)].view(shape) if key in MOMENTS else value
                            for key, value in self.state.items()}
        return {"state": state, "param_groups": [group]}

    def load_state_dict(self, sd: dict) -> None:
        """Takes the layout `state_dict` gives (AdamW's over the parameters, from either path); the
        settings come from it, as torch.optim takes them, and the tensors go to the flat buffer's device."""
        (group,) = sd["param_groups"]
        self.group = {**{k: v for k, v in group.items() if k != "params"}, **HOW_IT_RUNS}
        self.state = {}
        for key, value in (sd["state"].get(0) or {}).items():
            if key in MOMENTS:
                whole = torch.empty_like(self.flat)
                for i, (start, shape) in enumerate(self._spans):
                    whole[start:start + math.prod(shape)] = sd["state"][i][key].reshape(-1)
                self.state[key] = whole
            else:   # the step count: one for all (each parameter's is the same), on the device as fused keeps it
                self.state[key] = torch.as_tensor(value).to(dtype=torch.float32, device=self.flat.device).clone()
