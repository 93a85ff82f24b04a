"""`chatlora studio`: the pipeline in the browser, on the same server stack and safety as `chatlora serve`
(loopback by default, a non-loopback address refused without a key, the key checked on every route).

    chatlora studio --runs-dir runs                       # http://127.0.0.1:7860

JSON API (the page at / uses nothing else):
    GET    /api/config                  the training form: every field with its documentation and default
    GET    /api/models                  the models in the cache (and the offline demo model), for the model fields
    GET    /api/datasets                the hub datasets in the cache, as data paths (hf:OWNER/NAME)
    POST   /api/data/upload?name=F      the body is a data file: kept in RUNS/.studio/uploads/, its path answered
    POST   /api/data/check              {"config": {...}} -> the data report, or every bad row
    POST   /api/estimate                {"config", "preset"?} -> peak GPU memory of the run (and with lowmem),
                                        the GPU's memory and a warning when it will not fit
    POST   /api/downloads               {"id": "OWNER/NAME", "kind": dataset|model} -> 202, `chatlora download`
    GET    /api/downloads?id=&kind=     that download's state (none, running, finished, failed) and log
    GET    /api/runs                    every run: state, step, latest loss and held-out loss
    POST   /api/runs                    {"id", "config": {"group.field": value}, "preset"?} -> 201, a `chatlora train` process
    GET    /api/runs/{id}               state, summary, configuration, the log's tail
    GET    /api/runs/{id}/metrics       every metrics row
    GET    /api/runs/{id}/events        server-sent events: `metrics` (one per row, id = its index), `status`
    POST   /api/runs/{id}/stop          SIGTERM: the run writes a checkpoint and stops
    POST   /api/runs/{id}/resume        continues from its newest checkpoint
    DELETE /api/runs/{id}               a run that is not running
    POST   /api/runs/{id}/eval          {"limit"} -> 202, `chatlora eval` into RUN/eval; GET: its state and report
    POST   /api/runs/{id}/export        {"format": gguf|ollama, "quant"} -> 202; GET: its state; GET .../export/file
    *      /api/runs/{id}/serve/...     `chatlora serve`'s own routes for the run's newest adapter (one run's
                                        model loaded at a time): the page's chat uses /v1/chat/completions
Errors are {"error": {"message", "type"}} with 400 (bad input), 401 (key), 404, 409 (state).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from chatlora.config import ASSETS
from chatlora.errors import UserError
from chatlora.serve.guard import LOOPBACK_NAMES, Guard
from chatlora.studio.runs import RunsDir, form_overrides

PAGE = ASSETS / "studio.html"
MAX_BODY = 256 * 2 ** 20   # an uploaded data file is one request body
POLL_S = 0.5


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


def build_app(runs: RunsDir, api_key: str | None = None, hosts: frozenset | None = LOOPBACK_NAMES) -> FastAPI:
    app = FastAPI(title="chatlora studio", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RunServing, runs=runs, api_key=api_key, hosts=hosts)   # inside the guard
    app.add_middleware(Guard, api_key=api_key, hosts=None if api_key else hosts, max_body_bytes=MAX_BODY,
                       body_timeout_s=30.0)

    @app.exception_handler(UserError)
    async def user_error(_, e: UserError):
        return _error(400, str(e))

    @app.exception_handler(FileExistsError)
    async def conflict(_, e: FileExistsError):
        return _error(409, str(e), "conflict")

    @app.exception_handler(FileNotFoundError)
    async def missing(_, e: FileNotFoundError):
        return _error(409, str(e), "conflict")

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    def known(run_id: str) -> str:
        if not runs.exists(run_id):   # runs.path() has checked the id
            raise HTTPException(404, f"no run {run_id}")
        return run_id

    async def body(request: Request) -> dict:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError as e:
            raise UserError(f"the body is not JSON ({e})") from None
        if not isinstance(data, dict):
            raise UserError("the body must be a JSON object")
        return data

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text(encoding="utf-8")

    @app.get("/health")
    async def health():
        return {"status": "ok", "runs_dir": str(runs.root)}

    @app.get("/api/config")
    async def config_form():
        return {"fields": config_fields()}

    @app.get("/api/models")
    async def models():
        return {"models": cached_models()}

    @app.get("/api/datasets")
    async def datasets():
        return {"datasets": cached_datasets()}

    @app.post("/api/data/upload", status_code=201)
    async def upload(request: Request, name: str = ""):
        return {"path": str(await asyncio.to_thread(runs.upload, name, await request.body()))}

    @app.post("/api/data/check")
    async def data_check(request: Request):
        settings = (await body(request)).get("config", {})
        return await asyncio.to_thread(check_data, settings)

    @app.post("/api/downloads", status_code=202)
    async def start_download(request: Request):
        data = await body(request)
        return await asyncio.to_thread(runs.download, data.get("id"), _download_kind(data.get("kind")))

    @app.get("/api/downloads")
    async def download_state(id: str = "", kind: str = "dataset"):
        return await asyncio.to_thread(runs.download_state, id, _download_kind(kind))

    @app.post("/api/estimate")
    async def memory_estimate(request: Request):
        data = await body(request)
        return await asyncio.to_thread(estimate_memory, data.get("config", {}), data.get("preset") or None)

    @app.get("/api/runs")
    async def list_runs():
        return {"runs": [runs.summary(i) for i in runs.ids()]}

    @app.post("/api/runs", status_code=201)
    async def start(request: Request):
        data = await body(request)
        run_id, settings = data.get("id"), data.get("config", {})
        preset = data.get("preset") or None
        return await asyncio.to_thread(runs.start, run_id, settings, preset)

    @app.get("/api/runs/{run_id}")
    async def one(run_id: str):
        known(run_id)
        path = runs.path(run_id)
        config = (path / "config.yaml").read_text(encoding="utf-8") if (path / "config.yaml").is_file() else None
        info = _run_info(path)
        return {**runs.summary(run_id), "config_yaml": config, "log": runs.log_tail(run_id), **info}

    @app.get("/api/runs/{run_id}/metrics")
    async def metrics(run_id: str):
        return {"rows": runs.metrics(known(run_id))}

    @app.get("/api/runs/{run_id}/events")
    async def events(run_id: str, request: Request):
        known(run_id)
        start = int(request.headers.get("last-event-id", "-1")) + 1
        return StreamingResponse(_events(runs, run_id, start, request), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/api/runs/{run_id}/stop", status_code=202)
    async def stop(run_id: str):
        return runs.stop(known(run_id))

    @app.post("/api/runs/{run_id}/resume", status_code=202)
    async def resume(run_id: str):
        return await asyncio.to_thread(runs.resume, known(run_id))

    @app.post("/api/runs/{run_id}/eval", status_code=202)
    async def evaluate(run_id: str, request: Request):
        return runs.evaluate(known(run_id), (await body(request)).get("limit", 20))

    @app.get("/api/runs/{run_id}/eval")
    async def evaluation(run_id: str):
        state = runs.job_state(known(run_id), "eval")
        if state["state"] == "finished":
            report = json.loads(Path(state["output"]).read_text(encoding="utf-8"))
            state["report"] = {"examples": report["examples"], "models": report["models"]}
        return state

    @app.post("/api/runs/{run_id}/export", status_code=202)
    async def export(run_id: str, request: Request):
        data = await body(request)
        return runs.export(known(run_id), data.get("format", "gguf"), data.get("quant", "q8_0"))

    @app.get("/api/runs/{run_id}/export")
    async def exported(run_id: str):
        return runs.job_state(known(run_id), "export")

    @app.get("/api/runs/{run_id}/export/file")
    async def exported_file(run_id: str):
        state = runs.job_state(known(run_id), "export")
        if state["state"] != "finished":
            raise HTTPException(404, f"run {run_id} has no finished export")
        output = Path(state["output"])
        name = output.name if output.name != "model.gguf" else f"{output.parent.name}.gguf"
        return FileResponse(output, filename=name, media_type="application/octet-stream")

    @app.delete("/api/runs/{run_id}")
    async def delete(run_id: str):
        runs.delete(known(run_id))
        return {"id": run_id, "deleted": True}

    return app


class RunServing:
    """/api/runs/{id}/serve/...: the run's model behind `chatlora serve`'s own app (serve/app.py), so the
    studio's chat is the server's chat: same prompts, limits and errors. One run's model is loaded at a
    time (the first request for another run replaces it); loading happens off the event loop."""

    ROUTE = re.compile(r"^/api/runs/([^/]+)/serve(/.*)$")

    def __init__(self, app, runs: RunsDir, api_key: str | None, hosts):
        self.app, self.runs, self.api_key, self.hosts = app, runs, api_key, hosts
        self.loaded: tuple[str, object, object] | None = None   # (run id, Server, its app)
        self.lock = asyncio.Lock()

    async def __call__(self, scope, receive, send):
        match = self.ROUTE.match(scope.get("path", "")) if scope["type"] == "http" else None
        if not match:
            return await self.app(scope, receive, send)
        from chatlora.serve.guard import send_error

        run_id, rest = match.groups()
        try:
            serving = await self._serving(run_id)
        except UserError as e:
            return await send_error(send, 400 if "run id" in str(e) else 409, str(e))
        await serving(dict(scope, path=rest, raw_path=rest.encode()), receive, send)

    async def _serving(self, run_id: str):
        path = self.runs.path(run_id)
        if not (path / "config.yaml").is_file():
            raise UserError(f"run {run_id} has no adapter to chat with yet")
        async with self.lock:
            if self.loaded is None or self.loaded[0] != run_id:
                if self.loaded is not None:
                    self.loaded[1].worker.close()
                    self.loaded = None
                server = await asyncio.to_thread(_load_server, path)
                from chatlora.serve.app import build_app as serve_app

                self.loaded = (run_id, server, serve_app(server, self.api_key, self.hosts))
            return self.loaded[2]


def _load_server(path):
    from chatlora.config import ServeConfig
    from chatlora.rundir import load_run, load_tuned_model
    from chatlora.serve.app import Server

    run = load_run(str(path))
    return Server(run, load_tuned_model(run), ServeConfig())


async def _events(runs: RunsDir, run_id: str, start: int, request: Request):
    """Every metrics row from `start` on as it is written, and the state when it changes; ends a little
    after the run stops running."""
    sent, last_state, quiet = start, None, 0
    while not await request.is_disconnected():
        rows = runs.metrics(run_id)
        for i in range(sent, len(rows)):
            yield f"event: metrics\nid: {i}\ndata: {json.dumps(rows[i])}\n\n"
        sent = max(sent, len(rows))
        state = runs.state(run_id)
        if state["state"] != last_state:
            last_state = state["state"]
            yield f"event: status\ndata: {json.dumps(state)}\n\n"
        quiet = quiet + 1 if last_state not in ("running", "starting") else 0
        if quiet > 2:
            return
        await asyncio.sleep(POLL_S)


def cached_models() -> list[dict]:
    """Models `--model` finds without the network: downloads in the cache, and the offline demo model."""
    from chatlora.models.hub import DEMO_MODEL, cache_root, demo_model_path

    root = cache_root() / "models"
    found = sorted(p.parent.relative_to(root).as_posix() for p in root.glob("*/*/config.json")) if root.is_dir() else []
    out = [{"id": name, "path": str(root / name)} for name in found]
    try:
        out.append({"id": DEMO_MODEL, "path": str(demo_model_path())})
    except UserError:
        pass
    return out


def cached_datasets() -> list[dict]:
    """Hub datasets `chatlora download --dataset` has fetched, as the data paths that read them."""
    from chatlora.models.hub import cache_root

    root = cache_root() / "datasets"
    names = sorted(d.relative_to(root).as_posix() for d in root.glob("*/*") if d.is_dir() and any(d.iterdir()))
    return [{"id": name, "data": f"hf:{name}", "path": str(root / name)} for name in names]


def _run_info(path) -> dict:
    """The run's system prompt and sampling defaults (for the chat's controls), once it has them."""
    import dataclasses

    from chatlora.rundir import read_config, read_json_object

    if not (path / "config.yaml").is_file():
        return {}
    return {"system_prompt": read_json_object(path / "run.json").get("system_prompt"),
            "generate": dataclasses.asdict(read_config(path).generate)}


def config_fields() -> list[dict]:
    """The training form, from the config's own fields and documentation (not written twice)."""
    import typing

    from chatlora.config import Config, field_docs

    hints = typing.get_type_hints(Config)
    out = []
    for key, (doc, default) in field_docs().items():
        group, name = key.split(".")
        if group not in ("model", "lora", "data", "train"):
            continue
        kind = typing.get_type_hints(hints[group])[name]
        choices = list(typing.get_args(kind)) if typing.get_origin(kind) is typing.Literal else None
        base = next((t for t in (bool, int, float, list, str) if t is kind or t in typing.get_args(kind)
                     or typing.get_origin(kind) is t), str)
        out.append({"key": key, "doc": doc, "default": default, "type": base.__name__, "choices": choices,
                    "optional": type(None) in typing.get_args(kind)})
    return out


