"""The `chatlora` command: each verb calls one library function. No logic lives here.

    chatlora demo [--output DIR]                                    the whole pipeline offline
    chatlora data check [DATA] [--model M] [--template T] [--system S] [--max-seq-tokens N] [--dump PATH]
    chatlora train [--config C] [--model M] [--data D] --output RUN [--resume | --overwrite] [...]
    chatlora chat RUN [--prompt TEXT] [--temperature T]
    chatlora merge RUN --output DIR
    chatlora serve RUN [--host H] [--port P] [--api-key-file F]
    chatlora export RUN --format gguf|ollama [--quant q8_0] [--output PATH]
    chatlora generate RUN --data D [--output preds.jsonl]
    chatlora eval RUN [--data D]
    chatlora download MODEL_ID [--source huggingface|modelscope]
    chatlora config [CONFIG.yaml] [--set group.field=value ...]     print the resolved config with docs

A user mistake (bad file, flag or path) prints one paragraph and exits with status 2, no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from chatlora import __version__
from chatlora.errors import UserError


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="a config file (groups model, lora, data, train, ...)")
    p.add_argument("--preset", help="a named preset applied before --config (lowmem: for 8 GB GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override any config field, e.g. --set data.max_seq_tokens=512 (repeatable)")
    p.add_argument("--model", help="base model: local dir, .gguf file, cached hub id, or smollm2-demo")
    p.add_argument("--template", choices=["auto", "index", "self-llm"], help="chat format")
    p.add_argument("--system", help="system prompt for rows without one")
    p.add_argument("--max-seq-tokens", type=int, help="longest example in tokens")
    p.add_argument("--on-overlength", choices=["truncate", "drop", "error"])
    p.add_argument("--on-error", choices=["stop", "skip"], help="stop at bad rows (default) or skip them")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; each defaults to the run's own generate settings."""
    p.add_argument("--temperature", type=float, help="0 = greedy (default: the run's generate.temperature)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--seed", type=int, help="sampling seed (default: random)")


def _sampling(args) -> dict:
    """The sampling flags given, checked by the rules the server and the config use."""
    from chatlora.config import sampling_problems

    given = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "repetition_penalty",
                                           "max_new_tokens", "seed")}
    problems = [f"--{name.replace('_', '-')} {problem}" for name, problem in sampling_problems(given)]
    if problems:
        raise UserError("; ".join(problems))
    return given


def _load(args, data: str | None = None, base=None):
    from chatlora.config import load_config

    flags = {"model.path": args.model, "model.template": args.template, "data.system_prompt": args.system,
             "data.max_seq_tokens": args.max_seq_tokens, "data.on_overlength": args.on_overlength,
             "data.on_error": args.on_error, "data.path": data}
    for key in ("epochs", "max_steps", "learning_rate", "examples_per_step", "micro_batch_examples",
                "save_every", "keep_last", "eval_every", "seed"):
        if hasattr(args, key):
            flags[f"train.{key}"] = getattr(args, key)
    return load_config(args.config, args.overrides, flags, base=base, preset=args.preset)


def cmd_data_check(args) -> int:
    from chatlora.atomic import write_text
    from chatlora.dataset import dataset_for_config, dump_examples, format_report

    cfg = _load(args, args.data)
    if args.dump:  # refuse before the work, not after
        from chatlora.atomic import refuse_existing
        refuse_existing(Path(args.dump))
    _, _, _, ds = dataset_for_config(cfg, Path(args.rejects) if args.rejects else None)
    print(format_report(ds.report))
    if ds.report.get("rejects_file"):
        print(f"rejected rows   written to {ds.report['rejects_file']}")
    if args.json:
        write_text(Path(args.json), json.dumps(ds.report, ensure_ascii=False, indent=2))
    if args.dump:
        dump_examples(Path(args.dump), ds.train + ds.held_out)
        print(f"dumped          {len(ds.train) + len(ds.held_out)} examples to {args.dump}")
    return 0


def cmd_train(args) -> int:
    from chatlora.rundir import read_config
    from chatlora.train import Interrupted, train

    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args.nproc)
    saved = read_config(Path(args.output)) if args.resume else None
    cfg = _load(args, args.data, base=saved)
    try:
        final = train(cfg, args.output, resume=args.resume, overwrite=args.overwrite)
    except Interrupted as e:
        print(f"chatlora: {e}", file=sys.stderr)
        return e.code
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"adapter: {final}\nloss curve: {Path(args.output) / 'loss_curve.png'}\n"
          f"chat with it: chatlora chat {args.output}")
    return 0


