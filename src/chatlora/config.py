"""Typed configuration: a few groups, one documented line per field, validated all at once.

Defaults are the self-llm recipe (self-llm "04-Index-1.9B-Chat Lora"; see docs/index-model.md):
LoRA r=8, alpha=32, dropout 0.1 on the seven projections, 384 tokens, 16 examples per optimizer
step, 3 epochs, lr 1e-4, linear decay, the 甄嬛 system prompt for the bundled dataset.

    cfg = load_config("my.yaml", overrides=["train.epochs=1", "lora.r=16"])
    cfg.train.learning_rate  # -> 0.0001

A YAML file holds the same groups as this module: `{model: {path: ...}, lora: {r: 16}}`.
Every problem in a file and in the overrides is reported together in one `UserError`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from chatlora.errors import UserError

DEFAULT_MODEL = "IndexTeam/Index-1.9B-Chat"
TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab")   # train.report_to (tracking.py)
GGUF_TYPES = ("f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q4_k_m")   # export --quant (export.py)
BUNDLED_DATA = "huanhuan"  # the name that selects the dataset shipped inside the package
# The system prompt the self-llm tutorial trains the bundled dataset with.
HUANHUAN_SYSTEM_PROMPT = "现在你要扮演皇帝身边的女人--甄嬛"
PRESETS = Path(__file__).parent / "presets"  # named YAML configs: `--preset lowmem`
ASSETS = Path(__file__).parent / "assets"    # the bundled dataset, the chat page


def doc(text: str, default=dataclasses.MISSING, factory=dataclasses.MISSING):
    """A dataclass field carrying its one-line documentation (shown by --help and in errors)."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


@dataclass
class ModelConfig:
    path: str = doc("base model: a local directory, a .gguf file, a hub id in the cache, or 'smollm2-demo'",
                    DEFAULT_MODEL)
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = doc(
        "weight dtype; auto = bfloat16 on a GPU that supports it, float32 on CPU", "auto")
    quantize: Literal["none", "nf4"] = doc(
        "the frozen base weights while training: none (the weight dtype) or nf4 (4-bit NF4 with double "
        "quantisation, QLoRA); merges, exports and chat use the 16-bit base", "none")
    template: Literal["auto", "index", "self-llm"] = doc(
        "chat format: index (Index's official), self-llm (the tutorial's), auto (the tokenizer's own; "
        "Index models default to index)", "auto")


@dataclass
class LoraConfig:
    r: int = doc("LoRA rank", 8)
    alpha: float = doc("LoRA alpha; the update is scaled by alpha/r (or alpha/sqrt(r) with rslora)", 32.0)
    dropout: float = doc("dropout on the LoRA input", 0.1)
    targets: list[str] = doc("module names that get adapters",
                             factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                              "gate_proj", "up_proj", "down_proj"])
    rslora: bool = doc("rank-stabilized scaling alpha/sqrt(r) (peft use_rslora)", False)
    dora: bool = doc("weight-decomposed LoRA (peft use_dora); slower", False)


@dataclass
class DataConfig:
    path: str = doc("training data: a JSON/JSONL, CSV/TSV, Parquet or Arrow file, a folder of them, or "
                    "hf:OWNER/NAME[:SPLIT]; rows in alpaca, sharegpt or messages shape; 'huanhuan' = bundled",
                    BUNDLED_DATA)
    system_prompt: str | None = doc(
        "system prompt for rows without one; unset = the 甄嬛 prompt for the bundled data, none otherwise", None)
    max_seq_tokens: int = doc("longest example in tokens", 384)
    on_overlength: Literal["truncate", "drop", "error"] = doc(
        "what to do with an example longer than max_seq_tokens (truncate keeps the left part)", "truncate")
    on_error: Literal["stop", "skip"] = doc(
        "bad rows: stop and list them all, or skip them and write them to a rejects file", "stop")
    held_out_fraction: float = doc("share of examples kept aside for held-out loss (seeded split)", 0.02)
    parse_special_tokens: bool = doc(
        "the text of a control token in a message (<|im_start|>, reserved_0) becomes that token, in training "
        "and in the run's chat and serving; off: it stays text, so no message can forge a turn", False)
    seed: int = doc("seed of the held-out split", 42)


