"""LoRA adapters in the ecosystem's format (peft): attach, save, load, merge.

An adapter directory holds `adapter_config.json` + `adapter_model.safetensors` and loads with plain
`peft.PeftModel.from_pretrained(base, path)` (and in vLLM). chatlora adds nothing to it.

    model = attach(base_model, cfg.lora)
    save_adapter(model, run / "final")
    model = load_adapter(base_model, run / "final")
    merged = merge(model)            # a plain transformers model with the update folded in
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatlora.errors import UserError
from chatlora.models.quantize import is_quantized, quiet_optional_imports

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ADAPTER = "default"   # peft's name for a model's only adapter


def saved_name(parameter_name: str) -> str:
    """peft's saved name of an adapter parameter: its name without the adapter's."""
    return parameter_name.replace(f".{ADAPTER}.", ".")


def peft_module():
    """peft, imported quietly (`quiet_optional_imports`: it probes torchao and bitsandbytes)."""
    with quiet_optional_imports():
        import peft
    return peft


def attach(model, lora_cfg):
    """Wrap `model` with trainable LoRA adapters on `lora_cfg.targets`; everything else frozen."""
    peft = peft_module()

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in lora_cfg.targets if t not in names]
    if missing:
        raise UserError(f"lora.targets {missing} are not modules of this model "
                        f"(linear layers here include: {', '.join(sorted(_linear_names(model)))})")
    config = peft.LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=list(lora_cfg.targets), use_rslora=lora_cfg.rslora,
                        use_dora=lora_cfg.dora, bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def _linear_names(model) -> set[str]:
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def trainable_parameters(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def save_adapter(model, directory: Path, state_dict: dict | None = None) -> None:
    """PEFT format, safetensors; the base model's own weights are not written. `state_dict`: the
    adapter weights to write instead of the model's own (full copies of sharded parameters)."""
    extra = {"state_dict": state_dict} if state_dict is not None else {}
    model.save_pretrained(str(directory), safe_serialization=True, **extra)


def set_adapter_weights(model, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter weights (`source`: where they came from, for the message) into `model`'s
    adapters: a peft model's, or a model built without peft (models/native.py) under the same names."""
    if hasattr(model, "load_adapter_tensors"):
        model.load_adapter_tensors(tensors, source)
        return
    result = peft_module().set_peft_model_state_dict(model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise RuntimeError(f"{source}: adapter weights do not fit the model: {result.unexpected_keys[:3]}")


def load_adapter(base_model, directory: Path, trainable: bool = False):
    PeftModel = peft_module().PeftModel
    if not all((Path(directory) / f).is_file() for f in ADAPTER_FILES):
        raise UserError(f"{directory} is not a LoRA adapter directory (needs {', '.join(ADAPTER_FILES)})")
    return PeftModel.from_pretrained(base_model, str(directory), is_trainable=trainable)


def merge(peft_model):
    """The base model with every adapter update added into its weights (peft merge_and_unload). Never
    into 4-bit weights: rounding the sum back to NF4 loses most of a LoRA update (load the 16-bit base)."""
    if is_quantized(peft_model):
        raise UserError("refusing to merge an adapter into 4-bit NF4 weights (the update would be rounded "
                        "away); merge into the 16-bit base instead")
    return peft_model.merge_and_unload()
