"""`chatlora cache`: what chatlora keeps under $CHATLORA_CACHE (default ~/.cache/chatlora), and cleaning it.

    chatlora cache               # list: converted models with their sources, tokenized data, downloads
    chatlora cache clean         # remove conversions whose sources are all gone, old-format ones, tokenized data
    chatlora cache clean --all   # remove every conversion and all tokenized data (both are rebuilt on demand)

    converted/<kind>-<content hash>/   a base model converted once (Index -> Llama, GGUF -> safetensors),
                                       keyed by its files' content, so copies of the same files share it
    tokenized/<key>.safetensors        tokenized datasets (rebuilt in seconds when missing)
    models/<owner>/<name>/             `chatlora download`s: never removed here (they took a download)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from chatlora.models import hub
from chatlora.models.load import CONVERSION_VERSION, read_source_record


@dataclass
class Conversion:
    dir: Path
    bytes: int
    sources: list[str]
    current: bool   # made by this chatlora's conversion (older ones are never used again)

    @property
    def orphaned(self) -> bool:
        return not any(Path(s).exists() for s in self.sources)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def conversions() -> list[Conversion]:
    root = hub.cache_root() / "converted"
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        if d.is_dir() and not d.name.startswith("."):
            record = read_source_record(d)
            found.append(Conversion(d, _size(d), record["sources"], record["version"] == CONVERSION_VERSION))
    return found


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.0f} MiB"


def describe() -> str:
    root = hub.cache_root()
    lines = [f"chatlora cache: {root}", "", "converted models:"]
    found = conversions()
    for c in found:
        state = "old format, unused" if not c.current else "sources gone" if c.orphaned else "in use"
        lines.append(f"  {c.dir.name}  {_mib(c.bytes)}  ({state})")
        lines += [f"      from {s}{'' if Path(s).exists() else '  (gone)'}" for s in c.sources]
    if not found:
        lines.append("  none")
    tokenized = root / "tokenized"
    count = len(list(tokenized.glob("*.safetensors"))) if tokenized.is_dir() else 0
    lines += ["", f"tokenized datasets: {count}, {_mib(_size(tokenized))}"]
    models = root / "models"
    downloads = [p.parent for p in models.glob("*/*/config.json")] if models.is_dir() else []
    lines += ["", "downloads (never removed by `chatlora cache clean`):"]
    lines += [f"  {d.relative_to(models)}  {_mib(_size(d))}" for d in downloads] or ["  none"]
    return "\n".join(lines)


def clean(everything: bool = False) -> tuple[int, int]:
    """Remove conversions no longer needed (all of them with `everything`) and the tokenized data;
    returns (directories and files removed, bytes freed)."""
    removed, freed = 0, 0
    for c in conversions():
        if everything or c.orphaned or not c.current:
            shutil.rmtree(c.dir, ignore_errors=True)
            removed, freed = removed + 1, freed + c.bytes
    tokenized = hub.cache_root() / "tokenized"
    for f in tokenized.glob("*.safetensors") if tokenized.is_dir() else []:
        freed += f.stat().st_size
        f.unlink(missing_ok=True)
        removed += 1
    return removed, freed