def _form_data(settings, preset: str | None = None):
    """(config, its tokenized data) for a form's settings, or (None, {"ok": false, "error"}) when the
    data check fails: every bad row listed, no rejects file written."""
    from chatlora.config import load_config
    from chatlora.data.dataset import dataset_for_config

    cfg = load_config(overrides=form_overrides(settings), preset=preset)
    cfg.data.on_error = "stop"
    try:
        return cfg, dataset_for_config(cfg)
    except UserError as e:
        return None, {"ok": False, "error": str(e)}


def check_data(settings: dict) -> dict:
    """The data check for a form's settings: the report and a few examples with the supervised span
    marked, exactly as the template tokenizes them; or the error (every bad row) as text."""
    from chatlora.templates import IGNORE

    cfg, loaded = _form_data(settings)
    if cfg is None:
        return loaded
    ds, tok = loaded.dataset, loaded.tok
    examples = []
    for e in ds.train[:3]:
        spans = []
        for token, label in zip(e.input_ids, e.labels):   # labels align with the ids: IGNORE = not trained on
            text, supervised = tok.decode([token]), label != IGNORE
            if spans and spans[-1]["supervised"] == supervised:
                spans[-1]["text"] += text
            else:
                spans.append({"text": text, "supervised": supervised})
        examples.append({"line": e.line, "spans": spans})
    return {"ok": True, "report": {k: v for k, v in ds.report.items() if k != "parts"}, "examples": examples}


