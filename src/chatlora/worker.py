"""One generation thread for the server: a bounded queue of jobs, text events back to asyncio.

The HTTP side submits a `Job` and reads `("text", piece)` events, then one `("done", finish_reason)`
from `job.events`. Jobs are generated together (generate.BatchGeneration), up to `max_batch` at a
time: on a GPU a job arriving while others decode joins them at the next step (continuous batching,
batcher.py); without the GPU decoder it waits for the running batch to end. Setting `job.cancel` (the
client went away) stops the generation before its next token; so does the job's deadline. Stop strings are matched on the decoded text, and text that
could still become a stop string is held back until it cannot.

    worker = Worker(model, tok, stop_ids, queue_size=16, max_batch=16)
    worker.submit(job)        # raises QueueFull when queue_size jobs are already waiting
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from chatlora.fastdecode import static_decoder
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
        self.closed = False
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
        """Generate the jobs waiting now (up to max_batch) together, taking in later ones as they come."""
        self._warm_up()
        while (job := self.jobs.get()) is not None:
            self._run_batch([job] + self._take(self.max_batch - 1))
        self.closed = True

    def _warm_up(self) -> None:
        """On a GPU: the decoder's captures for 1..max_batch rows, before the first request needs them
        (jobs submitted meanwhile wait in the queue)."""
        decoder = static_decoder(self.model)
        if decoder is None:
            return
        began = time.monotonic()
        try:
            decoder.warm_up(self.max_batch)
        except Exception:   # serving still works; requests capture what they need when they need it
            log.exception("warming up the decoder failed")
            return
        print(f"chatlora: the decoder is ready for {self.max_batch} concurrent requests "
              f"({time.monotonic() - began:.1f} s of CUDA graph captures)", flush=True)

    def _take(self, room: int) -> list[Job]:
        """Up to `room` waiting jobs, without blocking (none once close() was called)."""
        taken = []
        while len(taken) < room and not self.closed:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.closed = True   # close after the running batch
                self.jobs.put(None)
                break
            taken.append(job)
        return taken

    def _run_batch(self, batch: list[Job]) -> None:
        """Generates `batch` and the jobs admitted while it runs; each job gets its "done" when it ends."""
        jobs: dict[int, tuple[Job, _Reply]] = {}   # request number (BatchGeneration's row) -> job
        numbers = itertools.count()

        def accept(new: list[Job]) -> list[Job]:
            """The jobs still wanted, numbered in order (the others end now)."""
            fresh = []
            for job in new:
                if job.cancel.is_set() or time.monotonic() > job.deadline:
                    job.emit("done", "length")
                else:
                    jobs[next(numbers)] = (job, _Reply(TextStream(self.tok)))
                    fresh.append(job)
            return fresh

        def should_stop(i: int) -> bool:
            job, reply = jobs[i]
            return reply.stopped or job.cancel.is_set() or time.monotonic() > job.deadline

        def finished(i: int, reason: str) -> None:
            job, reply = jobs.pop(i)
            if reply.pending:
                job.emit("text", reply.pending)
            job.emit("done", "stop" if reply.stopped else reason)

        first = accept(batch)
        if not first:
            return
        gen = BatchGeneration(self.model, [j.prompt for j in first], self.stop_ids, [j.sampling for j in first],
                              pad_id=self.tok.pad_id, should_stop=should_stop, max_rows=self.max_batch,
                              admit=lambda room: [(j.prompt, j.sampling) for j in accept(self._take(room))],
                              on_finish=finished)
        try:
            for i, token in gen:
                job, reply = jobs[i]
                job.generated += 1
                reply.pending += reply.stream.push(token)
                shown, reply.stopped, hold = split_at_stop(reply.pending, job.stop)
                if shown:
                    job.emit("text", shown)
                reply.pending = reply.pending[len(reply.pending) - hold:] if hold else ""
        except Exception:   # never lose the thread; the requests end with finish_reason "error"
            log.exception("generation failed")
            for job, _ in jobs.values():
                job.emit("done", "error")
