"""One generation thread for the server: a bounded queue of jobs, text events back to asyncio.

The HTTP side submits a `Job` and reads `("text", piece)` events, then one `("done", finish_reason)`
from `job.events`. Jobs waiting together are generated together (generate.BatchGeneration), up to
`max_batch` at a time; a job arriving during a batch waits for the next one. Setting `job.cancel` (the client went away) stops the generation before its
next token; so does the job's deadline. Stop strings are matched on the decoded text, and text that
could still become a stop string is held back until it cannot.

    worker = Worker(model, tok, stop_ids, queue_size=16, max_batch=16)
    worker.submit(job)        # raises QueueFull when queue_size jobs are already waiting
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from chatlora.generate import BatchGeneration, Sampling
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


@dataclass
class _Reply:
    """One job's text state inside a batch."""
    stream: TextStream
    pending: str = ""
    stopped: bool = False  # a stop string was found


class Worker:
    def __init__(self, model, tok, stop_ids, queue_size: int, max_batch: int = 16):
        self.model, self.tok, self.stop_ids, self.max_batch = model, tok, stop_ids, max_batch
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
        """Take the jobs waiting now (up to max_batch) and generate them together."""
        while (job := self.jobs.get()) is not None:
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # close after this batch
                    break
                batch.append(nxt)
            try:
                self._run_batch(batch)
            except Exception:  # never lose the thread; the requests end with finish_reason "error"
                log.exception("generation failed")
                for j in batch:
                    j.emit("done", "error")

    def _run_batch(self, batch: list[Job]) -> None:
        live = []
        for job in batch:
            if job.cancel.is_set() or time.monotonic() > job.deadline:
                job.emit("done", "length")
            else:
                live.append(job)
        if not live:
            return
        replies = [_Reply(TextStream(self.tok)) for _ in live]

        def should_stop(row: int) -> bool:
            job = live[row]
            return replies[row].stopped or job.cancel.is_set() or time.monotonic() > job.deadline

        gen = BatchGeneration(self.model, [j.prompt for j in live], self.stop_ids, [j.sampling for j in live],
                              pad_id=self.tok.pad_id, should_stop=should_stop)
        for row, token in gen:
            job, reply = live[row], replies[row]
            job.generated += 1
            reply.pending += reply.stream.push(token)
            shown, reply.stopped, hold = split_at_stop(reply.pending, job.stop)
            if shown:
                job.emit("text", shown)
            reply.pending = reply.pending[len(reply.pending) - hold:] if hold else ""
        for job, reply, reason in zip(live, replies, gen.finish_reasons):
            if reply.pending:
                job.emit("text", reply.pending)
            job.emit("done", "stop" if reply.stopped else reason)
