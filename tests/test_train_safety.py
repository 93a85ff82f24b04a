"""No fault may cost a run: damaged checkpoints, torn metrics, non-finite weights, a full disk,
--overwrite of what is not a run, resuming a finished run, file modes."""

import errno
import json
import os
import stat

import pytest
from helpers import config_for, step_losses

from chatlora.config import load_config
from chatlora.errors import UserError
from chatlora.rundir import load_run
from chatlora.train.checkpoint import latest_checkpoint
from chatlora.train.loop import train


def trained(index_dir, data, run, **settings):
    train(config_for(index_dir, data, **settings), run)
    return run


@pytest.fixture(scope="module")
def three_checkpoints(index_dir, tiny_data, tmp_path_factory):
    """A 6-step run with checkpoints at 2, 4 and 6, and final/."""
    return trained(index_dir, tiny_data, tmp_path_factory.mktemp("ckpt") / "run", max_steps=6, save_every=2,
                   keep_last=0, eval_every=0)


def damaged_copy(src, dst, file, how):
    import shutil

    shutil.copytree(src, dst)
    target = dst / "checkpoint-6" / file
    data = target.read_bytes()
    target.write_bytes(b"" if how == "empty" else data[: len(data) // 2])
    shutil.rmtree(dst / "final")
    return dst


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "resume_state.safetensors", "trainer_state.json",
                                  "adapter_config.json"])
@pytest.mark.parametrize("how", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_skipped_with_a_warning(three_checkpoints, tmp_path, file, how):
    run = damaged_copy(three_checkpoints, tmp_path / "run", file, how)
    with pytest.warns(UserWarning, match=f"checkpoint-6 is damaged .*{file}"):
        assert latest_checkpoint(run).name == "checkpoint-4"
    with pytest.warns(UserWarning, match="damaged"):
        assert load_run(run).adapter.name == "checkpoint-4"   # chat and serve use the one before


def test_resume_falls_back_past_a_damaged_checkpoint(index_dir, tiny_data, three_checkpoints, tmp_path):
    run = damaged_copy(three_checkpoints, tmp_path / "run", "adapter_model.safetensors", "truncated")
    with pytest.warns(UserWarning, match="checkpoint-6 is damaged"):
        train(config_for(index_dir, tiny_data, max_steps=6, save_every=2, keep_last=0, eval_every=0), run,
              resume=True)
    assert step_losses(run) == step_losses(three_checkpoints)   # steps 5 and 6 again, exactly


def test_a_torn_last_metrics_line_is_repaired_on_resume(index_dir, tiny_data, tmp_path):
    run = trained(index_dir, tiny_data, tmp_path / "run", max_steps=2, save_every=1, eval_every=0)
    metrics = run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "loss": 1.2')   # killed while writing a line
    with pytest.warns(UserWarning, match=r"metrics.jsonl:5: a torn last line"):
        train(config_for(index_dir, tiny_data, max_steps=3, save_every=1, eval_every=0), run, resume=True)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    metrics.write_text('{"step": 1, "loss": 1.0}\nnot json\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(UserError, match="metrics.jsonl:2: not a metrics row"):
        train(config_for(index_dir, tiny_data, max_steps=4, save_every=1, eval_every=0), run, resume=True)


@pytest.mark.parametrize("setting", ["train.learning_rate=.inf", "train.learning_rate=1e39", "lora.alpha=.nan",
                                     "train.epochs=.inf", "generate.temperature=.nan"])
def test_non_finite_and_absurd_settings_are_refused(setting):
    with pytest.raises(UserError, match=setting.split("=")[0]):
        load_config(overrides=[setting])


def test_final_is_never_written_with_non_finite_weights(index_dir, tiny_data, tmp_path, monkeypatch):
    from chatlora.train import loop as train_module

    monkeypatch.setattr(train_module, "lr_at", lambda step, total, cfg: float("inf"))   # past the config check
    run = tmp_path / "run"
    with pytest.raises(UserError, match="holds NaN or infinite values"):
        train(config_for(index_dir, tiny_data, max_steps=1, save_every=0), run)
    assert not (run / "final").exists()
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))