def _launch(nproc: int) -> int:
    """`chatlora train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m chatlora train ...`."""
    import subprocess

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "chatlora", *argv]
    return subprocess.call(cmd)


def cmd_chat(args) -> int:
    from chatlora.chat import chat

    return chat(args.run, prompt=args.prompt, **_sampling(args))


def cmd_merge(args) -> int:
    from chatlora.export import merge_run

    print(f"merged model written to {merge_run(args.run, args.output)}")
    return 0


def cmd_demo(args) -> int:
    from chatlora.demo import run_demo

    run_demo(args.output, steps=args.steps, overwrite=args.overwrite)
    return 0


def cmd_serve(args) -> int:
    from chatlora.httpguard import resolve_api_key
    from chatlora.serve import Limits, serve

    key = resolve_api_key(args.api_key, args.api_key_file)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_tokens_cap=args.max_tokens_cap,
                    queue_size=args.queue_size, deadline_s=args.deadline, max_connections=args.max_connections,
                    grace_s=args.grace)
    return serve(args.run, args.host, args.port, key, limits, args.name)


def cmd_export(args) -> int:
    from chatlora.export import export_gguf, export_ollama

    if args.format == "gguf":
        out = export_gguf(args.run, args.output or f"{Path(args.run).name}-{args.quant}.gguf", args.quant)
        print(f"GGUF written to {out}")
    else:
        out = export_ollama(args.run, args.output or f"{Path(args.run).name}-ollama", args.quant)
        print(f"Ollama model in {out}; create it with:\n    cd {out} && ollama create {Path(args.run).name} -f Modelfile")
    return 0


def cmd_generate(args) -> int:
    from chatlora.evaluate import generate_predictions

    out = generate_predictions(args.run, args.data, args.output, args.limit, **_sampling(args))
    print(f"predictions written to {out}")
    return 0


def cmd_eval(args) -> int:
    from chatlora.evaluate import evaluate_run, report_markdown

    report = evaluate_run(args.run, args.data, args.limit)
    print(report_markdown(dict(report, samples=report["samples"][:3])))
    print(f"report: {Path(report['run']) / 'eval' / 'report.html'}")
    return 0


def cmd_download(args) -> int:
    from chatlora.hub import download

    path = download(args.model_id, args.source, args.revision)
    print(f"downloaded {args.model_id} to {path}")
    return 0


