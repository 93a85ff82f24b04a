"""A run directory is self-describing: chat, serve, merge and export need nothing else.

    RUN/
      config.yaml          the resolved configuration
      run.json             base model (as given and as resolved), family, template, stop ids, system prompt
      data_report.json     the data check of the training data
      tokenizer/           the tokenizer files the run was trained with
      metrics.jsonl        one line per optimizer step, plus held-out evaluations
      loss_curve.png       train and held-out loss
      checkpoint-<step>/   PEFT adapter + resume state (see checkpoint.py)
      final/               the finished PEFT adapter

`load_run(RUN)` also accepts a checkpoint directory inside a run.

    run = load_run("runs/huanhuan")
    model = load_tuned_model(run)     # base + adapter, eval mode
    ids = run.fmt.prompt(messages)
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from chatlora.atomic import write_text
from chatlora.checkpoint import MARKER, latest_checkpoint
from chatlora.config import Config, config_from_dict, system_prompt_for
from chatlora.errors import UserError
from chatlora.model import BaseModel, load_model, load_tokenizer, prepare_base
from chatlora.templates import chat_format
from chatlora.tokenizer import TOKENIZER_FILES


@dataclass
class Run:
    dir: Path
    cfg: Config
    info: dict  # run.json
    base: BaseModel
    tok: object
    fmt: object
    adapter: Path | None  # None: the base model alone (before the first checkpoint)

    @property
    def system_prompt(self) -> str | None:
        return self.info.get("system_prompt")

    @property
    def name(self) -> str:
        """What the run is called when served or exported: `train --name`, else its folder's name."""
        return self.info.get("name") or self.dir.name


def write_run_files(run: Path, cfg: Config, base: BaseModel, fmt, report: dict) -> None:
    """The files that make `run` self-describing (written at the start of training)."""
    run.mkdir(parents=True, exist_ok=True)
    write_text(run / "config.yaml", yaml.safe_dump(cfg.to_dict(), allow_unicode=True, sort_keys=False),
               overwrite=True)
    info = {"base_model": cfg.model.path, "base_dir": str(base.dir), "family": base.family,
            "template": fmt.name, "stop_ids": fmt.stop_ids, "system_prompt": system_prompt_for(cfg)}
    write_text(run / "run.json", json.dumps(info, indent=2, ensure_ascii=False), overwrite=True)
    write_text(run / "data_report.json", json.dumps(report, indent=2, ensure_ascii=False), overwrite=True)
    (run / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (base.dir / name).is_file():
            shutil.copyfile(base.dir / name, run / "tokenizer" / name)


def read_config(run: Path) -> Config:
    try:
        return config_from_dict(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {})
    except FileNotFoundError:
        raise UserError(f"{run} is not a chatlora run directory (no config.yaml)") from None


def find_adapter(path: Path) -> tuple[Path, Path | None]:
    """(run directory, adapter directory) for a run directory or a checkpoint/final inside one."""
    if (path / "adapter_config.json").is_file() and (path.parent / "run.json").is_file():
        return path.parent, path
    if not (path / "run.json").is_file():
        raise UserError(f"{path} is not a chatlora run directory (no run.json) nor a checkpoint in one")
    if (path / "final" / MARKER).is_file():
        return path, path / "final"
    return path, latest_checkpoint(path)


def load_run(path: str | Path) -> Run:
    run, adapter = find_adapter(Path(path))
    cfg = read_config(run)
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    base = prepare_base(info["base_model"])
    tok = load_tokenizer(BaseModel(base.name, run / "tokenizer", base.family))  # the run's own copy
    fmt = chat_format(info["template"], tok, base.family, cfg.data.parse_special_tokens)
    return Run(run, cfg, info, base, tok, fmt, adapter)


def load_tuned_model(run: Run, device: str | None = None, dtype: str | None = None):
    """Base + the run's adapter (unmerged, peft), in eval mode."""
    from chatlora.lora import load_adapter

    model = load_model(run.base, dtype or run.cfg.model.dtype, device)
    if run.adapter is None:
        return model
    return load_adapter(model, run.adapter).eval()
