"""The `chatlora` command: each verb calls one library function. No logic lives here.

    chatlora demo [--output DIR]                                    the whole pipeline offline
    chatlora data check [DATA] [--model M] [--template T] [--system S] [--max-seq-tokens N] [--dump PATH]
    chatlora train [--config C] [--model M] [--data D] --output RUN [--resume | --overwrite] [...]
    chatlora chat RUN [--prompt TEXT] [--temperature T]
    chatlora merge RUN --output DIR
    chatlora serve RUN [--host H] [--port P] [--api-key-file F]
    chatlora studio [--runs-dir DIR] [--host H] [--port P] [--api-key-file F]   the pipeline in the browser
    chatlora export RUN --format gguf|ollama [--quant q8_0] [--output PATH]
    chatlora generate RUN --data D [--output preds.jsonl]
    chatlora eval RUN [--data D]
    chatlora download ID [--source huggingface|modelscope] [--dataset]
    chatlora config [CONFIG.yaml] [--set group.field=value ...]     print the resolved config with docs
    chatlora cache [clean [--all]]                                  what the cache holds; clean it

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

# Flags that set a config field, with the field they set; their help is the field's own line of
# documentation and default (config.py), so it is written once.
CONFIG_FLAGS = {"--model": "model.path", "--template": "model.template", "--system": "data.system_prompt",
                "--max-seq-tokens": "data.max_seq_tokens", "--on-overlength": "data.on_overlength",
                "--on-error": "data.on_error"}
TRAIN_FLAGS = {"--epochs": "train.epochs", "--max-steps": "train.max_steps", "--learning-rate": "train.learning_rate",
               "--examples-per-step": "train.examples_per_step", "--micro-batch-examples": "train.micro_batch_examples",
               "--save-every": "train.save_every", "--keep-last": "train.keep_last", "--eval-every": "train.eval_every",
               "--seed": "train.seed", "--lora-r": "lora.r", "--lora-alpha": "lora.alpha",
               "--lora-dropout": "lora.dropout", "--report-to": "train.report_to", "--quantize": "model.quantize"}
SERVE_FLAGS = {"--host": "serve.host", "--port": "serve.port", "--max-tokens-cap": "serve.max_tokens_cap",
               "--queue-size": "serve.queue_size", "--max-batch": "serve.max_batch",
               "--max-body-bytes": "serve.max_body_bytes", "--deadline": "serve.deadline_s",
               "--max-connections": "serve.max_connections", "--grace": "serve.grace_s"}


def _config_flags(p: argparse.ArgumentParser, flags: dict[str, str]) -> None:
    import typing

    from chatlora.config import Config, field_docs

    docs, hints = field_docs(), typing.get_type_hints(Config)
    for flag, key in flags.items():
        group, name = key.split(".")
        kind = typing.get_type_hints(hints[group])[name]
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        convert = {int: int, float: float}.get(kind) or next((t for t in typing.get_args(kind) if t in (int, float)), str)
        text, default = docs[key]
        p.add_argument(flag, type=None if choices else convert, choices=choices,
                       help=f"{text} (default: {default}; config {key})".replace("%", "%%"))


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="a config file (groups model, lora, data, train, ...)")
    p.add_argument("--preset", help="a named preset applied before --config (lowmem: for 8 GB GPUs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="GROUP.FIELD=VALUE",
                   help="override any config field, e.g. --set data.max_seq_tokens=512 (repeatable)")
    _config_flags(p, CONFIG_FLAGS)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    """Sampling flags; each defaults to the run's own generate settings."""
    from chatlora.config import field_docs

    docs = field_docs()
    for name, kind in (("temperature", float), ("top_k", int), ("top_p", float), ("repetition_penalty", float),
                       ("max_new_tokens", int)):
        text, default = docs[f"generate.{name}"]
        p.add_argument(f"--{name.replace('_', '-')}", type=kind,
                       help=f"{text} (default: the run's generate.{name}; chatlora's is {default})")
    p.add_argument("--seed", type=int, help="sampling seed, for a reply that repeats (default: random)")


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

    flags = {key: getattr(args, flag[2:].replace("-", "_"), None) for flag, key in {**CONFIG_FLAGS, **TRAIN_FLAGS}.items()}
    flags["data.path"] = data
    return load_config(args.config, args.overrides, flags, base=base, preset=args.preset)


def cmd_data_check(args) -> int:
    from chatlora.atomic import write_text
    from chatlora.data.dataset import dataset_for_config, dump_examples, format_report

    cfg = _load(args, args.data)
    if args.dump:  # refuse before the work, not after
        from chatlora.atomic import refuse_existing
        refuse_existing(Path(args.dump))
    ds = dataset_for_config(cfg, Path(args.rejects) if args.rejects else None).dataset
    print(format_report(ds.report))
    if ds.report.get("rejects_file"):
        print(f"rejected rows   written to {ds.report['rejects_file']}")
    if args.json:
        write_text(Path(args.json), json.dumps(ds.report, ensure_ascii=False, indent=2))
    if args.dump:
        print(f"dumped          {dump_examples(Path(args.dump), ds)} examples to {args.dump} (in the data's order)")
    return 0