@dataclass
class TrainConfig:
    examples_per_step: int = doc("examples per optimizer step (micro-batch x accumulation)", 16)
    micro_batch_examples: int = doc("most examples in one forward/backward pass", 16)
    micro_batch_tokens: int = doc("most tokens in one forward/backward pass: a step's examples are "
                                  "packed into as few passes as fit (lower it if memory runs out)", 2048)
    epochs: float = doc("passes over the training examples", 3.0)
    max_steps: int | None = doc("stop after this many optimizer steps (overrides epochs)", None)
    learning_rate: float = doc("peak learning rate (AdamW)", 1e-4)
    schedule: Literal["linear", "cosine", "constant"] = doc("learning-rate decay after warm-up", "linear")
    warmup_ratio: float = doc("share of steps spent warming up linearly from 0", 0.0)
    weight_decay: float = doc("AdamW weight decay", 0.0)
    max_grad_norm: float | None = doc("clip the gradient norm to this; unset = no clipping", None)
    packing: bool = doc("pack each micro-batch's examples into one row (no padding); same loss as padded",
                        True)
    gradient_checkpointing: bool = doc("recompute activations in backward to save memory", False)
    distributed: Literal["replicate", "shard"] = doc(
        "with several processes (torchrun / --nproc): replicate the model on every rank (data parallel), "
        "or shard its weights across the ranks (FSDP2) when they do not fit one GPU", "replicate")
    fast_path: Literal["auto", "graphs", "eager", "plain"] = doc(
        "the fused training pass (same loss and gradients as the plain peft model): auto = fused pass "
        "captured as CUDA graphs on a GPU when the model is supported; eager = fused pass without graphs; "
        "plain = the plain peft model", "auto")
    seed: int = doc("seed of initialization, data order and dropout", 42)
    eval_every: int = doc("held-out loss every N optimizer steps (0 = only at the end)", 100)
    save_every: int = doc("write a checkpoint every N optimizer steps (0 = only at the end)", 100)
    keep_last: int = doc("keep only the newest K checkpoints (0 = keep all)", 2)
    report_to: list[str] = doc("experiment trackers that also get the metrics and config: any of tensorboard, "
                               "wandb, mlflow, swanlab (each an optional package; offline, in the run directory, "
                               "unless its own environment variables say otherwise)", factory=list)


@dataclass
class GenerateConfig:
    max_new_tokens: int = doc("longest reply in tokens", 300)
    temperature: float = doc("sampling temperature; 0 = greedy", 0.3)
    top_k: int = doc("sample among the k most likely tokens (0 = off)", 5)
    top_p: float = doc("nucleus sampling threshold", 0.8)
    repetition_penalty: float = doc("penalty on tokens already present (1 = off)", 1.1)
    decoder: Literal["auto", "plain"] = doc(
        "auto = on a GPU, the static KV cache and captured steps where the model is supported; plain = "
        "transformers' own forward (CHATLORA_FAST_DECODE=0 also forces plain)", "auto")
    kernels: bool = doc("the Triton kernels in the decoder's one-token steps, where they pass their start-up check "
                        "(CHATLORA_TRITON=0 also turns them off)", True)


@dataclass
class ServeConfig:
    host: str = doc("address to bind; a non-loopback one needs an API key", "127.0.0.1")
    port: int = doc("port to listen on", 8000)
    max_tokens_cap: int = doc("largest max_tokens a request may ask", 2048)
    queue_size: int = doc("requests waiting beyond this get 429", 16)
    max_batch: int = doc("requests generated together at most", 16)
    max_body_bytes: int = doc("larger request bodies get 413", 1_000_000)
    deadline_s: float = doc("seconds a request may take in all", 300.0)
    max_messages: int = doc("messages in one request (or history pairs x 2 + 1)", 256)
    max_stop_strings: int = doc("stop strings in one request (as OpenAI's API)", 4)
    max_stop_chars: int = doc("characters in one stop string", 1000)
    header_timeout_s: float = doc("seconds a request's head may take to arrive", 10.0)
    body_timeout_s: float = doc("seconds a request's body may take to arrive (then 408)", 30.0)
    max_connections: int = doc("open connections; more are closed as they arrive", 1000)
    grace_s: float = doc("on SIGTERM, seconds running replies may take to finish before they are ended "
                         "(finish_reason shutdown)", 10.0)


# The accepted values of each sampling setting, for every way in: the CLI's flags, a run's config
# and the server's requests all go through `sampling_problems`. (name: (lowest, highest, lowest excluded))
# Temperature and top-p follow OpenAI's ranges; a seed is anything torch.Generator.manual_seed takes.
SAMPLING_RANGES = {
    "max_new_tokens": (1, None, False),
    "temperature": (0.0, 2.0, False),
    "top_k": (0, None, False),
    "top_p": (0.0, 1.0, True),
    "repetition_penalty": (0.0, 10.0, True),
    "seed": (-(2 ** 63), 2 ** 64 - 1, False),
}
INTEGER_SETTINGS = {"max_new_tokens", "top_k", "seed"}


