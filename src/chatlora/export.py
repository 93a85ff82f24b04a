"""Leaving chatlora: a merged, standard Hugging Face model directory.

    chatlora merge runs/huanhuan --output merged/        # base + adapter, safetensors

For an Index base the result is a plain Llama checkpoint with the NormHead already folded, so any
engine that runs Llama (transformers without remote code, vLLM, llama.cpp after conversion) runs
it. The weights are merged in float32 and stored in the base model's dtype. The tokenizer files of
the run are copied; for Index, `tokenizer_config.json` loses its remote-code `auto_map` and gains
the chat template that renders exactly chatlora's `index` format.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from chatlora.atomic import refuse_existing
from chatlora.lora import merge
from chatlora.rundir import load_run, load_tuned_model
from chatlora.tokenizer import TOKENIZER_FILES

# Index's official layout (index-model.md): <unk>{system}, reserved_0{user}reserved_1, the reply bare;
# nothing between turns, and the generation prompt ends at reserved_1.
INDEX_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% if m['content'] %}{{ '<unk>' + m['content'] }}{% endif %}"
    "{% elif m['role'] == 'user' %}{{ 'reserved_0' + m['content'] + 'reserved_1' }}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{% endfor %}"
)


def merge_run(run_path: str | Path, output: str | Path) -> Path:
    """Merge the run's adapter into its base model and write a standard HF directory at `output`."""
    output = Path(output)
    refuse_existing(output)
    run = load_run(run_path)
    model = load_tuned_model(run, device="cpu", dtype="float32")
    merged = merge(model) if run.adapter is not None else model
    base_dtype = _base_dtype(run.base.dir)
    merged = merged.to(base_dtype)
    merged.config.dtype = base_dtype
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (run.dir / "tokenizer" / name).is_file():
                shutil.copyfile(run.dir / "tokenizer" / name, tmp / name)
        if run.base.family == "index":
            _index_tokenizer_config(tmp / "tokenizer_config.json")
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _base_dtype(base_dir: Path) -> torch.dtype:
    config = json.loads((base_dir / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _index_tokenizer_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.pop("auto_map", None)  # never point anyone at remote code
    config["chat_template"] = INDEX_CHAT_TEMPLATE
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
