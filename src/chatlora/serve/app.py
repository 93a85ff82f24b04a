"""`chatlora serve RUN`: an OpenAI-compatible API, the tutorial's endpoint and a web chat page.

    chatlora serve runs/huanhuan                          # http://127.0.0.1:8000
    CHATLORA_API_KEY=... chatlora serve runs/huanhuan --host 0.0.0.0

Routes: POST /v1/chat/completions (JSON or SSE streaming), GET /v1/models, GET /health, POST /
(the tutorial's FastAPI contract), GET / (the chat page). The model is held once; one worker thread
generates the requests together (serve/worker.py: on a GPU a request joins the running batch at the
next step); requests beyond the queue get 429 with Retry-After. Prompts are built by templates.py,
the same path training used, off the event loop. What the network can send before a route runs
(bodies, slow requests, many connections, foreign names, keys) is handled by serve/guard.py. On SIGTERM the server stops admitting, lets running
replies finish for `grace_s`, then ends the rest with finish reason "shutdown". Nothing of a prompt
or a key is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from chatlora.config import ASSETS, ServeConfig, sampling_problems
from chatlora.decode.engine import Sampling
from chatlora.serve.guard import (
    LOOPBACK_NAMES,
    Guard,
    check_bind,
    connection_limit,
    guarded_protocol,
    limit_repeats,
    listen,
)
from chatlora.serve.worker import Job, QueueFull, Worker

PAGE = ASSETS / "chat.html"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def _error(status, message, param=None, kind="invalid_request_error", headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


def _unicode(text: str) -> str:
    """A string that UTF-8 can carry: JSON's \\ud800 escapes decode to lone surrogates, which cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"holds a lone surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
                         f"send valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


# OpenAI parameters chatlora does not implement: a request that asks for them gets 400 rather than
# an answer that silently ignores them. (parameter, values that ask for nothing)
UNSUPPORTED = {"n": (None, 1), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
               "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
               "presence_penalty": (None, 0), "frequency_penalty": (None, 0)}


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # Ranges: config.SAMPLING_RANGES, checked by Server.sampling (the same rules as the CLI's flags).
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    stream: bool = False


class TutorialRequest(BaseModel):
    """The self-llm FastAPI chapter's request body."""
    prompt: Text
    history: list[list[Text]] = []
    max_length: int | None = Field(None, ge=1)
    top_p: float | None = None
    top_k: int | None = None
    temperature: float | None = None
    repetition_penalty: float | None = None


