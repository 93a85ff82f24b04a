"""Experiment trackers: a run's metrics, its resolved configuration and its evaluation reports sent to
TensorBoard, Weights & Biases, MLflow or SwanLab (`train.report_to`, `--report-to`), each through the
library's own API, each offline unless the user points it elsewhere:

    tensorboard   event files in RUN/tensorboard (read by `tensorboard --logdir RUN`)
    wandb         an offline W&B run in RUN/wandb (`wandb sync RUN/wandb/offline-run-*` uploads it);
                  WANDB_MODE=online sends it as it runs
    mlflow        MLflow's file store in RUN/mlruns (`mlflow ui --backend-store-uri RUN/mlruns`);
                  MLFLOW_TRACKING_URI sends it to that server or database instead
    swanlab       an offline SwanLab run in RUN/swanlog (`swanlab sync` uploads it); SWANLAB_MODE
                  chooses another mode

Each is an optional package (`pip install 'chatlora[tracking]'` installs all four). Names:
train/loss, train/lr, train/grad_norm, train/tokens_per_s, train/epoch, eval/held_out_loss at their
optimizer step; `chatlora eval` adds eval/{base,tuned}/{loss,perplexity,bleu4,...} at the run's last
step. RUN/trackers.json keeps each tracker's run id, so a resumed run and a later `chatlora eval` write
into the same tracker run. On resume TensorBoard hides the events after the checkpoint's step; the
others keep them (the values logged after the checkpoint appear twice for those steps).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from chatlora.atomic import write_text
from chatlora.errors import UserError
from chatlora.rundir import read_json_object

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny", "swanlab": "swanlab"}
IDS_FILE = "trackers.json"
# metrics.jsonl's fields -> the names trackers show
NAMES = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "tokens_per_s": "train/tokens_per_s",
         "epoch": "train/epoch", "held_out_loss": "eval/held_out_loss"}


class Trackers:
    """The trackers a run reports to, opened together; `log` takes metrics.jsonl's rows."""

    def __init__(self, names: list[str], run: Path, run_name: str, config: dict, resume_step: int = 0):
        missing = [n for n in names if not _installed(n)]
        if missing:
            raise UserError(f"train.report_to names {', '.join(missing)}, which is not installed here: "
                            f"pip install {' '.join(PACKAGES[n] for n in missing)} (or 'chatlora[tracking]')")
        self.run = run
        ids = _read_ids(run) if resume_step else {}
        self.open = [_OPENERS[n](run, run_name, config, ids.get(n), resume_step) for n in names]
        if self.open:
            _write_ids(run, {**ids, **{t.kind: t.id for t in self.open if t.id}})

    def log(self, row: dict) -> None:
        values = {NAMES[k]: float(v) for k, v in row.items() if k in NAMES and v is not None}
        if values:
            for tracker in self.open:
                tracker.log(row["step"], values)

    def finish(self, state: str = "finished") -> None:
        """End every tracker's run: `state` is finished, stopped (a signal; the run resumes) or failed."""
        for tracker in self.open:
            tracker.finish(state)


def report_eval(run: Path, names: list[str], run_name: str, config: dict, step: int, report: dict) -> list[str]:
    """An evaluation report's metrics into the run's trackers (the tracker runs that training opened,
    found in RUN/trackers.json), at `step`; returns the trackers written."""
    values = {f"eval/{model}/{k}": float(v) for model, metrics in report["models"].items()
              for k, v in metrics.items() if isinstance(v, (int, float))}
    trackers = Trackers(names, run, run_name, config, resume_step=max(step, 1))
    for tracker in trackers.open:
        tracker.log(step, values)
    trackers.finish()
    return names


def _installed(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None   # each tracker's module has its name


def _read_ids(run: Path) -> dict:
    return read_json_object(run / IDS_FILE)


def _write_ids(run: Path, ids: dict) -> None:
    write_text(run / IDS_FILE, json.dumps(ids, indent=1) + "\n", overwrite=True)


def _flat(config: dict, prefix: str = "") -> dict[str, str]:
    """{"lora": {"r": 8}} -> {"lora.r": "8"}: parameters for trackers that want flat string values."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    return out


class _TensorBoard:
    kind = "tensorboard"

    def __init__(self, run: Path, run_name: str, config: dict, known_id, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events at or after it, left by the interrupted run, are hidden from then on
        self.writer = SummaryWriter(str(run / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        self.id = None
        if not resume_step:
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, ensure_ascii=False) + "\n```", 0)

    def log(self, step: int, values: dict) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def finish(self, state: str) -> None:
        self.writer.close()


class _Wandb:
    kind = "wandb"

    def __init__(self, run: Path, run_name: str, config: dict, known_id, resume_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "chatlora"), name=run_name, config=config,
                              dir=str(run), id=known_id, resume="allow" if known_id else None,
                              mode=os.environ.get("WANDB_MODE", "offline"),
                              settings=wandb.Settings(silent=True, x_disable_stats=True))
        self.id = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, state: str) -> None:
        self.run.finish(exit_code=1 if state == "failed" else 0)


class _Mlflow:
    kind = "mlflow"

    def __init__(self, run: Path, run_name: str, config: dict, known_id, resume_step: int):
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:   # the local file store in the run (MLflow asks for this opt-in to use it)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run / "mlruns").resolve().as_uri()
        self.client = MlflowClient(uri)
        if known_id:
            self.id = known_id
            self.client.update_run(known_id, status="RUNNING")
            return
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "chatlora")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in _flat(config).items()]
        for start in range(0, len(params), 100):   # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.id, params=params[start:start + 100])
        self.client.log_dict(self.id, config, "config.json")

    def log(self, step: int, values: dict) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, state: str) -> None:
        self.client.set_terminated(self.id, status={"finished": "FINISHED", "stopped": "KILLED"}.get(state, "FAILED"))


class _Swanlab:
    kind = "swanlab"

    def __init__(self, run: Path, run_name: str, config: dict, known_id, resume_step: int):
        import swanlab

        self.run = swanlab.init(project=os.environ.get("SWANLAB_PROJ_NAME", "chatlora"), name=run_name,
                                config=config, log_dir=str(run / "swanlog"), id=known_id,
                                resume="allow" if known_id else None, mode=os.environ.get("SWANLAB_MODE", "offline"))
        self.id = self.run.id

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def finish(self, state: str) -> None:
        self.run.finish(state={"finished": "success", "stopped": "aborted"}.get(state, "crashed"))


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "swanlab": _Swanlab}
