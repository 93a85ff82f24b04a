"""The training loop: loss semantics, exact resume, interruption, NaN, checkpoints, config drift."""

import json
import signal
import time

import pytest
import torch
from helpers import cli_train, config_for, examples_for, fresh_lora_model, max_adapter_diff, run_step, step_losses
from safetensors.torch import load_file

from chatlora.config import load_config
from chatlora.errors import UserError
from chatlora.models.load import load_model, prepare_base
from chatlora.rundir import run_status, write_status
from chatlora.templates import IGNORE
from chatlora.train.checkpoint import CheckpointWriter, latest_checkpoint
from chatlora.train.loop import train
from chatlora.train.steps import pack, pad


def test_accumulated_micro_batches_equal_one_big_batch(index_dir, index_tok, huanhuan_rows):
    model = fresh_lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[:8])
    big_loss, big_grads = run_step(model, examples, 8, pack)
    for micro in (1, 2, 3):
        loss, g = run_step(model, examples, micro, pack)
        assert abs(loss - big_loss) <= 1e-6 * big_loss  # fp32 sums in another order
        for name in big_grads:
            torch.testing.assert_close(g[name], big_grads[name], atol=1e-7, rtol=1e-5)


def test_packed_equals_padded_and_hf_reference_loss(index_dir, index_tok, huanhuan_rows):
    model = fresh_lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[10:16])
    packed_loss, packed_grads = run_step(model, examples, 6, pack)
    padded_loss, padded_grads = run_step(model, examples, 6, lambda ex: pad(ex, 0))
    assert abs(packed_loss - padded_loss) < 1e-5
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], padded_grads[name], atol=1e-6, rtol=1e-4)
    # HF's own loss (labels shifted inside the model, mean over supervised tokens) on the padded batch.
    width = max(len(e.input_ids) for e in examples)
    ids = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE] * (width - len(e.labels)) for e in examples])
    mask = (torch.arange(width)[None] < torch.tensor([len(e.input_ids) for e in examples])[:, None]).long()
    with torch.no_grad():
        hf_loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert abs(hf_loss - packed_loss) < 1e-5


def test_train_writes_a_complete_run(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    final = train(config_for(index_dir, tiny_data, max_steps=4, save_every=2, eval_every=2, keep_last=1), run)
    assert final == run / "final" and (final / "COMPLETE").is_file()
    assert [p.name for p in run.glob("checkpoint-*")] == ["checkpoint-4"]
    for name in ("config.yaml", "run.json", "data_report.json", "loss_curve.png", "tokenizer/tokenizer.model"):
        assert (run / name).is_file(), name
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "held_out_loss" in r] == [0, 2, 4]
    # the first step's row says when the data, the libraries, the device, the model, the optimizer and
    # the rest were ready
    first = next(r for r in rows if "loss" in r)
    times = first["startup_s"]
    assert list(times) == ["data", "libraries", "device", "model", "optimizer", "ready"]
    assert list(times.values()) == sorted(times.values()) and times["data"] >= 0
    assert times["ready"] <= first["elapsed_s"]
    assert [r["step"] for r in rows if "startup_s" in r] == [1]
    info = json.loads((run / "run.json").read_text())
    assert info["template"] == "index" and info["stop_ids"][0] == 2


