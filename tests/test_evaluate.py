"""generate and eval: metrics against hand-computed cases, report files, consistency with training."""

import json

import pytest

from chatlora.errors import UserError
from chatlora.evaluate import evaluate_run, metric_tokens, text_metrics
from chatlora.predict import generate_predictions


def test_metric_tokens_are_characters_for_chinese_words_otherwise():
    assert metric_tokens("臣妾 甄嬛, hello world") == ["臣", "妾", "甄", "嬛", ",", "hello", "world"]
    assert metric_tokens("皇上万福金安。") == list("皇上万福金安。")


def test_metrics_hand_computed():
    assert text_metrics(["皇上万福金安"], ["皇上万福金安"]) == pytest.approx(
        {"bleu4": 100.0, "rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    # 甲乙 vs 甲丙: one of two characters shared (P = R = 1/2), no shared bigram, LCS 1.
    m = text_metrics(["甲乙"], ["甲丙"])
    assert (m["rouge1"], m["rouge2"], m["rougeL"]) == pytest.approx((50.0, 0.0, 50.0))
    assert text_metrics(["ab"], ["ac"])["rouge1"] == 0.0  # Latin text counts words, not letters
    # BLEU-4 of 4 tokens, 3 right: p1=3/4, p2=2/3, p3=1/2, p4=0/1, which sacrebleu's default "exp"
    # smoothing replaces by 1/(2^1 * 1) = 1/2.
    four = text_metrics(["一二三X"], ["一二三四"])["bleu4"]
    assert four == pytest.approx(100 * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25, abs=1e-6)
    five = text_metrics(["一二三四X"], ["一二三四五"])["bleu4"]  # p = 4/5, 3/4, 2/3, 1/2; no brevity penalty
    assert five == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25, abs=1e-6)


def test_generate_writes_prediction_lines(tiny_run, tmp_path, huanhuan_rows):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:5]))
    out = generate_predictions(str(tiny_run), str(data), str(tmp_path / "p.jsonl"), temperature=0,
                               max_new_tokens=6)
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["reference"] == huanhuan_rows[0]["output"]
    assert rows[0]["messages"][-1] == {"role": "user", "content": huanhuan_rows[0]["instruction"]}
    assert all(isinstance(r["prediction"], str) and r["finish_reason"] in ("stop", "length") for r in rows)
    with pytest.raises(UserError, match="already exists"):
        generate_predictions(str(tiny_run), str(data), str(out))


def test_eval_report_base_vs_tuned(tiny_run):
    report = evaluate_run(str(tiny_run))
    base, tuned = report["models"]["base"], report["models"]["tuned"]
    # The tuned model's held-out loss is the one training logged at its end (the same split and loss).
    metrics = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    logged = [m["held_out_loss"] for m in metrics if m.get("held_out_loss") is not None]
    assert tuned["loss"] == pytest.approx(logged[-1], rel=1e-6) and base["loss"] == pytest.approx(logged[0], rel=1e-6)
    for key in ("bleu4", "rouge1", "rougeL", "stop_share", "perplexity"):
        assert key in base and key in tuned
    md = (tiny_run / "eval" / "report.md").read_text()
    assert f"| held-out loss | {base['loss']:.4f} | {tuned['loss']:.4f} |" in md
    page = (tiny_run / "eval" / "report.html").read_text()
    assert "ROUGE-L" in page and "../loss_curve.png" in page
    assert len(report["samples"]) == report["examples"] and "tuned" in report["samples"][0]


def test_stop_share_exposes_the_tutorials_end_of_reply_defect(index_dir, huanhuan_rows, tmp_path):
    """Trained with `index`, the model learns to end replies with </s>; trained with the tutorial's
    `self-llm` tokens (<unk> after each reply, inference stopping on </s> only), it never stops."""
    from chatlora.config import load_config
    from chatlora.train.loop import train

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in huanhuan_rows[:48]))
    shares = {}
    for template in ("index", "self-llm"):
        cfg = load_config(overrides=["train.max_steps=40", "train.learning_rate=0.01", "train.eval_every=0",
                                     "data.held_out_fraction=0.25", "generate.max_new_tokens=40",
                                     f"model.template={template}"],
                          flags={"model.path": str(index_dir), "data.path": str(data), "data.system_prompt": "S"})
        train(cfg, tmp_path / template)
        shares[template] = evaluate_run(str(tmp_path / template))["models"]["tuned"]["stop_share"]
    assert shares["index"] >= 0.75 and shares["self-llm"] == 0.0, shares


def test_eval_refuses_to_replace_its_report_and_prints_only_the_figures(tiny_run, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "report"
    args = [sys.executable, "-m", "chatlora", "eval", str(tiny_run), "--limit", "1", "--output", str(out)]
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert "held-out loss" in first.stdout and "![" not in first.stdout and "## Samples" not in first.stdout
    assert f"report: {out}/report.html" in first.stdout
    again = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already holds a report" in again.stderr and "--overwrite" in again.stderr
    assert subprocess.run(args + ["--overwrite"], capture_output=True, text=True, timeout=300).returncode == 0
    assert "loss_curve.png" in (out / "report.md").read_text()
