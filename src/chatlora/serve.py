"""`chatlora serve RUN`: an OpenAI-compatible API, the tutorial's endpoint and a web chat page.

    chatlora serve runs/huanhuan                          # http://127.0.0.1:8000
    CHATLORA_API_KEY=... chatlora serve runs/huanhuan --host 0.0.0.0

Routes: POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, GET /health, POST /
(the tutorial's FastAPI contract), GET / (the chat page). The model is held once; one worker thread
generates the requests waiting together as one batch (worker.py); requests beyond the queue get 429
with Retry-After. Prompts are built by
templates.py, the same path training used. Nothing of a prompt or a key is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import os
import threading
import time
import uuid
from base64 import b64decode
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from chatlora.errors import UserError
from chatlora.generate import Sampling
from chatlora.config import sampling_problems
from chatlora.worker import Job, QueueFull, Worker

PAGE = Path(__file__).parent / "assets" / "chat.html"


@dataclass
class Limits:
    max_body_bytes: int = 1_000_000
    max_tokens_cap: int = 2048
    queue_size: int = 16
    deadline_s: float = 300.0
    max_batch: int = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status, message, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Ranges: config.SAMPLING_RANGES, checked by Server.sampling (the same rules as the CLI's flags).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False


class TutorialRequest(BaseModel):
    """The self-llm FastAPI chapter's request body."""
    prompt: str
    history: list[list[str]] = []
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = None
    top_k: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None


class Server:
    """What the routes need: the run, the worker, the limits, the model's context length."""

    def __init__(self, run, model, limits: Limits):
        self.run, self.limits = run, limits
        self.worker = Worker(model, run.tok, run.fmt.stop_ids, limits.queue_size, limits.max_batch)
        self.context = int(getattr(model.config, "max_position_embeddings", 4096))
        self.model_id = run.dir.name

    def sampling(self, req, max_new: int) -> Sampling:
        """The request's sampling settings over the run's defaults; 400 naming a setting out of range."""
        given = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                     repetition_penalty=req.repetition_penalty, seed=getattr(req, "seed", None))
        for name, problem in sampling_problems(given):
            raise ApiError(400, f"{name} {problem}", name)
        return Sampling.from_config(self.run.cfg.generate, max_new_tokens=max_new, **given)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", "messages")
        if not any(m["role"] == "system" for m in messages) and self.run.system_prompt:
            messages = [{"role": "system", "content": self.run.system_prompt}] + messages
        try:
            return self.run.fmt.prompt(messages)
        except ValueError as e:
            raise ApiError(400, f"{e} (one optional system message first)", "messages") from None

    def budget(self, prompt: list[int], requested: int | None) -> int:
        max_new = requested or min(self.run.cfg.generate.max_new_tokens, self.limits.max_tokens_cap)
        if max_new > self.limits.max_tokens_cap:
            raise ApiError(400, f"max_tokens is {max_new}; this server allows at most "
                                f"{self.limits.max_tokens_cap}", "max_tokens")
        if len(prompt) + max_new > self.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and max_tokens is {max_new}: "
                                f"{len(prompt) + max_new} is more than the model's context of {self.context}",
                           "max_tokens")
        return max_new

    async def start(self, prompt, sampling, stop) -> Job:
        job = Job(prompt, sampling, stop, asyncio.get_running_loop(), time.monotonic() + self.limits.deadline_s)
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return job


async def collect(job: Job, request: Request) -> tuple[str, str]:
    """Wait for a whole reply, cancelling it if the client goes away."""
    parts = []
    while True:
        try:
            kind, value = await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                raise ApiError(499, "client closed the request")
            continue
        if kind == "text":
            parts.append(value)
        elif kind == "error":
            raise ApiError(500, value, kind="server_error")
        else:
            return "".join(parts), value


