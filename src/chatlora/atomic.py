"""Writes that never leave a half-written file and never clobber what the user had.

A file is written beside its target under a temporary name, flushed to disk, then renamed over
the target in one step; `overwrite=False` refuses an existing target with a clear error.

    write_text(Path("report.json"), text)             # UserError if report.json exists
    write_text(Path("report.json"), text, overwrite=True)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable

from chatlora.errors import UserError


def refuse_existing(path: Path) -> None:
    if path.exists():
        raise UserError(f"{path} already exists; chatlora does not overwrite it. Choose another path "
                        f"or remove it first.")


def write_lines(path: Path, lines: Iterable[str], overwrite: bool = False) -> None:
    """Write `lines` (each without its newline) to `path` atomically."""
    path = Path(path)
    if not overwrite:
        refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line)
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, overwrite: bool = False) -> None:
    write_lines(path, [text.rstrip("\n")], overwrite=overwrite)
