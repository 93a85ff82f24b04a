"""Writes that never leave a half-written file or directory and never clobber what the user had.

A file (`new_file`, `write_text`) is written beside its target under a temporary name, flushed to
disk, then renamed over the target in one step; `overwrite=False` refuses an existing target with a
clear error. A directory (`new_directory`: a checkpoint, a merged model, a converted base) is
assembled under a hidden temporary name, every file and the directory flushed to disk (so a power
cut cannot leave a renamed but empty file), then renamed into place. What is written gets the modes
the user's umask gives any new file (temporary files, and safetensors' files, are created private,
0600; that is not what a finished run should keep). A full disk is a clear error naming the path and
the space, and leaves no temporary file or directory behind.

    write_text(Path("report.json"), text)             # UserError if report.json exists
    write_text(Path("report.json"), text, overwrite=True)
    with new_file(Path("model.gguf")) as tmp:
        writer = GGUFWriter(tmp, ...)
    with new_directory(run / "checkpoint-100") as tmp:
        save_file(tensors, tmp / "resume_state.safetensors")
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from chatlora.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def refuse_existing(path: Path) -> None:
    if path.exists():
        raise UserError(f"{path} already exists; chatlora does not overwrite it. Choose another path "
                        f"or remove it first.")


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it; another thread could
    create a file in between)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def no_space(e: BaseException, path: Path, needed_bytes: int | None = None) -> UserError | None:
    """The error to show for a write that failed because the disk (or quota) is full, else None."""
    if not isinstance(e, OSError) or e.errno not in NO_SPACE:
        return None
    where = Path(path)
    probe = where if where.exists() else where.parent
    try:
        free = f"{_mib(shutil.disk_usage(probe).free)} free"
    except OSError:
        free = "free space unknown"
    need = f"; about {_mib(needed_bytes)} are needed" if needed_bytes else ""
    return UserError(f"no space left writing {path} ({free}{need}). Free some space (or choose another "
                     f"place for it) and try again; nothing half-written was left behind.")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:,.{1 if n < 10 * 2 ** 20 else 0}f} MiB"


def fsync_path(path: Path) -> None:
    """Flush a file's, or a directory's entries', data to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_file(path: Path, overwrite: bool = False, needed_bytes: int | None = None):
    """Yields a temporary path beside `path` to write; when the block ends, the file is flushed to
    disk, given the umask's mode and renamed over `path` in one step (an existing `path` is refused
    unless `overwrite`). On any error the temporary file is removed."""
    path = Path(path)
    if not overwrite:
        refuse_existing(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        raise no_space(e, path, needed_bytes) or e


def write_lines(path: Path, lines: Iterable[str], overwrite: bool = False) -> None:
    """Write `lines` (each without its newline) to `path` atomically."""
    with new_file(path, overwrite) as tmp, tmp.open("w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")


def write_text(path: Path, text: str, overwrite: bool = False) -> None:
    write_lines(path, [text.rstrip("\n")], overwrite=overwrite)


@contextlib.contextmanager
def new_directory(target: Path, replace: bool = False, needed_bytes: int | None = None):
    """Yields a hidden temporary directory beside `target`; when the block ends, its files are
    flushed to disk and it becomes `target` in one rename (an existing `target` is refused, or with
    `replace` moved aside and removed after). On any error the temporary directory is removed."""
    target = Path(target)
    if target.exists() and not replace:
        refuse_existing(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".tmp-{target.name}-"))
    try:
        mask = umask()
        yield tmp
        for path in sorted(tmp.rglob("*"), reverse=True) + [tmp]:   # files first, then their directories
            # the umask's modes: some writers (safetensors, mkdtemp) create files private
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
            fsync_path(path)
        old = None
        if replace and target.exists():
            old = target.with_name(f".old-{target.name}-{os.getpid()}")
            os.replace(target, old)
        os.replace(tmp, target)
        fsync_path(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise no_space(e, target, needed_bytes) or e
