"""The runs directory that `chatlora studio` manages: each run is a folder made by a separate
`chatlora train` process, so closing the page or restarting the studio loses nothing, and any studio
(or a terminal) on the same folder sees the same runs.

    runs = RunsDir("runs")
    runs.start("zh-1", {"model.path": "smollm2-demo", "train.max_steps": 20})   # a chatlora train process
    runs.summary("zh-1")          # state, step, latest loss, ...
    runs.stop("zh-1")             # SIGTERM: the run writes a checkpoint and stops
    runs.resume("zh-1")

A run's state comes from its own status.json (rundir.run_status) once training has written it; before
that (data check, model load) from the launch record in RUNS/.studio/ID.json and whether that process
is alive. Run ids are plain names checked before any path is made from them: no request reaches
outside the runs directory.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from chatlora.atomic import new_file, write_text
from chatlora.data.sources import SUFFIXES
from chatlora.errors import UserError
from chatlora.models.hub import HUB_ID, dataset_dir, download_dir
from chatlora.rundir import RUN_ENTRIES, read_json_object, read_metrics, run_status

RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STUDIO = ".studio"   # launch records and logs, beside the runs
LOG_TAIL = 4000


class RunsDir:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / STUDIO).mkdir(exist_ok=True)

    # ---------------------------------------------------------------- paths

    def path(self, run_id: str) -> Path:
        """The folder of run `run_id`; a UserError (400) for anything but a plain name in this folder."""
        if not isinstance(run_id, str) or not RUN_ID.match(run_id) or run_id.endswith((".eval", ".export")):
            raise UserError(f"run id {run_id!r} must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                            f"letter or digit (and not ending in .eval or .export)")
        path = self.root / run_id
        if path.resolve().parent != self.root:   # a symlink out of the runs directory
            raise UserError(f"run {run_id} is not inside the runs directory")
        return path

    def _record(self, run_id: str) -> Path:
        return self.root / STUDIO / f"{run_id}.json"

    def _log(self, run_id: str) -> Path:
        return self.root / STUDIO / f"{run_id}.log"

    # ---------------------------------------------------------------- reading

    def ids(self) -> list[str]:
        """Every run: folders with a run's config, and launches that have not made their folder yet."""
        found = {p.name for p in self.root.iterdir() if p.is_dir() and RUN_ID.match(p.name)
                 and ((p / "config.yaml").is_file() or (p / "status.json").is_file())}
        found |= {p.stem for p in (self.root / STUDIO).glob("*.json")
                  if RUN_ID.match(p.stem) and not p.stem.endswith((".eval", ".export"))}
        return sorted(found)

    def exists(self, run_id: str) -> bool:
        return self.path(run_id).exists() or self._record(run_id).exists()

    def state(self, run_id: str) -> dict:
        """{"state": starting|running|finished|stopped|failed|interrupted, "message"?, ...}."""
        path, record = self.path(run_id), self._read_record(run_id)
        status = run_status(path) if (path / "status.json").is_file() else None
        launch_alive = record and _alive(record.get("pid"))
        if status and not (status["state"] in ("finished", "stopped", "failed") and launch_alive
                           and record.get("started", 0) > status.get("time", 0)):
            return status   # (a resumed run's old end state is not its state while its new process starts)
        if launch_alive:
            return {"state": "starting", "pid": record["pid"]}
        if record and record.get("stop_requested"):
            return {"state": "stopped", "message": "stopped before training began"}
        if record:
            return {"state": "failed", "message": self.log_tail(run_id)[-800:] or "the training process ended"}
        return {"state": "finished" if (path / "final").is_dir() else "stopped"}

    def metrics(self, run_id: str) -> list[dict]:
        path = self.path(run_id) / "metrics.jsonl"
        return read_metrics(path) if path.is_file() else []

    def summary(self, run_id: str) -> dict:
        path = self.path(run_id)
        rows = self.metrics(run_id)
        train_rows = [r for r in rows if r.get("loss") is not None]
        held = [r for r in rows if r.get("held_out_loss") is not None]
        info = read_json_object(path / "run.json")
        record = self._read_record(run_id) or {}
        return {"id": run_id, **self.state(run_id), "name": info.get("name", run_id),
                "base_model": info.get("base_model") or record.get("config", {}).get("model.path"),
                "step": train_rows[-1]["step"] if train_rows else 0, "total_steps": record.get("total_steps"),
                "loss": train_rows[-1]["loss"] if train_rows else None,
                "held_out_loss": held[-1]["held_out_loss"] if held else None,
                "command": record.get("command"), "finished": (path / "final").is_dir()}

    def log_tail(self, run_id: str) -> str:
        log = self._log(run_id)
        if not log.is_file():
            return ""
        with log.open("rb") as f:
            f.seek(max(0, log.stat().st_size - LOG_TAIL))
            text = f.read().decode("utf-8", errors="replace")
        # a progress bar redraws its line with carriage returns: keep what a terminal would show
        return "\n".join(next((p for p in reversed(line.split("\r")) if p.strip()), "") for line in text.split("\n"))

    # ---------------------------------------------------------------- acting

    def command(self, run_id: str, settings: dict, preset: str | None = None, resume: bool = False) -> list[str]:
        """The `chatlora train` command for a run (what the page shows, copyable)."""
        args = ["chatlora", "train", "--output", str(self.path(run_id))]
        if resume:
            return args + ["--resume"]
        if preset:
            args += ["--preset", preset]
        for override in form_overrides(settings):
            args += ["--set", override]
        return args

    def start(self, run_id: str, settings: dict, preset: str | None = None) -> dict:
        """Check the settings as `chatlora train` would, then launch it; a UserError for bad settings,
        FileExistsError when the id is taken (by a run, or by another studio's launch at this moment)."""
        from chatlora.config import load_config

        path = self.path(run_id)
        cfg = load_config(overrides=form_overrides(settings), preset=preset)
        if path.exists():
            raise FileExistsError(f"run {run_id} exists")
        total = cfg.train.max_steps
        return self._launch(run_id, self.command(run_id, settings, preset), {"config": settings, "preset": preset,
                                                                             "total_steps": total}, new=True)

    def resume(self, run_id: str) -> dict:
        state = self.state(run_id)["state"]
        if state in ("running", "starting"):
            raise FileExistsError(f"run {run_id} is {state}")
        if not (self.path(run_id) / "config.yaml").is_file():
            raise UserError(f"run {run_id} has no configuration to resume from (it failed before training "
                            f"started); start a new run instead")
        return self._launch(run_id, self.command(run_id, {}, resume=True), self._read_record(run_id) or {})

    def stop(self, run_id: str) -> dict:
        """SIGTERM to the run's training process: it finishes its step, writes a checkpoint and exits."""
        state = self.state(run_id)
        if state["state"] not in ("running", "starting"):
            raise FileNotFoundError(f"run {run_id} is not running ({state['state']})")
        record = self._read_record(run_id)
        if record is not None:
            _write_json(self._record(run_id), dict(record, stop_requested=True))
        os.kill(int(state["pid"]), signal.SIGTERM)
        return {"id": run_id, "state": "stopping"}

    def delete(self, run_id: str) -> None:
        path = self.path(run_id)
        if self.state(run_id)["state"] in ("running", "starting"):
            raise FileExistsError(f"run {run_id} is running; stop it first")
        if path.exists():
            foreign = sorted(p.name for p in path.iterdir() if not RUN_ENTRIES.match(p.name))
            if foreign:
                raise UserError(f"{path} holds files that are not a run's ({', '.join(foreign)}); it is left as it is")
            shutil.rmtree(path)
        for kind in ("", ".eval", ".export"):
            self._record(run_id + kind).unlink(missing_ok=True)
            self._log(run_id + kind).unlink(missing_ok=True)

    def upload(self, name: str, data: bytes) -> Path:
        """An uploaded data file, kept under RUNS/.studio/uploads/ with a new name (never overwriting)."""
        base = Path(name).name
        if not base or base != name or not RUN_ID.match(base.replace(" ", "_")) or Path(base).suffix.lower() not in SUFFIXES:
            raise UserError(f"upload name {name!r}: a plain file name ending in one of {', '.join(SUFFIXES)}")
        if not data:
            raise UserError(f"upload {name}: the file is empty")
        folder = self.root / STUDIO / "uploads"
        folder.mkdir(exist_ok=True)
        target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{base}"
        n = 1
        while target.exists():
            target = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{n}-{base}"
            n += 1
        with new_file(target) as tmp:
            tmp.write_bytes(data)
        return target

    # ---------------------------------------------------------------- evaluation and export jobs

    def evaluate(self, run_id: str, limit: int) -> dict:
        """`chatlora eval` of the run into RUN/eval (replacing an earlier report), as its own process."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 100_000:
            raise UserError("limit must be an integer from 1 to 100000")
        path = self._adapted(run_id)
        command = ["chatlora", "eval", str(path), "--limit", str(limit), "--output", str(path / "eval"), "--overwrite"]
        return self._job(run_id, "eval", command, path / "eval" / "report.json")

    def export(self, run_id: str, fmt: str, quant: str) -> dict:
        """`chatlora export` of the run into RUNS/.studio/exports/ (a new name each time: never overwritten)."""
        from chatlora.config import GGUF_TYPES

        if fmt not in ("gguf", "ollama"):
            raise UserError("format must be gguf or ollama")
        if quant not in GGUF_TYPES:
            raise UserError(f"quant must be one of {', '.join(GGUF_TYPES)}")
        path = self._adapted(run_id)
        exports = self.root / STUDIO / "exports"
        exports.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        output = exports / (f"{run_id}-{quant}-{stamp}.gguf" if fmt == "gguf" else f"{run_id}-{quant}-{stamp}-ollama")
        command = ["chatlora", "export", str(path), "--format", fmt, "--quant", quant, "--output", str(output)]
        return self._job(run_id, "export", command, output / "model.gguf" if fmt == "ollama" else output)

    def job_state(self, run_id: str, kind: str) -> dict:
        """An eval or export job: none, running, finished (its output written after it started) or failed."""
        record = read_json_object(self._record(f"{run_id}.{kind}")) if self._record(f"{run_id}.{kind}").is_file() else None
        if record is None:
            return {"state": "none"}
        output = Path(record["output"])
        out = {"command": record["command"], "output": str(output), "log": self.log_tail(f"{run_id}.{kind}")}
        if _alive(record.get("pid")):
            return {"state": "running", **out}
        if output.is_file() and output.stat().st_mtime >= record["started"] - 1:
            return {"state": "finished", **out, "bytes": output.stat().st_size}
        return {"state": "failed", **out}

    # ---------------------------------------------------------------- downloads from the hub

    def download(self, repo_id: str, dataset: bool) -> dict:
        """`chatlora download [--dataset] OWNER/NAME` as its own process: the studio's one way to the
        network, taken only when the page asks for it."""
        if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
            raise UserError(f"{repo_id!r} is not a hub id (OWNER/NAME)")
        key = _download_key(repo_id, dataset)
        if self.download_state(repo_id, dataset)["state"] == "running":
            raise FileExistsError(f"{repo_id} is already downloading")
        self._log(key).unlink(missing_ok=True)
        command = ["chatlora", "download", repo_id, *(["--dataset"] if dataset else [])]
        return self._launch(key, command, {"repo": repo_id, "dataset": dataset})

    def download_state(self, repo_id: str, dataset: bool) -> dict:
        """none, running, finished or failed (by the exit status of a download this studio started; for
        one an earlier studio started, by whether the cache now holds it), with the log's tail."""
        if not isinstance(repo_id, str) or not HUB_ID.match(repo_id):
            raise UserError(f"{repo_id!r} is not a hub id (OWNER/NAME)")
        key = _download_key(repo_id, dataset)
        record = self._read_record(key)
        if record is None:
            return {"state": "none"}
        out = {"command": record["command"], "log": self.log_tail(key)}
        pid = record.get("pid")
        if _alive(pid):
            return {"state": "running", **out}
        if pid in _REAPED:
            done = _REAPED[pid].returncode == 0
        else:
            target = dataset_dir(repo_id) if dataset else download_dir(repo_id)
            done = target.is_dir() and any(target.iterdir())
        return {"state": "finished" if done else "failed", **out}

    def _adapted(self, run_id: str) -> Path:
        path = self.path(run_id)
        if self.state(run_id)["state"] in ("running", "starting"):
            raise FileExistsError(f"run {run_id} is training; stop it or let it finish first")
        if not any(path.glob("checkpoint-*")) and not (path / "final").is_dir():
            raise UserError(f"run {run_id} has no adapter yet")
        return path

    def _job(self, run_id: str, kind: str, command: list[str], output: Path) -> dict:
        if self.job_state(run_id, kind)["state"] == "running":
            raise FileExistsError(f"run {run_id} already has an {kind} running")
        self._log(f"{run_id}.{kind}").unlink(missing_ok=True)
        return self._launch(f"{run_id}.{kind}", command, {"output": str(output)})

    def _launch(self, run_id: str, command: list[str], record: dict, new: bool = False) -> dict:
        record_path = self._record(run_id)
        if new:
            try:   # the id is claimed atomically: two studios starting the same id, one wins
                with record_path.open("x", encoding="utf-8") as f:
                    f.write("{}")
            except FileExistsError:
                raise FileExistsError(f"run {run_id} exists") from None
        log = self._log(run_id).open("ab")
        log.write(f"$ {shlex.join(command)}\n".encode())
        log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen([sys.executable, "-m", "chatlora", *command[1:]], stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root,
                                   start_new_session=True, env=env)
        log.close()
        record = dict(record, pid=process.pid, started=time.time(), command=shlex.join(command), stop_requested=False)
        _write_json(record_path, record)
        _REAPED[process.pid] = process   # reaped when it ends (no zombie while this studio lives)
        return {"id": run_id, "state": "starting", "command": record["command"]}

    def _read_record(self, run_id: str) -> dict | None:
        return read_json_object(self._record(run_id)) if self._record(run_id).is_file() else None


_REAPED: dict[int, subprocess.Popen] = {}


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return False
    process = _REAPED.get(pid)
    if process is not None:   # ours: poll() also reaps it
        return process.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _download_key(repo_id: str, dataset: bool) -> str:
    """The launch record's name of a download: never a run id (those start with a letter or digit)."""
    return f"_download.{'dataset' if dataset else 'model'}.{repo_id.replace('/', '--')}"


def form_overrides(settings) -> list[str]:
    """A form's settings ({"group.field": value}) as `--set` overrides (each value as JSON, which YAML
    reads, strings staying strings); a UserError when they are not such an object."""
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise UserError("config must be an object of GROUP.FIELD: value")
    return [f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in settings.items()]


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, ensure_ascii=False), overwrite=True)