def build_app(server: Server, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="chatlora", docs_url=None, redoc_url=None, openapi_url=None)
    limits = server.limits

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health" and not _authorized(request, api_key):
            return _error(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error",
                          headers={"WWW-Authenticate": 'Basic realm="chatlora"'})
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body_bytes):
            return _error(413, f"request body over {limits.max_body_bytes} bytes")
        if request.method == "POST" and length is None:
            body = await request.body()  # chunked: read it, bounded
            if len(body) > limits.max_body_bytes:
                return _error(413, f"request body over {limits.max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        return _error(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        first = e.errors()[0]
        param = ".".join(str(x) for x in first["loc"] if x != "body") or None
        return _error(400, f"{param or 'body'}: {first['msg']}", param)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return _error(e.status_code, str(e.detail))

    @app.get("/health")
    async def health():
        """Liveness for an orchestrator: 503 once the generation thread is not running."""
        worker = server.worker
        if not worker.alive:
            return JSONResponse({"status": "unavailable", "reason": "the generation thread is not running"},
                                status_code=503)
        return {"status": "ok", "queued": worker.pending(), "failed_batches": worker.failures}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "chatlora"}]}

    @app.post("/v1/chat/completions")
    async def completions(req: ChatRequest, request: Request):
        prompt = server.prompt_ids([m.model_dump() for m in req.messages])
        max_new = server.budget(prompt, req.max_completion_tokens or req.max_tokens)
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        job = await server.start(prompt, server.sampling(req, max_new), stop)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}
        if req.stream:
            return StreamingResponse(_sse(job, meta, len(prompt)), media_type="text/event-stream")
        text, finish = await collect(job, request)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish}],
                "usage": _usage(len(prompt), job)}

    @app.post("/")
    async def tutorial(req: TutorialRequest, request: Request):
        messages = []
        for pair in req.history:
            if len(pair) != 2:
                raise ApiError(400, "history must be a list of [question, answer] pairs", "history")
            messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        prompt = server.prompt_ids(messages + [{"role": "user", "content": req.prompt}])
        # The tutorial's max_length is the total length (prompt + reply), as in HF generate.
        if req.max_length is not None and req.max_length <= len(prompt):
            raise ApiError(400, f"max_length is {req.max_length} but the prompt alone has {len(prompt)} tokens",
                           "max_length")
        max_new = server.budget(prompt, req.max_length - len(prompt) if req.max_length else None)
        job = await server.start(prompt, server.sampling(req, max_new), [])
        text, _ = await collect(job, request)
        return {"response": text, "history": req.history + [[req.prompt, text]], "status": 200,
                "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    settings = {"system": server.run.system_prompt or "", "model": server.model_id,
                **{k: getattr(server.run.cfg.generate, k) for k in
                   ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")}}
    # "</" escaped: a system prompt holding "</script>" must not end the page's script.
    embedded = json.dumps(settings, ensure_ascii=False).replace("</", "<\\/")
    page_html = PAGE.read_text(encoding="utf-8").replace("__CHATLORA_SETTINGS__", embedded)  # built once

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    return app


def _usage(prompt_tokens: int, job: Job) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": job.generated,
            "total_tokens": prompt_tokens + job.generated}


async def _sse(job: Job, meta: dict, prompt_tokens: int):
    def chunk(delta: dict, finish=None, **extra) -> str:
        body = {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "error":   # the status line is sent: the error travels as an event (as OpenAI's do)
                yield f"data: {json.dumps({'error': {'message': value, 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"
                return
            else:
                yield chunk({}, value, usage=_usage(prompt_tokens, job))
                yield "data: [DONE]\n\n"
                return
    finally:  # the client went away (the generator is closed) or the reply is complete
        job.cancel.set()


def _authorized(request: Request, key: str) -> bool:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "basic":  # browsers: the page's login prompt, password = key
        try:
            value = b64decode(value).decode("utf-8").partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    elif scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.encode("utf-8"), key.encode("utf-8"))


def resolve_api_key(key: str | None, key_file: str | None) -> str | None:
    if key_file:
        try:
            key = Path(key_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UserError(f"cannot read the API key file {key_file}: {e.strerror}") from None
    key = key or os.environ.get("CHATLORA_API_KEY") or None
    if key is not None and len(key) < 8:
        raise UserError("the API key must be at least 8 characters")
    return key


def check_bind(host: str, api_key: str | None) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not api_key:
        raise UserError(f"refusing to listen on {host} without an API key: anyone who can reach it could use "
                        f"the model. Set CHATLORA_API_KEY, or pass --api-key-file (or --api-key).")


def serve(run_path: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits | None = None) -> int:
    import uvicorn

    from chatlora.rundir import load_run, load_tuned_model

    check_bind(host, api_key)
    run = load_run(run_path)
    server = Server(run, load_tuned_model(run), limits or Limits())
    print(f"chatlora serve: {run.dir} on http://{host}:{port}  (API key {'required' if api_key else 'off'})")
    uvicorn.run(build_app(server, api_key), host=host, port=port, log_level="info",
                timeout_graceful_shutdown=10)
    server.worker.close()
    return 0


@contextlib.contextmanager
def in_background(server: Server, api_key: str | None = None):
    """A real uvicorn server for `server` on a free loopback port, in a thread (tests, benchmarks);
    yields its URL and stops it on exit."""
    import uvicorn

    uv = uvicorn.Server(uvicorn.Config(build_app(server, api_key), host="127.0.0.1", port=0, log_level="warning",
                                       access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not uv.started:
        raise RuntimeError("the background server did not start")
    port = uv.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(10)
