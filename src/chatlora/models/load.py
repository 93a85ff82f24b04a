"""Base models: find, convert once, load. Index natively as Llama with its NormHead folded.

Every base model becomes a plain Hugging Face directory that `from_pretrained` loads without
remote code:
- an Index-family download (`model_type: index`) is converted once into a Llama directory in the
  cache: weights read from safetensors or, for the official pickle `.bin`, with
  `torch.load(weights_only=True)`; `lm_head.weight` rows scaled to unit norm (NormHead folded,
  docs/index-model.md); `rope_ratio` applied to the RoPE base. Its `.py` files are never imported.
- a GGUF file (the offline demo model) is de-quantized once by transformers into the cache.
- any other Hugging Face causal-LM directory is used as it is.

    base = prepare_base("IndexTeam/Index-1.9B-Chat")
    model = load_model(base)              # bf16 on a capable GPU, fp32 on CPU
    tok = load_tokenizer(base)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from chatlora.atomic import file_sha256, new_directory, write_text
from chatlora.errors import UserError
from chatlora.models import hub
from chatlora.models.arch import TARGETS
from chatlora.models.quantize import quantize_base, quiet_optional_imports
from chatlora.models.tokenizer import TOKENIZER_FILES, load_hf_tokenizer, load_index_tokenizer

CONVERSION_VERSION = 3  # bump when a conversion's output changes, so old cached copies are redone
SOURCE_FILE = "chatlora_source.json"  # written into every converted directory: where it came from
# Files copied unchanged from an Index download into its converted directory.
INDEX_SIDE_FILES = TOKENIZER_FILES + ("generation_config.json",)


@dataclass(frozen=True)
class BaseModel:
    """A base model ready to load: `dir` is a native Hugging Face directory."""

    name: str  # what the user asked for (path, hub id or alias)
    dir: Path
    family: Literal["index", "hf"]


def prepare_base(name: str) -> BaseModel:
    """Resolve `name` and convert it once if needed (Index, GGUF); never runs a repository's code."""
    path = hub.resolve_model_path(name)
    if path.is_file():  # a .gguf file
        return BaseModel(name, _converted(path, [path], _convert_gguf, "hf"), "hf")
    config = _read_config(path)
    if is_index_config(config):
        # Everything the conversion reads: the weights, config.json, and the files copied beside them.
        inputs = _weight_files(path) + [path / f for f in ("config.json", *INDEX_SIDE_FILES) if (path / f).is_file()]
        return BaseModel(name, _converted(path, inputs, _convert_index, "index"), "index")
    family = read_source_record(path)["family"] if (path / SOURCE_FILE).is_file() else "hf"
    return BaseModel(name, path, family)


def is_index_config(config: dict) -> bool:
    return config.get("model_type") == "index" or "IndexForCausalLM" in (config.get("architectures") or [])


def load_tokenizer(base: BaseModel):
    return load_index_tokenizer(base.dir) if base.family == "index" else load_hf_tokenizer(base.dir)


def pick_dtype(dtype: str = "auto", device: str | torch.device | None = None) -> torch.dtype:
    if dtype != "auto":
        return getattr(torch, dtype)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(base: BaseModel, dtype: str = "auto", device: str | None = None, quantize: str = "none"):
    """The base model in eval mode on `device` (default: the GPU if there is one). `quantize="nf4"`:
    the decoder layers' projection weights in 4-bit NF4 (models/quantize.py), each quantised on
    `device` on its way there, so the 16-bit model never has to fit the GPU whole."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # 16-bit weights go from the safetensors file straight to a GPU, not through a CPU copy of the
    # whole model (a start-up cost); a 4-bit base is quantised weight by weight on its way there
    placement = {"device_map": str(device)} if torch.device(device).type == "cuda" and quantize != "nf4" else {}
    try:
        with quiet_optional_imports():   # transformers imports torchao/bitsandbytes here when installed
            model = AutoModelForCausalLM.from_pretrained(
                str(base.dir), dtype=pick_dtype(dtype, device), trust_remote_code=False, **placement)
    except ValueError as e:
        raise UserError(f"transformers cannot load {base.dir} natively ({e}). chatlora never runs a "
                        f"model repository's own code; use a model transformers supports.") from None
    if quantize == "nf4":
        quantize_base(model, TARGETS, device)
    return model.to(device).eval()


def parameter_count(directory: Path) -> int:
    """The number of weights in a model directory's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(directory).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------- conversion into the cache


def _converted(source: Path, inputs: list[Path], convert, family: str) -> Path:
    """The cached conversion of `source`, made once, keyed by the content of `inputs`: another copy of
    the same files (another clone, another virtual environment) finds the same conversion."""
    target = hub.cache_root() / "converted" / f"{family}-{content_key(inputs)}"
    if not target.is_dir():
        try:
            with new_directory(target) as tmp:   # atomic: a directory at `target` is always complete
                convert(source, tmp)
                (tmp / SOURCE_FILE).write_text(json.dumps({"family": family, "version": CONVERSION_VERSION,
                                                           "sources": []}, indent=2))
        except (OSError, UserError):
            if not target.is_dir():
                raise
            # another process (a second training rank, a parallel command) finished the same conversion first
    _note_source(target, source)
    return target