def test_a_full_disk_is_a_clear_error_and_leaves_nothing_half_written(index_dir, tiny_data, tmp_path, monkeypatch):
    import safetensors.torch

    run = tmp_path / "run"
    real, calls = safetensors.torch.save_file, []

    def full(tensors, filename, *a, **k):
        calls.append(filename)
        if "resume_state" in str(filename) and len(calls) > 1:   # the second checkpoint's resume state
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(UserError, match=r"no space left writing .*checkpoint-4 \(.* MiB free; about .* MiB"):
        train(config_for(index_dir, tiny_data, max_steps=6, save_every=2, eval_every=0), run)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []
    assert latest_checkpoint(run).name == "checkpoint-2"


def test_overwrite_replaces_only_a_chatlora_run(index_dir, tiny_data, tmp_path):
    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "holiday.jpg").write_bytes(b"\xff\xd8")
    (mine / "run.json").write_text("{}")
    with pytest.raises(UserError, match="not one .*holiday.jpg.*Nothing was deleted"):
        train(config_for(index_dir, tiny_data, max_steps=1), mine, overwrite=True)
    assert (mine / "holiday.jpg").read_bytes() == b"\xff\xd8"
    file = tmp_path / "a-file"
    file.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        train(config_for(index_dir, tiny_data, max_steps=1), file)
    run = trained(index_dir, tiny_data, tmp_path / "run", max_steps=1)
    train(config_for(index_dir, tiny_data, max_steps=2), run, overwrite=True)   # a run: replaced
    assert len(step_losses(run)) == 2


def test_resuming_a_finished_run_does_nothing_or_continues(index_dir, tiny_data, tmp_path, capsys):
    """A run that wrote only final/ (save_every 0) resumes to "nothing to do", and continues exactly
    when it is given more steps (a constant rate: the schedule does not depend on the length)."""
    settings = dict(save_every=0, eval_every=0, schedule="constant")
    straight = trained(index_dir, tiny_data, tmp_path / "straight", max_steps=4, **settings)
    run = trained(index_dir, tiny_data, tmp_path / "run", max_steps=2, **settings)
    before = (run / "final" / "adapter_model.safetensors").read_bytes()
    said = capsys.readouterr().err   # what the first run said before and after its progress bar
    assert said.index("held-out loss of the base model on") < said.index("training:")
    assert "held-out loss at step 2:" in said
    train(config_for(index_dir, tiny_data, max_steps=2, **settings), run, resume=True)
    assert "nothing to do" in capsys.readouterr().err
    assert (run / "final" / "adapter_model.safetensors").read_bytes() == before and len(step_losses(run)) == 2
    train(config_for(index_dir, tiny_data, max_steps=4, **settings), run, resume=True)
    assert step_losses(run) == step_losses(straight)


def test_written_files_take_the_umasks_modes(index_dir, tiny_data, tmp_path):
    from chatlora.export import merge_run

    old = os.umask(0o022)
    try:
        run = trained(index_dir, tiny_data, tmp_path / "run", max_steps=2, save_every=1)
        merged = merge_run(run, tmp_path / "merged")
    finally:
        os.umask(old)
    for path in [run / "config.yaml", run / "run.json", run / "metrics.jsonl", run / "final" / "COMPLETE",
                 run / "checkpoint-2" / "adapter_model.safetensors", merged / "config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    for path in [run / "final", run / "checkpoint-2", merged]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755, path


def test_the_pass_size_grows_with_max_seq_tokens_unless_chosen():
    assert load_config(flags={"data.max_seq_tokens": 100_000}).train.micro_batch_tokens == 100_000
    with pytest.raises(UserError, match="micro_batch_tokens must be >= data.max_seq_tokens"):
        load_config(overrides=["train.micro_batch_tokens=1024"], flags={"data.max_seq_tokens": 4096})


def test_a_checkpoint_is_flushed_to_disk_before_it_is_marked_and_renamed(tmp_path, monkeypatch):
    from chatlora.atomic import new_directory

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1])
    with new_directory(tmp_path / "checkpoint-1") as tmp:
        (tmp / "a.safetensors").write_bytes(b"a")
        (tmp / "COMPLETE").write_text("{}")
    names = [(kind, path.rsplit("/", 1)[-1]) for kind, path in events]
    renamed = names.index(("replace", "checkpoint-1"))
    assert ("fsync", "a.safetensors") in names[:renamed] and ("fsync", "COMPLETE") in names[:renamed]
    assert names[renamed + 1] == ("fsync", tmp_path.name)   # the directory entry itself