def cmd_config(args) -> int:
    from chatlora.config import field_docs

    cfg = _load(args)
    docs = field_docs()
    for group, fields in cfg.to_dict().items():
        print(f"{group}:")
        for name, value in fields.items():
            print(f"  {name}: {json.dumps(value, ensure_ascii=False)}    # {docs[f'{group}.{name}'][0]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatlora", description="LoRA fine-tuning of chat LLMs, fast "
                                     "and correct: data check, train, chat, serve, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"chatlora {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    data = verbs.add_parser("data", help="dataset tools").add_subparsers(dest="data_verb", required=True)
    check = data.add_parser("check", help="validate a dataset and print statistics (lengths, truncation, "
                                          "duplicates)")
    check.add_argument("data", nargs="?", help="JSON/JSONL file; default: the bundled huanhuan dataset")
    _config_args(check)
    check.add_argument("--dump", metavar="PATH", help="write every kept example as JSONL "
                                                       "{input_ids, labels} (-100 = not supervised)")
    check.add_argument("--json", metavar="PATH", help="write the report as JSON")
    check.add_argument("--rejects", metavar="PATH", help="with --on-error skip: where the bad rows go "
                                                          "(default: DATA-NAME.rejected.jsonl here)")
    check.set_defaults(func=cmd_data_check)

    tr = verbs.add_parser("train", help="train a LoRA adapter into a run directory")
    _config_args(tr)
    tr.add_argument("--data", help="training data (default: the bundled huanhuan dataset)")
    tr.add_argument("--output", required=True, metavar="RUN", help="run directory to create (or resume)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    tr.add_argument("--epochs", type=float)
    tr.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    tr.add_argument("--learning-rate", type=float)
    tr.add_argument("--examples-per-step", type=int, help="examples per optimizer step")
    tr.add_argument("--micro-batch-examples", type=int, help="examples per forward/backward pass")
    tr.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps")
    tr.add_argument("--keep-last", type=int, help="keep only the newest K checkpoints")
    tr.add_argument("--eval-every", type=int, help="held-out loss every N optimizer steps")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--nproc", type=int, help="train with N processes on this machine (one per GPU; CPU: gloo), "
                    "launched through torchrun; for several machines run torchrun yourself (README)")
    tr.set_defaults(func=cmd_train)

    ch = verbs.add_parser("chat", help="chat with a run's model in the terminal (streaming, multi-turn)")
    ch.add_argument("run", help="run directory (or a checkpoint inside one)")
    ch.add_argument("--prompt", help="answer this once, print only the reply, and exit")
    _sampling_args(ch)
    ch.set_defaults(func=cmd_chat)

    mg = verbs.add_parser("merge", help="merge a run's adapter into its base: a standard HF model directory")
    mg.add_argument("run", help="run directory (or a checkpoint inside one)")
    mg.add_argument("--output", required=True, help="directory to create (never overwritten)")
    mg.set_defaults(func=cmd_merge)

    dm = verbs.add_parser("demo", help="the whole pipeline offline on CPU with a small real model (minutes)")
    dm.add_argument("--output", default="chatlora-demo", help="where everything goes (default ./chatlora-demo)")
    dm.add_argument("--steps", type=int, default=24, help="optimizer steps (8 examples each)")
    dm.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    dm.set_defaults(func=cmd_demo)

    sv = verbs.add_parser("serve", help="OpenAI-compatible API, the tutorial's endpoint and a web chat page")
    sv.add_argument("run", help="run directory (or a checkpoint inside one)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (non-loopback needs an API key)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--api-key", help="require this key (visible in the process list: prefer the file or "
                                      "CHATLORA_API_KEY)")
    sv.add_argument("--api-key-file", help="read the required key from this file")
    sv.add_argument("--max-tokens-cap", type=int, default=2048, help="largest max_tokens a request may ask")
    sv.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond this get 429")
    sv.add_argument("--max-body-bytes", type=int, default=1_000_000, help="larger request bodies get 413")
    sv.add_argument("--deadline", type=float, default=300.0, help="seconds a request may take in all")
    sv.add_argument("--max-connections", type=int, default=1000, help="open connections; more are closed at once")
    sv.add_argument("--grace", type=float, default=10.0, help="on SIGTERM, seconds running replies may take to "
                                                            "finish before they are ended (finish_reason shutdown)")
    sv.add_argument("--name", help="the model id clients see (default: the run's name)")
    sv.set_defaults(func=cmd_serve)

    ex = verbs.add_parser("export", help="the merged model as GGUF (llama.cpp) or an Ollama model directory")
    ex.add_argument("run", help="run directory (or a checkpoint inside one)")
    ex.add_argument("--format", choices=["gguf", "ollama"], default="gguf")
    ex.add_argument("--quant", choices=["f16", "bf16", "q8_0"], default="q8_0", help="weight type in the GGUF")
    ex.add_argument("--output", help="file (gguf) or directory (ollama) to create; never overwritten")
    ex.set_defaults(func=cmd_export)

    gn = verbs.add_parser("generate", help="batched predictions of a run's model for every prompt of a dataset")
    gn.add_argument("run", help="run directory (or a checkpoint inside one)")
    gn.add_argument("--data", required=True, help="JSON/JSONL dataset; each row's last reply is the reference")
    gn.add_argument("--output", default="predictions.jsonl", help="JSONL to create (never overwritten)")
    gn.add_argument("--limit", type=int, help="only the first N rows")
    _sampling_args(gn)
    gn.set_defaults(func=cmd_generate)

    ev = verbs.add_parser("eval", help="base vs tuned: loss, perplexity, BLEU, ROUGE, stop share; a report")
    ev.add_argument("run", help="run directory (or a checkpoint inside one)")
    ev.add_argument("--data", help="evaluate on this dataset instead of the run's held-out split")
    ev.add_argument("--limit", type=int, help="only the first N examples")
    ev.set_defaults(func=cmd_eval)

    dl = verbs.add_parser("download", help="fetch a model from Hugging Face or ModelScope into the cache")
    dl.add_argument("model_id", help="e.g. IndexTeam/Index-1.9B-Chat")
    dl.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface")
    dl.add_argument("--revision", help="branch, tag or commit")
    dl.set_defaults(func=cmd_download)

    cfg = verbs.add_parser("config", help="print the resolved configuration with a line of doc per field")
    _config_args(cfg)
    cfg.set_defaults(func=cmd_config)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"chatlora: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    # peft calls a transformers property that 5.x deprecates; nothing for the user to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    try:
        return args.func(args)
    except UserError as e:
        print(f"chatlora: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("chatlora: interrupted", file=sys.stderr)
        return 130
