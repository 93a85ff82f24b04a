"""Config: the self-llm recipe as defaults, YAML + overrides, every problem reported at once."""

import pytest

from chatlora.config import HUANHUAN_SYSTEM_PROMPT, Config, config_from_dict, field_docs, load_config, system_prompt_for
from chatlora.errors import UserError


def test_defaults_are_the_seed_recipe():
    cfg = load_config()
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 32.0, 0.1)
    assert cfg.lora.targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.data.max_seq_tokens, cfg.data.on_overlength) == (384, "truncate")
    assert cfg.train.examples_per_step == 16  # the self-llm recipe's 4 x 4; how many passes is a speed choice
    assert (cfg.train.micro_batch_examples, cfg.train.micro_batch_tokens) == (16, 2048)
    assert (cfg.train.epochs, cfg.train.learning_rate, cfg.train.schedule) == (3.0, 1e-4, "linear")
    assert (cfg.train.warmup_ratio, cfg.train.weight_decay) == (0.0, 0.0)
    assert system_prompt_for(cfg) == HUANHUAN_SYSTEM_PROMPT == "现在你要扮演皇帝身边的女人--甄嬛"
    g = cfg.generate
    assert (g.top_k, g.top_p, g.temperature, g.repetition_penalty) == (5, 0.8, 0.3, 1.1)


def test_own_data_gets_no_huanhuan_prompt_unless_asked():
    assert system_prompt_for(load_config(flags={"data.path": "mine.jsonl"})) is None
    cfg = load_config(flags={"data.path": "mine.jsonl", "data.system_prompt": "You are X."})
    assert system_prompt_for(cfg) == "You are X."


def test_yaml_then_overrides_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: 16\n  targets: [q_proj, v_proj]\ntrain:\n  epochs: 1\n")
    cfg = load_config(path, ["train.epochs=2", "lora.targets=q_proj,k_proj"], {"lora.r": 4, "train.seed": None})
    assert (cfg.lora.r, cfg.train.epochs, cfg.lora.targets) == (4, 2.0, ["q_proj", "k_proj"])
    assert cfg.train.seed == 42


def test_every_problem_is_reported_at_once(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: zero\n  colour: red\ntrian:\n  epochs: 1\ntrain:\n  micro_batch_tokens: 100\n")
    with pytest.raises(UserError) as e:
        load_config(path, ["data.on_overlength=cut", "lora.dropout=1.5"])
    msg = str(e.value)
    for part in ("lora.r must be an integer, got 'zero'", "unknown field 'lora.colour'", "unknown group 'trian'",
                 "data.on_overlength must be one of truncate, drop, error", "lora.dropout must be in [0, 1)",
                 "train.micro_batch_tokens must be >= data.max_seq_tokens"):
        assert part in msg


def test_yaml_syntax_error_names_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora:\n  r: [1,\n")
    with pytest.raises(UserError, match=rf"{path}:3"):
        load_config(path)


def test_round_trip_and_docs():
    cfg = load_config(overrides=["lora.r=4"])
    assert config_from_dict(cfg.to_dict()) == cfg
    docs = field_docs()
    assert set(docs) == {f"{g}.{f}" for g, fields in Config().to_dict().items() for f in fields}
    assert all(doc for doc, _ in docs.values())


def test_presets_apply_before_the_users_file(tmp_path):
    cfg = load_config(preset="lowmem")
    assert cfg.train.gradient_checkpointing and cfg.train.micro_batch_tokens == 1024
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  micro_batch_tokens: 512\n")
    assert load_config(path, preset="lowmem").train.micro_batch_tokens == 512
    with pytest.raises(UserError, match="unknown preset 'tiny' \\(presets: lowmem\\)"):
        load_config(preset="tiny")
