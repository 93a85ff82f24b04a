"""`chatlora eval`: did the persona take? A base-vs-tuned evaluation report.

    chatlora eval runs/huanhuan                       # the run's held-out split -> runs/huanhuan/eval/

`eval` reports, for the base model and the tuned one: held-out loss and perplexity (the training
loss definition), BLEU-4 (sacrebleu) and ROUGE-1/2/L F1 (rouge-score), both on characters for
Chinese and on words otherwise, and the share of replies that ended with a stop token rather than
at the length limit. Replies are greedy, so the numbers repeat. The report is written as
`eval/report.json`, `report.md` and `report.html` with side-by-side samples.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path

from chatlora.atomic import write_text
from chatlora.data.dataset import DataSpec, build_dataset, data_source
from chatlora.decode.engine import Sampling
from chatlora.errors import UserError
from chatlora.models.tokenizer import tokenizer_fingerprint
from chatlora.predict import predict, samples_from
from chatlora.rundir import load_base_model, load_run, load_tuned_model
from chatlora.train.steps import held_out_loss

CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]")


def metric_tokens(text: str) -> list[str]:
    """Characters for Chinese (each CJK character a token), words for everything else."""
    tokens = []
    for word in text.split():
        tokens += [t for t in re.split(f"({CJK.pattern})", word) if t]
    return tokens


class _Tokenizer:  # rouge-score's tokenizer protocol
    def tokenize(self, text: str) -> list[str]:
        return metric_tokens(text)


def text_metrics(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU-4 (sacrebleu) and mean ROUGE-1/2/L F1 (rouge-score), 0-100, on metric_tokens."""
    import sacrebleu
    from rouge_score import rouge_scorer

    join = lambda texts: [" ".join(metric_tokens(t)) for t in texts]  # noqa: E731
    bleu = sacrebleu.corpus_bleu(join(predictions), [join(references)], tokenize="none").score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Tokenizer())
    scores = [scorer.score(r, p) for p, r in zip(predictions, references)]
    mean = lambda key: 100 * sum(s[key].fmeasure for s in scores) / max(1, len(scores))  # noqa: E731
    return {"bleu4": bleu, "rouge1": mean("rouge1"), "rouge2": mean("rouge2"), "rougeL": mean("rougeL")}


def evaluate_run(run_path: str, data: str | None = None, limit: int | None = None, output: str | None = None,
                 overwrite: bool = False) -> dict:
    """Base vs tuned on the run's held-out split (or `data`); writes report.{json,md,html} into
    `output` (default RUN/eval), refusing to replace an earlier report unless `overwrite`."""
    run = load_run(run_path)
    out = Path(output) if output else run.dir / "eval"
    earlier = [p.name for p in (out.glob("report.*") if out.is_dir() else [])]
    if earlier and not overwrite:   # refused before the work, not after
        raise UserError(f"{out} already holds a report ({', '.join(sorted(earlier))}); pass --overwrite to "
                        f"replace it, or --output DIR for another place")
    cfg = run.cfg
    # The run's own data rules, so that its held-out split is exactly the one training left out.
    spec = DataSpec.of(cfg, data)
    ds = build_dataset(spec, run.tok, run.fmt, tokenizer_fingerprint(run.dir / "tokenizer"))
    examples = (ds.train if data else ds.held_out)[:limit]
    if not examples:
        raise UserError("nothing to evaluate: the run has no held-out split; pass --data")
    samples = samples_from(run, data, {e.line for e in examples})
    sampling = Sampling.from_config(cfg.generate, temperature=0)
    models = {"base": load_base_model(run), "tuned": load_tuned_model(run)}
    report = {"run": str(run.dir), "adapter": str(run.adapter), "examples": len(examples),
              "loss_curve": os.path.relpath(run.dir / "loss_curve.png", out.resolve() if out.exists() else out),
              "data": data_source(spec.path), "max_new_tokens": sampling.max_new_tokens, "models": {},
              "samples": [{"prompt": s.messages[-1]["content"], "reference": s.reference} for s in samples]}
    for name, model in models.items():
        loss = held_out_loss(model, examples, cfg.train.micro_batch_examples, model.device,
                             cfg.train.micro_batch_tokens)
        preds = predict(model, run, samples, sampling, f"{name} replies")
        report["models"][name] = {"loss": loss, "perplexity": math.exp(loss),
                                  **text_metrics([p.text for p in preds], [s.reference for s in samples]),
                                  "stop_share": sum(p.finish_reason == "stop" for p in preds) / len(preds)}
        for row, p in zip(report["samples"], preds):
            row[name] = p.text
    write_report(out, report)
    report["report_dir"] = str(out)
    if cfg.train.report_to:   # into the tracker runs that training opened, at its last step
        from chatlora.rundir import read_metrics
        from chatlora.tracking import report_eval

        rows = read_metrics(run.dir / "metrics.jsonl") if (run.dir / "metrics.jsonl").is_file() else []
        step = max((r["step"] for r in rows), default=0)
        report["trackers"] = report_eval(run.dir, cfg.train.report_to, run.name, cfg.to_dict(), step, report)
    return report