def _download_kind(kind) -> bool:
    """True for a dataset download, False for a model's; a UserError for anything else."""
    if kind not in ("dataset", "model"):
        raise UserError("kind must be dataset or model")
    return kind == "dataset"


def gpu_memory() -> dict | None:
    """The first visible GPU's name, total and free memory in bytes (nvidia-smi: no CUDA context in the
    studio's process), or None without one."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return None
    index = (os.environ.get("CUDA_VISIBLE_DEVICES") or "0").split(",")[0].strip()
    try:
        line = subprocess.run(["nvidia-smi", "-i", index, "--query-gpu=name,memory.total,memory.free",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip().splitlines()[0]
        name, total, free = (part.strip() for part in line.rsplit(",", 2))
        return {"name": name, "total_bytes": int(total) * 2 ** 20, "free_bytes": int(free) * 2 ** 20}
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def estimate_memory(settings: dict, preset: str | None = None) -> dict:
    """The Train form's memory estimate (train/memory.py) for its settings and preset, over the run's
    whole plan; with a GPU, whether it fits and, when not, a warning (with the lowmem preset's figure)."""
    from chatlora.config import load_config
    from chatlora.train.memory import advice, estimate_run

    cfg, loaded = _form_data(settings, preset)
    if cfg is None:
        return loaded
    model_config = json.loads((loaded.base.dir / "config.json").read_text(encoding="utf-8"))
    need = estimate_run(cfg, model_config, loaded.dataset.train)
    gpu = gpu_memory()
    if isinstance(need, str):
        return {"ok": True, "estimate": None, "reason": need, "gpu": gpu, "warning": None}
    lowmem = None
    if preset != "lowmem" and not cfg.train.gradient_checkpointing:
        other = estimate_run(load_config(overrides=form_overrides(settings), preset="lowmem"), model_config,
                             loaded.dataset.train)
        lowmem = None if isinstance(other, str) else other
    warning = advice(need, gpu["name"], gpu["total_bytes"], gpu["free_bytes"], lowmem) if gpu else None
    return {"ok": True, "estimate": need.as_json(), "lowmem": lowmem.as_json() if lowmem else None,
            "gpu": gpu, "warning": warning}


def studio(runs_dir: str, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None) -> int:
    import uvicorn

    from chatlora.serve.guard import check_bind, guarded_protocol, limit_repeats, listen

    check_bind(host, api_key)
    sock = listen(host, port)
    runs = RunsDir(runs_dir)
    shown = f"[{host}]" if ":" in host else host
    print(f"chatlora studio: runs in {runs.root} on http://{shown}:{port}  (API key "
          f"{'required' if api_key else 'off'})", flush=True)
    config = uvicorn.Config(build_app(runs, api_key), log_level="info", http=guarded_protocol(10.0, 256))
    limit_repeats()
    uvicorn.Server(config).run(sockets=[sock])
    return 0