class Server:
    """What the routes need: the run, the worker, the limits, the model's context length."""

    def __init__(self, run, model, limits: ServeConfig, name: str | None = None):
        self.run, self.limits = run, limits
        self.worker = Worker(model, run.tok, run.fmt.stop_ids, limits.queue_size, limits.max_batch)
        self.context = int(getattr(model.config, "max_position_embeddings", 4096))
        self.model_id = name or run.name
        self.draining = False   # shutting down: new requests get 503

    def sampling(self, req, max_new: int) -> Sampling:
        """The request's sampling settings over the run's defaults; 400 naming a setting out of range."""
        given = dict(temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                     repetition_penalty=req.repetition_penalty, seed=getattr(req, "seed", None))
        for name, problem in sampling_problems(given):
            raise ApiError(400, f"{name} {problem}", name)
        return Sampling.from_config(self.run.cfg.generate, max_new_tokens=max_new, **given)

    def check_size(self, messages: int, stop: list[str]) -> None:
        limits = self.limits
        if messages > limits.max_messages:
            raise ApiError(400, f"{messages} messages; this server takes at most {limits.max_messages}", "messages")
        if len(stop) > limits.max_stop_strings:
            raise ApiError(400, f"{len(stop)} stop strings; at most {limits.max_stop_strings}", "stop")
        if any(len(s) > limits.max_stop_chars for s in stop):
            raise ApiError(400, f"a stop string is longer than {limits.max_stop_chars} characters", "stop")

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        if messages[-1]["role"] != "user":
            raise ApiError(400, "the last message must come from the user", "messages")
        if not any(m["role"] == "system" for m in messages) and self.run.system_prompt:
            messages = [{"role": "system", "content": self.run.system_prompt}] + messages
        try:
            return self.run.fmt.prompt(messages)
        except ValueError as e:
            raise ApiError(400, f"{e} (one optional system message first)", "messages") from None

    def budget(self, prompt: list[int], requested: int | None, param: str = "max_tokens") -> int:
        max_new = requested or min(self.run.cfg.generate.max_new_tokens, self.limits.max_tokens_cap)
        if max_new > self.limits.max_tokens_cap:
            raise ApiError(400, f"{param} asks for {max_new} new tokens; this server allows at most "
                                f"{self.limits.max_tokens_cap}", param)
        if len(prompt) + max_new > self.context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens and {max_new} new tokens are asked for: "
                                f"{len(prompt) + max_new} is more than the model's context of {self.context}",
                           param)
        return max_new

    async def start(self, prompt, sampling, stop) -> Job:
        if self.draining:
            raise ApiError(503, "the server is shutting down", kind="server_error", headers={"Retry-After": "5"})
        job = Job(prompt, sampling, stop, asyncio.get_running_loop(), time.monotonic() + self.limits.deadline_s)
        try:
            self.worker.submit(job)
        except QueueFull:
            raise ApiError(429, "the server is busy; retry shortly", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        return job

    async def drain(self) -> None:
        """Stop admitting; let running and queued replies finish within `grace_s`, then end the rest
        (finish reason "shutdown") so that each gets a complete response."""
        self.draining = True
        ends = time.monotonic() + self.limits.grace_s
        while self.worker.busy() and time.monotonic() < ends:
            await asyncio.sleep(0.05)
        if self.worker.busy():
            self.worker.cut(0.0)
            ends = time.monotonic() + 10.0   # one step of every row
            while self.worker.busy() and time.monotonic() < ends:
                await asyncio.sleep(0.05)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Sets `job.cancel` when the client goes away (after the body, receive() waits for that)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    job.cancel.set()


async def collect(job: Job, request: Request) -> tuple[str, str]:
    """Wait for a whole reply; a client that goes away stops its generation within a step or two."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    parts = []
    try:
        while True:
            kind, value = await job.events.get()
            if kind == "text":
                parts.append(value)
            elif kind == "error":
                raise ApiError(500, value, kind="server_error")
            else:
                return "".join(parts), value
    finally:
        watcher.cancel()


def unsupported_parameter(raw: dict) -> None:
    for name, fine in UNSUPPORTED.items():
        if name in raw and raw[name] not in fine:
            raise ApiError(400, f"{name} is not supported by chatlora serve (it answers one choice, as plain "
                                f"text, without tools or log-probabilities)", name)


def build_app(server: Server, api_key: str | None = None, hosts: frozenset | None = LOOPBACK_NAMES) -> FastAPI:
    """The routes behind guard.Guard. `hosts`: the names a keyless server answers to (loopback by
    default: see Guard); with a key any name is accepted."""
    app = FastAPI(title="chatlora", docs_url=None, redoc_url=None, openapi_url=None)
    limits = server.limits
    app.add_middleware(Guard, api_key=api_key, hosts=None if api_key else hosts,
                       max_body_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s)

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
        return {"status": "draining" if server.draining else "ok", "ready": worker.ready.is_set(),
                "queued": worker.pending(), "failed_batches": worker.failures}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "chatlora"}]}

    @app.post("/v1/chat/completions")
    async def completions(body: dict[str, Any], request: Request):
        unsupported_parameter(body)
        try:
            req = ChatRequest.model_validate({k: v for k, v in body.items() if k not in UNSUPPORTED})
        except ValidationError as e:   # the same 400 as a malformed body
            raise RequestValidationError(e.errors()) from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        server.check_size(len(req.messages), stop)
        messages = [m.model_dump() for m in req.messages]
        prompt = await asyncio.to_thread(server.prompt_ids, messages)   # tokenizing can take a while
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_new = server.budget(prompt, req.max_completion_tokens or req.max_tokens, param)
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
        server.check_size(len(messages) + 1, [])
        prompt = await asyncio.to_thread(server.prompt_ids, messages + [{"role": "user", "content": req.prompt}])
        # The tutorial's max_length is the total length (prompt + reply), as in HF generate.
        if req.max_length is not None and req.max_length <= len(prompt):
            raise ApiError(400, f"max_length is {req.max_length} but the prompt alone has {len(prompt)} tokens",
                           "max_length")
        max_new = server.budget(prompt, req.max_length - len(prompt) if req.max_length else None, "max_length")
        job = await server.start(prompt, server.sampling(req, max_new), [])
        text, _ = await collect(job, request)
        return {"response": text, "history": req.history + [[req.prompt, text]], "status": 200,
                "time": datetime.now().strftime("%Y-%m-%d %H:%M:%S")}

    page_html = chat_page(server)   # built once

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return page_html

    return app


def chat_page(server: Server) -> str:
    """The chat page with the run's settings embedded as a JavaScript object literal."""
    settings = {"system": server.run.system_prompt or "", "model": server.model_id,
                **{k: getattr(server.run.cfg.generate, k) for k in
                   ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")}}
    # Inside <script>, "<!--", "<script" and "</script" in a string still change how the page is parsed:
    # no "<", ">" or "&" is left in the embedded JSON (\\u escapes mean the same characters to JavaScript).
    embedded = json.dumps(settings, ensure_ascii=False)
    for char in "<>&\u2028\u2029":
        embedded = embedded.replace(char, f"\\u{ord(char):04x}")
    return PAGE.read_text(encoding="utf-8").replace("__CHATLORA_SETTINGS__", embedded)


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


def uvicorn_server(server: Server, api_key: str | None, log_level: str = "info", access_log: bool = True):
    """uvicorn for `server`: the guarded protocol, and a shutdown that drains the worker first."""
    import uvicorn

    limits = server.limits

    class Uvicorn(uvicorn.Server):
        async def shutdown(self, sockets=None):
            for listener in self.servers:   # no new connections while the running replies finish
                listener.close()
            await server.drain()
            await super().shutdown(sockets)

    config = uvicorn.Config(build_app(server, api_key), log_level=log_level, access_log=access_log,
                            http=guarded_protocol(limits.header_timeout_s, connection_limit(limits.max_connections)),
                            timeout_graceful_shutdown=5)
    limit_repeats()
    return Uvicorn(config)


def serve(run_path: str, settings: ServeConfig | None = None, api_key: str | None = None,
          name: str | None = None) -> int:
    from chatlora.rundir import load_run, load_tuned_model

    settings = settings or ServeConfig()
    host, port = settings.host, settings.port
    check_bind(host, api_key)
    sock = listen(host, port)
    run = load_run(run_path)
    server = Server(run, load_tuned_model(run), settings, name)
    shown = f"[{host}]" if ":" in host else host
    print(f"chatlora serve: {run.dir} as model '{server.model_id}' on http://{shown}:{port}  "
          f"(API key {'required' if api_key else 'off'})", flush=True)
    uvicorn_server(server, api_key).run(sockets=[sock])
    server.worker.close()
    return 0


@contextlib.contextmanager
def in_background(server: Server, api_key: str | None = None):
    """A real server for `server` on a free loopback port, in a thread (tests, benchmarks); yields its
    URL and stops it (the same drain as SIGTERM) on exit."""
    sock = listen("127.0.0.1", 0)
    uv = uvicorn_server(server, api_key, log_level="warning", access_log=False)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not uv.started:
        raise RuntimeError("the background server did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