def write_report(out: Path, report: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False), overwrite=True)
    write_text(out / "report.md", report_markdown(report), overwrite=True)
    write_text(out / "report.html", report_html(report), overwrite=True)


METRICS = [("loss", "held-out loss", "{:.4f}"), ("perplexity", "perplexity", "{:.2f}"), ("bleu4", "BLEU-4", "{:.2f}"),
           ("rouge1", "ROUGE-1", "{:.2f}"), ("rouge2", "ROUGE-2", "{:.2f}"), ("rougeL", "ROUGE-L", "{:.2f}"),
           ("stop_share", "replies ended by a stop token", "{:.0%}")]


def _rows(report: dict) -> list[tuple[str, str, str]]:
    m = report["models"]
    return [(label, fmt.format(m["base"][key]), fmt.format(m["tuned"][key])) for key, label, fmt in METRICS]


def report_table(report: dict) -> str:
    """The figures that matter, for the terminal."""
    rows = [("", "base", "tuned")] + _rows(report)
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>8}  {c:>8}" for a, b, c in rows]
    return f"{report['examples']} examples, greedy replies of at most {report['max_new_tokens']} tokens\n" + \
        "\n".join(lines)


def report_markdown(report: dict) -> str:
    lines = [f"# Evaluation of {report['run']}", "",
             f"{report['examples']} held-out examples from `{report['data']}`; greedy replies of at most "
             f"{report['max_new_tokens']} tokens. BLEU-4 (sacrebleu) and ROUGE F1 (rouge-score) on characters "
             f"for Chinese, words otherwise.", "", f"![loss curve]({report.get('loss_curve', '../loss_curve.png')})", "",
             "| metric | base | tuned |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(report)]
    lines += ["", "## Samples", ""]
    for s in report["samples"][:20]:
        lines += [f"- **prompt** {s['prompt']}", f"  - reference: {s['reference']}", f"  - base: {s['base']}",
                  f"  - tuned: {s['tuned']}"]
    return "\n".join(lines) + "\n"


def report_html(report: dict) -> str:
    e = html.escape
    table = "".join(f"<tr><td>{e(a)}</td><td>{e(b)}</td><td>{e(c)}</td></tr>" for a, b, c in _rows(report))
    samples = "".join(f"<tr><td>{e(s['prompt'])}</td><td>{e(s['reference'])}</td><td>{e(s['base'])}</td>"
                      f"<td>{e(s['tuned'])}</td></tr>" for s in report["samples"][:50])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>chatlora eval</title>
<style>body{{font:15px/1.5 system-ui,"Noto Sans CJK SC",sans-serif;margin:24px;max-width:1100px}}
table{{border-collapse:collapse;margin:12px 0}}td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}
img{{max-width:700px}}</style></head><body><h1>Evaluation of {e(report['run'])}</h1>
<p>{report['examples']} examples from {e(report['data'])}; greedy replies of at most {report['max_new_tokens']} tokens.
BLEU-4 (sacrebleu) and ROUGE F1 (rouge-score) on characters for Chinese, words otherwise.</p>
<img src="{e(report.get('loss_curve', '../loss_curve.png'))}" alt="loss curve"><table><tr><th>metric</th><th>base</th><th>tuned</th></tr>{table}</table>
<h2>Samples</h2><table><tr><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>{samples}</table>
</body></html>
"""
