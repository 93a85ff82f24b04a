"""A shortened `chatlora demo`: real learning on SmolLM2, offline on CPU."""

import json

import pytest

from chatlora.demo import run_demo


@pytest.mark.slow
def test_short_demo_held_out_loss_falls(tmp_path, smollm2_base, capsys):
    report = run_demo(tmp_path / "demo", steps=4, samples=1)
    assert report["held_out_loss_after"] < report["held_out_loss_before"] - 0.1
    assert (tmp_path / "demo" / "run" / "loss_curve.png").stat().st_size > 1000
    assert json.loads((tmp_path / "demo" / "demo_report.json").read_text()) == report
    sample = report["samples"][0]
    assert sample["prompt"] and isinstance(sample["base"], str) and isinstance(sample["tuned"], str)
    out = capsys.readouterr().out
    assert "held-out loss   before" in out and "chatlora chat" in out


def test_demo_overwrite_replaces_only_an_earlier_demo(tmp_path):
    from chatlora.errors import UserError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="holds thesis.tex; nothing was deleted"):
        run_demo(mine, steps=1, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "years of work"
