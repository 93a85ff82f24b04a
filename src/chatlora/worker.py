"""One generation thread for the server: a bounded queue of jobs, text events back to asyncio.

The HTTP side submits a `Job` and reads `("text", piece)` events, then one `("done", finish_reason)`
from `job.events`. Setting `job.cancel` (the client went away) stops the generation before its
next token; so does the job's deadline. Stop strings are matched on the decoded text, and text that
could still become a stop string is held back until it cannot.

    worker = Worker(model, tok, stop_ids, queue_size=16)
    worker.submit(job)        # raises QueueFull when queue_size jobs are already waiting
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from chatlora.generate import Generation, Sampling
from chatlora.tokenizer import TextStream

log = logging.getLogger("chatlora.worker")


class QueueFull(Exception):
    pass


@dataclass
class Job:
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which generation ends
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: int = 0

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


def split_at_stop(text: str, stops: list[str]) -> tuple[str, bool, int]:
    """(text safe to show, whether a stop string was found, how much to hold back)."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        return text[:cut], True, 0
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold], False, hold


class Worker:
    def __init__(self, model, tok, stop_ids, queue_size: int):
        self.model, self.tok, self.stop_ids = model, tok, stop_ids
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.thread = threading.Thread(target=self._loop, name="chatlora-generate", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def pending(self) -> int:
        return self.jobs.qsize()

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            try:
                job.emit("done", self._run(job))
            except Exception:  # never lose the thread; the request ends with finish_reason "error"
                log.exception("generation failed")
                job.emit("done", "error")

    def _run(self, job: Job) -> str:
        if job.cancel.is_set() or time.monotonic() > job.deadline:
            return "length"
        gen = Generation(self.model, job.prompt, self.stop_ids, job.sampling)
        stream, pending = TextStream(self.tok), ""
        for token in gen:
            job.generated += 1
            pending += stream.push(token)
            shown, stopped, hold = split_at_stop(pending, job.stop)
            if shown:
                job.emit("text", shown)
            pending = pending[len(pending) - hold:] if hold else ""
            if stopped:
                return "stop"
            if job.cancel.is_set() or time.monotonic() > job.deadline:
                return "length"
        if pending:
            job.emit("text", pending)
        return gen.finish_reason
