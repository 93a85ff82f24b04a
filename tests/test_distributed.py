"""Several processes (torchrun, gloo on CPU) train exactly like one: same per-step losses and adapter
for the same global batch, exact resume, and ranks that disagree stop with the difference named."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from chatlora.config import load_config
from chatlora.train.loop import train

SETTINGS = ["train.max_steps=4", "train.learning_rate=0.01", "train.examples_per_step=8",
            "train.micro_batch_examples=4", "train.eval_every=0", "data.held_out_fraction=0.05"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, huanhuan_rows):
    path = tmp_path_factory.mktemp("ddp") / "data.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:41]), encoding="utf-8")
    return path


def launch(nproc, index_dir, data, output, *extra, via_cli=False):
    sets = [x for s in SETTINGS + [e for e in extra if not e.startswith("--")] for x in ("--set", s)]
    args = ["train", "--model", str(index_dir), "--data", str(data), "--output", str(output), *sets,
            *[e for e in extra if e.startswith("--")]]
    if via_cli:
        cmd = [sys.executable, "-m", "chatlora", *args, "--nproc", str(nproc)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "chatlora", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, "\n".join(l for l in done.stderr.splitlines() if "rror" in l)[:3000]
    return done


def losses(run):
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(run):
    return load_file(str(run / "final" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path, index_dir, data):
    cfg = load_config(overrides=SETTINGS + ["lora.dropout=0"],
                      flags={"model.path": str(index_dir), "data.path": str(data)})
    train(cfg, tmp_path / "one")
    launch(2, index_dir, data, tmp_path / "two", "lora.dropout=0", via_cli=True)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 4
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert sum("held_out_loss" in r for r in rows) == 2   # rank 0 alone logs: no duplicated rows
    assert len([r for r in rows if "loss" in r]) == 4


@pytest.mark.slow
def test_two_process_resume_is_exact(tmp_path, index_dir, data):
    """Dropout 0.1: each rank's RNG state must come back from the checkpoint for the same masks
    (constant learning rate: stopping after 2 of 4 steps then resuming keeps the same schedule)."""
    same = ("train.save_every=2", "train.schedule=constant")
    launch(2, index_dir, data, tmp_path / "straight", *same)
    launch(2, index_dir, data, tmp_path / "halves", *same, "train.max_steps=2")
    launch(2, index_dir, data, tmp_path / "halves", *same, "--resume")
    assert losses(tmp_path / "halves") == losses(tmp_path / "straight")
    a, b = adapter(tmp_path / "straight"), adapter(tmp_path / "halves")
    assert all(torch.equal(a[k], b[k]) for k in a)


def _agreement_worker(rank, port, out_dir):
    import torch.distributed as dist

    from chatlora.errors import UserError
    from chatlora.train.distributed import Ranks, check_agreement

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        check_agreement({"configuration": "same", "data": f"examples seen by rank {rank}"}, Ranks(rank, 2))
        message = "no error"
    except UserError as e:
        message = str(e)
    (out_dir / f"rank{rank}.txt").write_text(message)
    dist.destroy_process_group()


def test_ranks_with_different_data_stop_naming_it(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_agreement_worker, args=(port, tmp_path), nprocs=2, start_method="spawn")
    for rank in (0, 1):
        text = (tmp_path / f"rank{rank}.txt").read_text()
        assert "data differs between rank 0 and rank(s) [1]" in text and "configuration differs" not in text


@pytest.mark.slow
def test_resume_with_another_process_count_is_refused(tmp_path, index_dir, data):
    from chatlora.errors import UserError

    launch(2, index_dir, data, tmp_path / "run", "train.save_every=2", "train.max_steps=2")
    cfg = load_config(overrides=SETTINGS, flags={"model.path": str(index_dir), "data.path": str(data)})
    with pytest.raises(UserError, match="same number"):
        train(cfg, tmp_path / "run", resume=True)


@pytest.mark.slow
def test_sharded_mode_trains_like_one_process_and_resumes(tmp_path, index_dir, data):
    """FSDP2 (train.distributed=shard): same losses and adapter as one process, the adapter in the
    usual PEFT format, and a sharded run's checkpoint resumes exactly (dropout off: the comparison
    with one process needs the same function; the resume half uses the same seeds either way)."""
    cfg = load_config(overrides=SETTINGS + ["lora.dropout=0", "train.schedule=constant"],
                      flags={"model.path": str(index_dir), "data.path": str(data)})
    train(cfg, tmp_path / "one")
    same = ("train.distributed=shard", "lora.dropout=0", "train.schedule=constant", "train.save_every=2")
    launch(2, index_dir, data, tmp_path / "sharded", *same)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "sharded")
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-6 and len(two) == 4, (one, two)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "sharded")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    launch(2, index_dir, data, tmp_path / "halves", *same, "train.max_steps=2")
    launch(2, index_dir, data, tmp_path / "halves", *same, "--resume")
    assert losses(tmp_path / "halves") == two


@pytest.mark.slow
def test_two_nodes_through_the_rendezvous_train_like_one(tmp_path, index_dir, data):
    """The README's multi-node launch, as two "nodes" on this machine: two torchrun agents, one
    process each, meeting at a c10d rendezvous endpoint. Same losses and adapter as one process."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sets = [x for s in SETTINGS + ["lora.dropout=0"] for x in ("--set", s)]
    cfg = load_config(overrides=SETTINGS + ["lora.dropout=0"],
                      flags={"model.path": str(index_dir), "data.path": str(data)})
    train(cfg, tmp_path / "one")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(r),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-id", "chatlora-test",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "-m", "chatlora", "train", "--model",
                               str(index_dir), "--data", str(data), "--output", str(tmp_path / "nodes"), *sets],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, "\n".join(l for l in err.splitlines() if "rror" in l)[:3000]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "nodes")
    assert len(two) == 4 and max(abs(a - b) for a, b in zip(one, two)) <= 1e-6, (one, two)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "nodes")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