def content_key(inputs: list[Path]) -> str:
    """A hash of the files' bytes (and the conversion's version). Each file is hashed once: the result
    is remembered in the cache under its path, size and modification time."""
    memo_file = hub.cache_root() / "converted" / "fingerprints.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.sha256(f"conversion {CONVERSION_VERSION}".encode())
    fresh = False
    for path in sorted(inputs, key=lambda p: p.name):
        st = path.stat()
        seen = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        if seen not in memo:
            if st.st_size > 2 ** 30:
                print(f"chatlora: fingerprinting {path.name} ({st.st_size / 2 ** 30:.1f} GiB, once)", flush=True)
            memo[seen], fresh = file_sha256(path), True
        h.update(f"{path.name}:{memo[seen]}".encode())
    if fresh:
        write_text(memo_file, json.dumps(memo, indent=0), overwrite=True)
    return h.hexdigest()[:24]


def _note_source(target: Path, source: Path) -> None:
    """Record where a conversion came from (`chatlora cache` lists them; a conversion whose sources
    are all gone can be cleaned)."""
    record = read_source_record(target)
    where = str(source.resolve())
    if where not in record["sources"]:
        record["sources"].append(where)
        with contextlib.suppress(OSError, UserError):   # read-only cache: still usable
            write_text(target / SOURCE_FILE, json.dumps(record, indent=2), overwrite=True)


def read_source_record(directory: Path) -> dict:
    try:
        record = json.loads((directory / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        record = {}
    sources = record.get("sources") or ([record["source"]] if record.get("source") else [])
    return {"family": record.get("family", "hf"), "version": record.get("version"), "sources": sources}


def _convert_gguf(path: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"chatlora: converting {path.name} to a safetensors copy in the cache (once)", flush=True)
    kwargs = dict(gguf_file=path.name, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    # transformers 5.17 reads SmolLM2's GGUF tokenizer with eos = <|im_start|> (its bos); the GGUF's
    # own eos id, which the model config carries, is the one the model was trained to end with.
    eos = model.config.eos_token_id
    if isinstance(eos, int) and tok.eos_token_id != eos:
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    # The weights are de-quantized fp32 tensors now; transformers refuses save_pretrained on a model
    # loaded from GGUF, so write a plain directory ourselves, without the GGUF quantization_config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    _save_weights(model.state_dict(), out, tied=config.tie_word_embeddings)
    tok.save_pretrained(str(out))


def _save_weights(state: dict[str, torch.Tensor], out: Path, tied: bool) -> None:
    from safetensors.torch import save_file

    if tied:  # safetensors refuses shared storage; from_pretrained re-ties the head
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})


def index_llama_config(raw: dict):
    """Index's config.json as a LlamaConfig (same blocks; NormHead is folded into the weights)."""
    from transformers import LlamaConfig

    if raw.get("rope_scaling"):
        raise UserError(f"Index config has rope_scaling={raw['rope_scaling']!r}, which chatlora does not "
                        f"map yet; please report it with the model's name")
    # Index-1.9B-32K scales the RoPE base by rope_ratio (inferred: 32 -> theta 320000, docs/index-model.md).
    theta = float(raw.get("rope_theta", 10000.0)) * float(raw.get("rope_ratio", 1))
    heads = raw["num_attention_heads"]
    return LlamaConfig(
        vocab_size=raw["vocab_size"], hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"], num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads, num_key_value_heads=raw.get("num_key_value_heads") or heads,
        hidden_act=raw.get("hidden_act", "silu"), rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        initializer_range=raw.get("initializer_range", 0.01),
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        bos_token_id=raw.get("bos_token_id", 1), eos_token_id=raw.get("eos_token_id", 2),
        pad_token_id=raw.get("pad_token_id", 0), attention_bias=False, mlp_bias=False,
        architectures=["LlamaForCausalLM"], dtype=raw.get("torch_dtype", "bfloat16"),
    )


def fold_norm_head(weight: torch.Tensor) -> torch.Tensor:
    """NormHead folded: each vocabulary row scaled to unit L2 norm (F.normalize defaults), in fp32."""
    return torch.nn.functional.normalize(weight.float(), dim=1).to(weight.dtype)


def _convert_index(path: Path, out: Path) -> None:
    from transformers import LlamaForCausalLM

    raw = _read_config(path)
    config = index_llama_config(raw)
    print(f"chatlora: converting the Index model in {path} to a Llama safetensors copy in the cache "
          f"(once)", flush=True)
    state = read_state_dict(_weight_files(path))
    state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(config).state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match the Index architecture in its config.json "
                        f"(missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                        f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''})")
    if int(raw.get("norm_head", 0)):
        state["lm_head.weight"] = fold_norm_head(state["lm_head.weight"])
    config.save_pretrained(str(out))
    _save_weights(state, out, tied=config.tie_word_embeddings)
    for name in INDEX_SIDE_FILES:
        if (path / name).is_file():
            shutil.copyfile(path / name, out / name)


def read_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Tensors from safetensors files, or from pickle .bin files with weights_only=True (no code runs)."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for f in files:
        if f.suffix == ".safetensors":
            state.update(load_file(str(f)))
            continue
        try:
            state.update(torch.load(str(f), map_location="cpu", weights_only=True))
        except pickle.UnpicklingError as e:
            raise UserError(f"refusing to load {f}: it holds Python objects other than tensors, which "
                            f"could run code ({str(e).splitlines()[0]})") from None
    return state


def _weight_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
    if not files:
        raise UserError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    return files


def _read_config(path: Path) -> dict:
    config = path / "config.json"
    if not config.is_file():
        raise UserError(f"{path} is not a model directory: it has no config.json")
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{config}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
