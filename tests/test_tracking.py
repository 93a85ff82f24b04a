"""Experiment trackers (`train.report_to`): what each one logged, read back with its own library's
reader, against the run's metrics.jsonl; resume and `chatlora eval` write into the same tracker runs."""

import json
from pathlib import Path

import pytest

from chatlora.config import load_config
from chatlora.errors import UserError
from chatlora.rundir import read_metrics
from chatlora.train.loop import train

ALL = "tensorboard,wandb,mlflow,swanlab"


def tensorboard_scalars(run: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def mlflow_run(run: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient((run / "mlruns").resolve().as_uri())
    return client, client.get_run(json.loads((run / "trackers.json").read_text())["mlflow"])


def wandb_history(run: Path) -> dict[str, dict[int, float]]:
    """The history records of the offline W&B runs (W&B's record format, read by SwanLab's W&B reader)."""
    from swanlab.converter.wb.wbdatastore import WBDataStoreReader
    from wandb.proto import wandb_internal_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("wandb/offline-run-*/run-*.wandb")):
        reader = WBDataStoreReader()
        reader.open(path)
        while (data := reader.scan()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                for key, value in items.items():
                    if not key.startswith("_"):
                        out.setdefault(key, {})[items["_step"]] = value
        reader.close()
    return out


def swanlab_scalars(run: Path) -> dict[str, dict[int, float]]:
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    out: dict[str, dict[int, float]] = {}
    for path in sorted(run.glob("swanlog/run-*/run-*.swanlab")):
        reader = DataStoreReader()
        reader.open(path)
        for data in reader:
            record = Record()
            record.ParseFromString(data)
            if record.HasField("scalar"):
                out.setdefault(record.scalar.key, {})[record.scalar.step] = record.scalar.value.number
        reader.close()
    return out


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, index_dir, tiny_data):
    """A tiny run reporting to all four trackers: 2 steps, then resumed to 4."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    cfg = load_config(overrides=["train.max_steps=2", "train.eval_every=1", "data.held_out_fraction=0.1"],
                      flags={"model.path": str(index_dir), "data.path": str(tiny_data), "train.report_to": ALL})
    train(cfg, run)
    first_ids = json.loads((run / "trackers.json").read_text())
    train(load_config(overrides=["train.max_steps=4"], base=cfg), run, resume=True)
    return run, first_ids


def test_every_tracker_holds_the_runs_metrics(tracked_run):
    run, _ = tracked_run
    rows = read_metrics(run / "metrics.jsonl")
    loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    held_out = {r["step"]: r["held_out_loss"] for r in rows if "held_out_loss" in r}
    lr = {r["step"]: r["lr"] for r in rows if "lr" in r}
    assert sorted(loss) == [1, 2, 3, 4] and 0 in held_out and 4 in held_out

    def close(got: dict, want: dict) -> bool:   # TensorBoard keeps float32
        return sorted(got) == sorted(want) and all(abs(got[k] - want[k]) <= 1e-6 * abs(want[k]) for k in want)

    tb = tensorboard_scalars(run)
    assert close(tb["train/loss"], loss) and close(tb["eval/held_out_loss"], held_out) and close(tb["train/lr"], lr)
    assert {"train/grad_norm", "train/tokens_per_s", "train/epoch"} <= set(tb)

    client, mlrun = mlflow_run(run)
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")}
    assert history == loss and mlrun.info.status == "FINISHED"
    assert mlrun.data.params["lora.r"] == "8" and mlrun.data.params["train.report_to"] == json.dumps(ALL.split(","))

    wb = wandb_history(run)
    assert wb["train/loss"] == pytest.approx(loss) and wb["eval/held_out_loss"] == pytest.approx(held_out)

    sw = swanlab_scalars(run)
    assert sw["train/loss"] == pytest.approx(loss) and sw["train/lr"] == pytest.approx(lr)


def test_a_resumed_run_writes_into_the_same_tracker_runs(tracked_run):
    run, first_ids = tracked_run
    assert json.loads((run / "trackers.json").read_text()) == first_ids
    assert {"wandb", "mlflow", "swanlab"} <= set(first_ids)
    assert len(list(run.glob("mlruns/*/*/meta.yaml"))) == 1   # one MLflow run, not one per launch


def test_eval_reports_into_the_runs_trackers(tracked_run, tmp_path):
    from chatlora.evaluate import evaluate_run

    run, _ = tracked_run
    report = evaluate_run(str(run), limit=2, output=str(tmp_path / "eval"))
    assert report["trackers"] == ALL.split(",")
    tb = tensorboard_scalars(run)
    assert tb["eval/tuned/loss"] == {4: pytest.approx(report["models"]["tuned"]["loss"], rel=1e-6)}
    client, mlrun = mlflow_run(run)
    assert mlrun.data.metrics["eval/base/loss"] == pytest.approx(report["models"]["base"]["loss"])


def test_tracker_mistakes_are_clear(index_dir, tiny_data, tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown tracker.*tensorbored.*trackers: tensorboard, wandb"):
        load_config(flags={"train.report_to": "tensorbored"})
    import chatlora.tracking as tracking

    monkeypatch.setattr(tracking, "_installed", lambda name: name != "mlflow")
    cfg = load_config(overrides=["train.max_steps=1"], flags={"model.path": str(index_dir), "data.path": str(tiny_data),
                                                               "train.report_to": "tensorboard,mlflow"})
    with pytest.raises(UserError, match="mlflow, which is not installed here: pip install mlflow-skinny"):
        train(cfg, tmp_path / "run")