def test_output_directory_is_never_clobbered(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        train(config_for(index_dir, tiny_data, max_steps=1), run)
    assert (run / "precious.txt").read_text() == "mine"


def test_saved_adapter_loads_in_plain_peft_with_same_logits(index_dir, tiny_data, tmp_path):
    from peft import PeftModel

    from chatlora.rundir import load_run, load_tuned_model

    run = tmp_path / "run"
    train(config_for(index_dir, tiny_data, max_steps=2, learning_rate=0.01), run)
    ours = load_tuned_model(load_run(run), device="cpu")
    base = load_model(prepare_base(str(index_dir)), "float32", "cpu")
    plain = PeftModel.from_pretrained(base, str(run / "final")).eval()
    ids = torch.tensor([[0, 5, 6, 7, 3, 8, 9, 4]])
    with torch.no_grad():
        a, b = ours(ids).logits, plain(ids).logits
        untuned = load_model(prepare_base(str(index_dir)), "float32", "cpu")(ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert (a - untuned).abs().max() > 1e-4, "the adapter changes the model"


def test_nan_stops_run_and_no_non_finite_tensor_is_written(index_dir, tiny_data, tmp_path, monkeypatch):
    from chatlora.train import gradients as gradients_module

    calls = {"n": 0}
    real = gradients_module.loss_sum

    def poisoned(model, batch):
        calls["n"] += model.training  # count training micro-batches only, not held-out evaluation
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 4 else loss  # from step 3 on (2 micro-batches a step)

    monkeypatch.setattr(gradients_module, "loss_sum", poisoned)
    run = tmp_path / "run"
    with pytest.raises(UserError, match="step 3: loss nan"):
        train(config_for(index_dir, tiny_data, max_steps=6, save_every=1, examples_per_step=8,
                         micro_batch_examples=4), run)
    assert latest_checkpoint(run).name == "checkpoint-2" and not (run / "final").exists()
    status = run_status(run)
    assert status["state"] == "failed" and "step 3: loss nan" in status["message"]
    for f in run.rglob("*.safetensors"):
        for name, t in load_file(str(f)).items():
            assert not t.is_floating_point() or torch.isfinite(t).all(), f"{f}:{name}"


def test_status_file_follows_the_training_process(index_dir, tiny_data, tmp_path):
    """status.json: finished after a run; a `running` status whose process is gone is `interrupted`;
    a directory refused at start (not empty) is left as it was."""
    import json
    import subprocess

    run = tmp_path / "run"
    train(config_for(index_dir, tiny_data, max_steps=1), run)
    assert run_status(run)["state"] == "finished"
    gone = subprocess.Popen(["true"])
    gone.wait()   # a pid that existed and has exited
    write_status(run, "running")
    status = json.loads((run / "status.json").read_text())
    (run / "status.json").write_text(json.dumps(dict(status, pid=gone.pid)))
    assert run_status(run)["state"] == "interrupted"
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        train(config_for(index_dir, tiny_data, max_steps=1), other)
    assert sorted(p.name for p in other.iterdir()) == ["mine.txt"]


def test_torn_checkpoint_is_skipped(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config_for(index_dir, tiny_data, max_steps=2, save_every=2), run)
    torn = run / "checkpoint-9"
    torn.mkdir()
    (torn / "adapter_config.json").write_text("{")
    assert latest_checkpoint(run).name == "checkpoint-2"


def test_resume_with_different_config_is_refused(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = config_for(index_dir, tiny_data, max_steps=2, save_every=1)
    train(cfg, run)
    changed = load_config(overrides=["lora.r=16", "model.template=self-llm"], base=cfg)
    with pytest.raises(UserError) as e:
        train(changed, run, resume=True)
    assert "model.template: 'auto' -> 'self-llm'" in str(e.value) and "lora.r: 8 -> 16" in str(e.value)


# ---------------------------------------------------------------- real processes: kill, SIGTERM, resume


@pytest.mark.slow
def test_resume_after_sigkill_mid_accumulation_is_exact(index_dir, tiny_data, tmp_path):
    reference = tmp_path / "reference"
    assert cli_train(reference, index_dir, tiny_data).returncode == 0
    # Killed before micro-batch 1 of step 9 (0-based 8): mid-epoch (8 steps an epoch, dropout on),
    # mid-accumulation, after checkpoint-8 and before checkpoint-10.
    run = tmp_path / "killed"
    killed = cli_train(run, index_dir, tiny_data, kill_at=(8, 1))
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(run).name == "checkpoint-8" and not (run / "final").exists()
    resumed = cli_train(run, index_dir, tiny_data, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = step_losses(reference), step_losses(run)
    assert len(a) == len(b) == 12
    assert max(abs(x - y) for x, y in zip(a, b)) <= 1e-6
    assert max_adapter_diff(reference / "final", run / "final") <= 1e-6


@pytest.mark.slow
def test_sigterm_writes_a_resumable_checkpoint(index_dir, tiny_data, tmp_path):
    run = tmp_path / "run"
    proc = cli_train(run, index_dir, tiny_data, "--max-steps", "100000", "--save-every", "0", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        metrics = run / "metrics.jsonl"
        if metrics.is_file() and len(step_losses(run)) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in err
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and int(ckpt.name.split("-")[1]) == len(step_losses(run))
    done = len(step_losses(run))
    resumed = cli_train(run, index_dir, tiny_data, "--resume", "--max-steps", str(done + 1))
    assert resumed.returncode == 0, resumed.stderr
    assert len(step_losses(run)) == done + 1 and (run / "final" / "COMPLETE").is_file()


# ---------------------------------------------------------------- options


def test_schedules_match_transformers(tmp_path):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    from chatlora.train.loop import lr_at

    param = torch.nn.Parameter(torch.zeros(1))
    for schedule, ref_fn in (("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)):
        cfg = load_config(overrides=[f"train.schedule={schedule}", "train.warmup_ratio=0.1"]).train
        opt = torch.optim.SGD([param], lr=cfg.learning_rate)
        total = 50
        ref = ref_fn(opt, num_warmup_steps=5, num_training_steps=total)
        for step in range(total):
            assert abs(lr_at(step, total, cfg) - opt.param_groups[0]["lr"]) < 1e-12, (schedule, step)
            opt.step()
            ref.step()


def test_gradient_checkpointing_gives_the_same_gradients(index_dir, index_tok, huanhuan_rows):
    examples = examples_for(index_tok, huanhuan_rows[:4])
    model = fresh_lora_model(index_dir)
    loss, g = run_step(model, examples, 2, pack)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    loss_ckpt, g_ckpt = run_step(model, examples, 2, pack)
    assert abs(loss - loss_ckpt) < 1e-6
    for name in g:
        torch.testing.assert_close(g[name], g_ckpt[name], atol=1e-7, rtol=1e-5)


def test_rslora_and_dora_reach_the_adapter_config(index_dir, tiny_data, tmp_path):
    cfg = config_for(index_dir, tiny_data, max_steps=1)
    cfg.lora.rslora, cfg.lora.dora, cfg.lora.targets = True, True, ["q_proj", "v_proj"]
    train(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert saved["use_rslora"] and saved["use_dora"] and sorted(saved["target_modules"]) == ["q_proj", "v_proj"]
    assert (saved["r"], saved["lora_alpha"], saved["lora_dropout"]) == (8, 32.0, 0.1)


def test_unknown_lora_target_is_a_clear_error(index_dir, tiny_data, tmp_path):
    cfg = config_for(index_dir, tiny_data, max_steps=1)
    cfg.lora.targets = ["query_key_value"]
    with pytest.raises(UserError, match=r"lora.targets \['query_key_value'\] are not modules"):
        train(cfg, tmp_path / "run")


def test_micro_batches_respect_example_and_token_caps():
    from chatlora.data.dataset import Example
    from chatlora.train.steps import micro_batches

    examples = [Example([0] * n, [0] * n, i) for i, n in enumerate([100, 300, 50, 400, 10, 10])]
    groups = micro_batches(examples, size=16, max_tokens=450)
    assert [[e.line for e in g] for g in groups] == [[0, 1, 2], [3, 4, 5]]
    assert [[e.line for e in g] for g in micro_batches(examples, size=2)] == [[0, 1], [2, 3], [4, 5]]
    assert [[e.line for e in g] for g in micro_batches(examples, 16, max_tokens=200)] == [[0], [1], [2], [3], [4, 5]]


def test_head_on_supervised_positions_equals_full_logits(index_dir, index_tok, huanhuan_rows, monkeypatch):
    from chatlora.train import steps as batches

    model = fresh_lora_model(index_dir)
    examples = examples_for(index_tok, huanhuan_rows[20:26])
    fast_loss, fast = run_step(model, examples, 6, pack)
    monkeypatch.setattr(batches, "PLAIN_HEAD_MODELS", set())  # every model takes the full-logits path
    full_loss, full = run_step(model, examples, 6, pack)
    assert abs(fast_loss - full_loss) < 1e-6
    for name in full:
        torch.testing.assert_close(fast[name], full[name], atol=1e-7, rtol=1e-5)


def test_deferred_read_back_reports_every_step_and_skips_a_non_finite_update(index_dir, tiny_data, tmp_path,
                                                                             monkeypatch):
    """On one GPU a step's loss and gradient norm come back while the next step runs, and the fused
    optimizer skips a non-finite step on the device. Forced here on CPU (fused AdamW takes the same
    flag): every metrics row is written, in order, equal to the synchronous loop's; a NaN step
    applies no update, and the run stops naming it before the next step's update."""
    import json

    from chatlora.train import gradients as gradients_module
    from chatlora.train import loop as train_module

    def rows(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    settings = dict(max_steps=6, eval_every=3, save_every=0, examples_per_step=8, micro_batch_examples=4)
    train(config_for(index_dir, tiny_data, **settings), tmp_path / "sync")
    monkeypatch.setattr(train_module, "defers_read_back", lambda device, ranks: True)
    train(config_for(index_dir, tiny_data, **settings), tmp_path / "deferred")
    sync, deferred = rows(tmp_path / "sync"), rows(tmp_path / "deferred")
    assert [r["step"] for r in deferred] == [r["step"] for r in sync] == [0, 1, 2, 3, 3, 4, 5, 6, 6]
    for a, b in zip(sync, deferred):
        assert a.keys() == b.keys()
        for key in ("loss", "held_out_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (key, a, b)

    updates = []   # (found_inf, whether the weights moved) per optimizer step

    class Watched(torch.optim.AdamW):
        def step(self, *args, **kwargs):
            before = [p.detach().clone() for g in self.param_groups for p in g["params"]]
            out = super().step(*args, **kwargs)
            after = [p.detach() for g in self.param_groups for p in g["params"]]
            updates.append((float(getattr(self, "found_inf", 0.0)),
                            any(not torch.equal(x, y) for x, y in zip(before, after))))
            return out

    calls = {"n": 0}
    real = gradients_module.loss_sum

    def poisoned(model, batch):
        calls["n"] += model.training
        loss = real(model, batch)
        return loss * float("nan") if calls["n"] > 4 else loss   # from step 3 on (2 micro-batches a step)

    monkeypatch.setattr(gradients_module, "loss_sum", poisoned)
    monkeypatch.setattr(torch.optim, "AdamW", Watched)
    run = tmp_path / "nan"
    with pytest.raises(UserError, match="step 3: loss nan"):
        train(config_for(index_dir, tiny_data, max_steps=6, save_every=2, examples_per_step=8,
                         micro_batch_examples=4), run)
    assert updates == [(0.0, True), (0.0, True), (1.0, False)]   # no update for step 3, none after it
    assert latest_checkpoint(run).name == "checkpoint-2" and not (run / "final").exists()
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2]


@pytest.mark.slow
def test_checkpoints_written_in_the_background_hold_what_the_loop_writes_in_line(index_dir, tiny_data, tmp_path,
                                                                                  monkeypatch):
    """On a GPU checkpoints are written on a thread of their own from a snapshot. Forced here on CPU:
    the same files, byte for byte, as writing in line (though training moved on meanwhile), the
    writes on the writer's thread; a write that fails stops the run with its error."""
    import hashlib
    import threading

    from chatlora.train import checkpoint as checkpoint_module
    from chatlora.train import loop as train_module

    def files(run):
        return {str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
                for d in ("checkpoint-4", "checkpoint-6", "final") for p in sorted((run / d).iterdir())}

    settings = dict(max_steps=6, save_every=2, examples_per_step=8, micro_batch_examples=4)
    train(config_for(index_dir, tiny_data, **settings), tmp_path / "inline")
    threads = []
    real_write = checkpoint_module.write_checkpoint

    def watched(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(train_module, "CheckpointWriter", lambda background: CheckpointWriter(True))
    monkeypatch.setattr(train_module, "write_checkpoint", watched)
    train(config_for(index_dir, tiny_data, **settings), tmp_path / "background")
    assert files(tmp_path / "background") == files(tmp_path / "inline")
    assert threads == ["chatlora-checkpoint"] * 4   # checkpoint-2, -4, -6 and final/

    def failing(run, step, *args, **kwargs):
        if step == 2:
            raise UserError("no space left for checkpoint-2 (test)")
        return real_write(run, step, *args, **kwargs)

    monkeypatch.setattr(train_module, "write_checkpoint", failing)
    run = tmp_path / "failing"
    with pytest.raises(UserError, match="no space left for checkpoint-2"):
        train(config_for(index_dir, tiny_data, **settings), run)
    assert not (run / "final").exists() and latest_checkpoint(run) is None
    assert run_status(run)["state"] == "failed"