def cmd_train(args) -> int:
    from chatlora.rundir import read_config
    from chatlora.train.loop import Interrupted, train

    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _launch(args.nproc)
    saved = read_config(Path(args.output)) if args.resume else None
    cfg = _load(args, args.data, base=saved)
    try:
        final = train(cfg, args.output, resume=args.resume, overwrite=args.overwrite, name=args.name)
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
    from chatlora.config import load_config
    from chatlora.serve.app import serve
    from chatlora.serve.guard import resolve_api_key

    key = resolve_api_key(args.api_key, args.api_key_file)
    flags = {key_: getattr(args, flag[2:].replace("-", "_")) for flag, key_ in SERVE_FLAGS.items()}
    settings = load_config(args.config, args.overrides, flags).serve
    return serve(args.run, settings, key, args.name)


def cmd_studio(args) -> int:
    from chatlora.serve.guard import resolve_api_key
    from chatlora.studio.app import studio

    return studio(args.runs_dir, args.host, args.port, resolve_api_key(args.api_key, args.api_key_file))


def cmd_export(args) -> int:
    from chatlora.export import export_gguf, export_ollama

    if args.format == "gguf":
        print(f"GGUF written to {export_gguf(args.run, args.output, args.quant)}")
    else:
        out, name = export_ollama(args.run, args.output, args.quant, args.name)
        print(f"Ollama model in {out}; create it with:\n    cd {out} && ollama create {name} -f Modelfile")
    return 0


def cmd_generate(args) -> int:
    from chatlora.predict import generate_predictions

    out = generate_predictions(args.run, args.data, args.output, args.limit, **_sampling(args))
    print(f"predictions written to {out}")
    return 0


def cmd_eval(args) -> int:
    from chatlora.evaluate import evaluate_run, report_table

    report = evaluate_run(args.run, args.data, args.limit, args.output, args.overwrite)
    print(report_table(report))
    print(f"report: {report['report_dir']}/report.html (and .md, .json)")
    if report.get("trackers"):
        print(f"also sent to: {', '.join(report['trackers'])}")
    return 0


def cmd_download(args) -> int:
    from chatlora.models.hub import describe_support, download, download_dataset

    if args.dataset:
        if args.source != "huggingface":
            raise UserError("--dataset downloads from Hugging Face only")
        path = download_dataset(args.model_id, args.revision)
        print(f"downloaded dataset {args.model_id} to {path}\nuse it with: --data hf:{args.model_id} "
              f"(or hf:{args.model_id}:SPLIT; the split defaults to train)")
        return 0
    path = download(args.model_id, args.source, args.revision)
    print(f"downloaded {args.model_id} to {path}")
    print(describe_support(json.loads((path / "config.json").read_text(encoding="utf-8"))))
    return 0