def sampling_problems(values: dict) -> list[tuple[str, str]]:
    """`(setting, what is wrong)` for each value outside its range (None values are not given)."""
    problems = []
    for name, value in values.items():
        if value is None or name not in SAMPLING_RANGES:
            continue
        low, high, open_low = SAMPLING_RANGES[name]
        integer = name in INTEGER_SETTINGS
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
            problems.append((name, f"must be {'an integer' if integer else 'a number'}, got {value!r}"))
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or (value <= low if open_low else value < low) or \
                (high is not None and value > high):
            bounds = f"{'(' if open_low else '['}{low}, {high}]" if high is not None else f">= {low}"
            problems.append((name, f"must be {'in ' if high is not None else ''}{bounds}, got {value!r}"))
    return problems


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_docs() -> dict[str, tuple[str, object]]:
    """`{"group.field": (doc, default)}` for every field, in declaration order (for --help)."""
    out = {}
    for group_name, group_type in typing.get_type_hints(Config).items():
        for f in dataclasses.fields(group_type):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            out[f"{group_name}.{f.name}"] = (f.metadata["doc"], default)
    return out


def _check_type(value, annotation) -> tuple[bool, object, str]:
    """Return (ok, coerced value, expected description) for a value against a field annotation."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return value in choices, value, "one of " + ", ".join(map(str, choices))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return True, None, "null"
        return _check_type(value, args[0])
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
        return ok, value, f"a list of {item.__name__}"
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return True, float(value), "a number"
    if annotation is bool:
        return isinstance(value, bool), value, "true or false"
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if annotation is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True, str(value), "a string"
    return isinstance(value, annotation), value, f"a {annotation.__name__}"


def _apply(cfg: Config, group: str, name: str, value, origin: str, problems: list[str]) -> None:
    hints = typing.get_type_hints(Config)
    if group not in hints:
        problems.append(f"{origin}: unknown group '{group}' (groups: {', '.join(hints)})")
        return
    group_obj = getattr(cfg, group)
    field_hints = typing.get_type_hints(type(group_obj))
    if name not in field_hints:
        problems.append(f"{origin}: unknown field '{group}.{name}' (fields: {', '.join(field_hints)})")
        return
    ok, coerced, expected = _check_type(value, field_hints[name])
    if not ok:
        problems.append(f"{origin}: {group}.{name} must be {expected}, got {value!r}")
        return
    setattr(group_obj, name, coerced)
    cfg_given(cfg).add(f"{group}.{name}")


def cfg_given(cfg: Config) -> set[str]:
    """The fields set by something other than the defaults (a preset, a file, an override, a flag)."""
    if not hasattr(cfg, "_given"):
        object.__setattr__(cfg, "_given", set())
    return cfg._given


def _fit_defaults(cfg: Config) -> None:
    """Defaults that depend on another field: the pass size grows to hold one example of
    data.max_seq_tokens unless the user chose it (then a too-small one is an error below)."""
    if "train.micro_batch_tokens" not in cfg_given(cfg) and cfg.train.micro_batch_tokens < cfg.data.max_seq_tokens:
        cfg.train.micro_batch_tokens = cfg.data.max_seq_tokens


def _check_ranges(cfg: Config) -> list[str]:
    """Value checks that need more than the type: every violated rule, as messages."""
    rules = [
        (cfg.lora.r >= 1, "lora.r must be >= 1"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (len(cfg.lora.targets) > 0, "lora.targets must name at least one module"),
        (cfg.data.max_seq_tokens >= 8, "data.max_seq_tokens must be >= 8"),
        (0 <= cfg.data.held_out_fraction < 1, "data.held_out_fraction must be in [0, 1)"),
        (cfg.train.examples_per_step >= 1, "train.examples_per_step must be >= 1"),
        (cfg.train.micro_batch_examples >= 1, "train.micro_batch_examples must be >= 1"),
        (cfg.train.micro_batch_tokens >= cfg.data.max_seq_tokens,
         "train.micro_batch_tokens must be >= data.max_seq_tokens (one example must fit a pass)"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.train.max_steps is None or cfg.train.max_steps >= 1, "train.max_steps must be >= 1"),
        (0 < cfg.train.learning_rate <= 1, "train.learning_rate must be in (0, 1] (LoRA runs use about 1e-5 "
                                           "to 1e-3; a larger rate makes the adapter's weights overflow)"),
        (0 <= cfg.train.warmup_ratio < 1, "train.warmup_ratio must be in [0, 1)"),
        (cfg.train.max_grad_norm is None or cfg.train.max_grad_norm > 0, "train.max_grad_norm must be > 0"),
        (0 <= cfg.serve.port <= 65535, "serve.port must be in [0, 65535]"),
        (all(getattr(cfg.serve, f) >= 1 for f in ("max_tokens_cap", "queue_size", "max_batch", "max_body_bytes",
                                                    "max_messages", "max_stop_strings", "max_stop_chars",
                                                    "max_connections")),
         "serve's limits (max_tokens_cap, queue_size, max_batch, ...) must be >= 1"),
        (all(getattr(cfg.serve, f) > 0 for f in ("deadline_s", "header_timeout_s", "body_timeout_s")),
         "serve's deadline and timeouts must be > 0"),
        (cfg.serve.grace_s >= 0, "serve.grace_s must be >= 0"),
        (not (cfg.model.quantize == "nf4" and cfg.lora.dora),
         "lora.dora cannot be trained on a 4-bit base (model.quantize=nf4): DoRA reads the base weights' norms"),
        (not (cfg.model.quantize == "nf4" and cfg.train.distributed == "shard"),
         "train.distributed=shard cannot shard a 4-bit base (model.quantize=nf4); use train.distributed=replicate"),
        (set(cfg.train.report_to) <= set(TRACKERS),
         f"train.report_to: unknown tracker(s) {', '.join(t for t in cfg.train.report_to if t not in TRACKERS)} "
         f"(trackers: {', '.join(TRACKERS)})"),
    ]
    infinite = [f"{group}.{name} must be a finite number, got {value}" for group, fields in cfg.to_dict().items()
                for name, value in fields.items() if isinstance(value, float) and not math.isfinite(value)]
    if infinite:   # the range rules below would only repeat these
        return infinite
    return [message for ok, message in rules if not ok] + \
        [f"generate.{name} {problem}" for name, problem in sampling_problems(dataclasses.asdict(cfg.generate))]


def parse_override(text: str) -> tuple[str, str, object]:
    """'train.epochs=2' -> ('train', 'epochs', 2); the value is read as YAML (so 2 is an int)."""
    key, sep, raw = text.partition("=")
    group, dot, name = key.strip().partition(".")
    if not sep or not dot:
        raise UserError(f"override '{text}' must look like group.field=value, e.g. train.epochs=2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return group, name, value


def _apply_yaml(cfg: Config, path: Path, problems: list[str]) -> None:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of groups (model:, lora:, data:, ...)")
    for group, fields in data.items():
        if not isinstance(fields, dict):
            problems.append(f"{path}: group '{group}' must be a mapping of fields")
            continue
        for name, value in fields.items():
            _apply(cfg, str(group), str(name), value, str(path), problems)


def load_config(path: str | Path | None = None, overrides: list[str] = (),
                flags: dict[str, object] | None = None, base: Config | None = None,
                preset: str | None = None) -> Config:
    """Defaults (or `base`, e.g. a run's saved config), then a preset (presets/NAME.yaml), then the
    YAML file, then `group.field=value` overrides, then typed command-line flags
    (`{"data.max_seq_tokens": 512}`, None = not given); all problems reported at once."""
    cfg = copy.deepcopy(base) if base is not None else Config()
    problems: list[str] = []
    if preset is not None:
        preset_file = PRESETS / f"{preset}.yaml"
        if not preset_file.is_file():
            names = ", ".join(sorted(p.stem for p in PRESETS.glob("*.yaml")))
            raise UserError(f"unknown preset '{preset}' (presets: {names})")
        _apply_yaml(cfg, preset_file, problems)
    if path is not None:
        _apply_yaml(cfg, Path(path), problems)
    for text in overrides:
        group, name, value = parse_override(text)
        _apply(cfg, group, name, value, f"override '{text}'", problems)
    for key, value in (flags or {}).items():
        if value is not None:
            group, _, name = key.partition(".")
            _apply(cfg, group, name, value, f"option for {key}", problems)
    _fit_defaults(cfg)
    problems += _check_ranges(cfg)
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def config_from_dict(data: dict) -> Config:
    """Rebuild a Config saved with `to_dict()` (e.g. a run directory's config.yaml)."""
    cfg = Config()
    problems: list[str] = []
    for group, fields in data.items():
        for name, value in (fields or {}).items():
            _apply(cfg, group, name, value, "saved config", problems)
    if problems:
        raise UserError("invalid saved configuration:\n  - " + "\n  - ".join(problems))
    return cfg


def system_prompt_for(cfg: Config) -> str | None:
    """The system prompt actually used: the configured one, else the self-llm recipe's for the bundled data."""
    if cfg.data.system_prompt is not None:
        return cfg.data.system_prompt
    return HUANHUAN_SYSTEM_PROMPT if cfg.data.path == BUNDLED_DATA else None