def cmd_cache(args) -> int:
    from chatlora.cache import clean, describe

    if args.action == "clean":
        removed, freed = clean(everything=args.all)
        print(f"removed {removed} cached item(s), {freed / 2 ** 20:,.0f} MiB freed")
    else:
        print(describe())
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
    from chatlora.config import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="chatlora", description="LoRA fine-tuning of chat LLMs, fast "
                                     "and correct: data check, train, chat, serve, evaluate, export.")
    parser.add_argument("--version", action="version", version=f"chatlora {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")

    data = verbs.add_parser("data", help="dataset tools").add_subparsers(dest="data_verb", required=True)
    check = data.add_parser("check", help="validate a dataset and print statistics (lengths, truncation, "
                                          "duplicates)")
    check.add_argument("data", nargs="?", help="JSON/JSONL, CSV/TSV, Parquet or Arrow file, a folder of them, or "
                       "hf:OWNER/NAME[:SPLIT]; default: the bundled huanhuan dataset")
    _config_args(check)
    check.add_argument("--dump", metavar="PATH", help="write every kept example as JSONL, in the data's order: "
                                                       "{source FILE:LINE, split, input_ids, labels (-100 = not supervised)}")
    check.add_argument("--json", metavar="PATH", help="write the report as JSON")
    check.add_argument("--rejects", metavar="PATH", help="with --on-error skip: where the bad rows go "
                                                          "(default: DATA-NAME.rejected.jsonl here)")
    check.set_defaults(func=cmd_data_check)

    tr = verbs.add_parser("train", help="train a LoRA adapter into a run directory")
    _config_args(tr)
    tr.add_argument("--data", help="training data (default: the bundled huanhuan dataset)")
    tr.add_argument("--output", required=True, metavar="RUN", help="run directory to create (or resume)")
    tr.add_argument("--resume", action="store_true", help="continue from the run's latest complete checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace the output directory if it is a chatlora run")
    tr.add_argument("--name", help="what the run is called when served and exported (default: the folder's name)")
    _config_flags(tr, TRAIN_FLAGS)
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
    dm.add_argument("--output", default="chatlora-demo", help="where the run and its report go (default: %(default)s)")
    dm.add_argument("--steps", type=int, default=24, help="optimizer steps of 8 examples (default: %(default)s)")
    dm.add_argument("--overwrite", action="store_true", help="replace an earlier demo's output directory")
    dm.set_defaults(func=cmd_demo)

    sv = verbs.add_parser("serve", help="OpenAI-compatible API, the tutorial's endpoint and a web chat page")
    sv.add_argument("run", help="run directory (or a checkpoint inside one)")
    sv.add_argument("--config", metavar="YAML", help="a config file whose `serve` group sets what the flags set")
    sv.add_argument("--set", dest="overrides", action="append", default=[], metavar="serve.FIELD=VALUE",
                    help="set any serve field, e.g. --set serve.max_messages=64 (repeatable; `chatlora config`)")
    _config_flags(sv, SERVE_FLAGS)
    sv.add_argument("--api-key", help="require this key (visible in the process list: prefer the file or "
                                      "CHATLORA_API_KEY)")
    sv.add_argument("--api-key-file", help="read the required key from this file")
    sv.add_argument("--name", help="the model id clients see (default: the run's name)")
    sv.set_defaults(func=cmd_serve)

    st = verbs.add_parser("studio", help="a local web app: check data, start, watch, stop and resume runs")
    st.add_argument("--runs-dir", default="runs", help="where the runs live (default: %(default)s)")
    st.add_argument("--host", default="127.0.0.1", help="address to bind; a non-loopback one needs an API key "
                                                        "(default: %(default)s)")
    st.add_argument("--port", type=int, default=7860, help="(default: %(default)s)")
    st.add_argument("--api-key", help="require this key (visible in the process list: prefer the file or "
                                      "CHATLORA_API_KEY)")
    st.add_argument("--api-key-file", help="read the required key from this file")
    st.set_defaults(func=cmd_studio)

    ex = verbs.add_parser("export", help="the merged model as GGUF (llama.cpp) or an Ollama model directory")
    ex.add_argument("run", help="run directory (or a checkpoint inside one)")
    ex.add_argument("--format", choices=["gguf", "ollama"], default="gguf",
                    help="gguf: one llama.cpp file; ollama: the GGUF and a Modelfile (default: %(default)s)")
    ex.add_argument("--quant", choices=GGUF_TYPES, default="q8_0",
                    help="weight type in the GGUF; q4_k_m is written by llama.cpp's quantiser "
                         "(llama-cpp-python) (default: %(default)s)")
    ex.add_argument("--output", help="file (gguf) or directory (ollama) to create; never overwritten "
                                     "(default: NAME-QUANT.gguf or NAME-ollama here)")
    ex.add_argument("--name", help="the model's name (default: the run's name, see train --name)")
    ex.set_defaults(func=cmd_export)

    gn = verbs.add_parser("generate", help="batched predictions of a run's model for every prompt of a dataset")
    gn.add_argument("run", help="run directory (or a checkpoint inside one)")
    gn.add_argument("--data", required=True, help="JSON/JSONL dataset; each row's last reply is the reference")
    gn.add_argument("--output", default="predictions.jsonl", help="JSONL to create, never overwritten "
                                                                  "(default: %(default)s)")
    gn.add_argument("--limit", type=int, help="only the first N rows")
    _sampling_args(gn)
    gn.set_defaults(func=cmd_generate)

    ev = verbs.add_parser("eval", help="base vs tuned: loss, perplexity, BLEU, ROUGE, stop share; a report")
    ev.add_argument("run", help="run directory (or a checkpoint inside one)")
    ev.add_argument("--data", help="evaluate on this dataset instead of the run's held-out split")
    ev.add_argument("--limit", type=int, help="only the first N examples")
    ev.add_argument("--output", help="directory for report.{md,html,json} (default: RUN/eval)")
    ev.add_argument("--overwrite", action="store_true", help="replace an earlier report there")
    ev.set_defaults(func=cmd_eval)

    dl = verbs.add_parser("download", help="fetch a model (or with --dataset, a dataset) into the cache")
    dl.add_argument("model_id", metavar="ID", help="e.g. IndexTeam/Index-1.9B-Chat")
    dl.add_argument("--dataset", action="store_true", help="ID is a Hugging Face dataset (then --data hf:ID)")
    dl.add_argument("--source", choices=["huggingface", "modelscope"], default="huggingface",
                    help="(default: %(default)s)")
    dl.add_argument("--revision", help="branch, tag or commit")
    dl.set_defaults(func=cmd_download)

    ca = verbs.add_parser("cache", help="list what chatlora keeps in its cache (converted models, tokenized "
                                        "data, downloads), or clean it")
    ca.add_argument("action", nargs="?", choices=["list", "clean"], default="list",
                    help="list (default), or clean: remove conversions whose sources are gone and tokenized data")
    ca.add_argument("--all", action="store_true", help="with clean: every conversion too (rebuilt when needed)")
    ca.set_defaults(func=cmd_cache)

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
