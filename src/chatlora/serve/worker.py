"""One generation thread for the server: a bounded queue of jobs, text events back to asyncio.

The HTTP side submits a `Job` and reads `("text", piece)` events, then one `("done", finish_reason)`
or `("error", message)` from `job.events`. Jobs are generated together (generate.BatchGeneration),
up to `max_batch` at a time: on a GPU a job arriving while others decode joins them at the next step
(continuous batching, decode/loop.py); without the GPU decoder it waits for the running batch to end.
Setting `job.cancel` (the client went away) stops the generation before its next token; so does the
job's deadline, and `cut_after` (the server is shutting down: finish reason "shutdown"). Stop
strings are matched on the decoded text (`StopStrings`), and text that could still become a stop
string is held back until it cannot.

The thread never dies of a request: whatever fails while a batch is served ends that batch's jobs
with an "error" event, and the loop takes the next jobs (`alive` says whether it is running).

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

from chatlora.decode import engine
from chatlora.decode.engine import BatchGeneration, Sampling
from chatlora.models.tokenizer import TextStream

log = logging.getLogger(__name__)


class QueueFull(Exception):
    pass


@dataclass(eq=False)   # identity: jobs are kept in sets
class Job:
    prompt: list[int]
    sampling: Sampling
    stop: list[str]
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which generation ends
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    ended: bool = False   # its last event ("done" or "error") is sent

    def emit(self, kind: str, value) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def finish(self, reason: str) -> None:
        """The job's last event, sent once."""
        if not self.ended:
            self.ended = True
            self.emit("done", reason)

    def fail(self, message: str) -> None:
        if not self.ended:
            self.ended = True
            self.emit("error", message)


class StopStrings:
    """The first of several stop strings in a reply's growing text, in time linear in the text (one
    Knuth-Morris-Pratt automaton per stop string, its table extended only as far as a match has got,
    so a 1 MB stop string costs nothing before text that long is generated).

    `push(piece)` returns the text that is safe to show: everything but the longest tail that could
    still begin a stop string. When a stop string completes, `found` is set and the text from its
    start on is dropped. `flush()` returns what is held back when the reply ends without one."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self.matched = [0] * len(self.stops)        # per stop: the longest tail of the text that begins it
        self.table = [[0] for _ in self.stops]      # per stop: KMP failure lengths of its first characters
        self.held = ""
        self.found = False

    def push(self, piece: str) -> str:
        if self.found:
            return ""
        text, start = self.held + piece, len(self.held)
        for j, char in enumerate(piece):
            cuts = [start + j + 1 - len(s) for k, s in enumerate(self.stops) if self._advance(k, char) == len(s)]
            if cuts:
                self.found, self.held = True, ""
                return text[:min(cuts)]
        keep = max(self.matched, default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        held, self.held = self.held, ""
        return "" if self.found else held

    def _advance(self, k: int, char: str) -> int:
        """Stop k's match length after `char`."""
        stop, table, q = self.stops[k], self.table[k], self.matched[k]
        while q and stop[q] != char:
            q = table[q - 1]
        if stop[q] == char:
            q += 1
        if q < len(stop):
            while len(table) < q:   # the failure lengths the next characters may need
                i, f = len(table), table[-1]
                while f and stop[f] != stop[i]:
                    f = table[f - 1]
                table.append(f + 1 if stop[f] == stop[i] else 0)
        self.matched[k] = q
        return q


@dataclass
class _Reply:
    """One job's text state inside a batch."""
    stream: TextStream
    stops: StopStrings


class Worker:
    def __init__(self, model, tok, stop_ids, queue_size: int, max_batch: int = 16):
        self.model, self.tok, self.stop_ids, self.max_batch = model, tok, stop_ids, max_batch
        self.jobs: queue.Queue = queue.Queue(maxsize=queue_size)
        self.closed = False
        self.cut_after: float | None = None   # time.monotonic() after which every job ends ("shutdown")
        self.active: set[Job] = set()          # jobs taken from the queue and not ended
        self.failures = 0                      # batches that ended in an error
        self.ready = threading.Event()         # set once the decoder is warmed up and jobs are taken
        self.thread = threading.Thread(target=self._loop, name="chatlora-generate", daemon=True)
        self.thread.start()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.closed

    def submit(self, job: Job) -> None:
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def pending(self) -> int:
        return self.jobs.qsize()

    def busy(self) -> bool:
        """Whether any job is waiting or generating."""
        return bool(self.active) or not self.jobs.empty()

    def cut(self, after_s: float) -> None:
        """Every job, running or waiting, ends within `after_s` seconds with finish reason "shutdown"."""
        self.cut_after = time.monotonic() + after_s

    def close(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        """Generate the jobs waiting now (up to max_batch) together, taking in later ones as they come."""
        self._warm_up()
        self.ready.set()
        while (job := self.jobs.get()) is not None:
            batch = [job] + self._take(self.max_batch - 1)
            try:
                self._run_batch(batch)
            except Exception as e:   # never lose the thread: this batch's jobs fail, the next are served
                self.failures += 1
                log.exception("generation failed")
                message = f"generation failed ({type(e).__name__}); the server goes on"
            else:
                message = "generation ended without finishing this request"   # a bug; still answered
            for job in list(self.active) + batch:   # each request gets its last event, whatever happened
                job.fail(message)
            self.active.clear()
        self.closed = True

    def _warm_up(self) -> None:
        """On a GPU: the decoder's captures for 1..max_batch rows, before the first request needs them
        (jobs submitted meanwhile wait in the queue)."""
        try:
            seconds = engine.warm_up(self.model, self.max_batch)
        except Exception:   # serving still works; requests capture what they need when they need it
            log.exception("warming up the decoder failed")
            return
        if seconds is not None:
            print(f"chatlora: the decoder is ready for {self.max_batch} concurrent requests "
                  f"({seconds:.1f} s of CUDA graph captures)", flush=True)

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

    def _ending(self, job: Job) -> str | None:
        """Why `job` must end before its next token, or None."""
        now = time.monotonic()
        if self.cut_after is not None and now > self.cut_after:
            return "shutdown"
        if job.cancel.is_set() or now > job.deadline:
            return "length"
        return None

    def _run_batch(self, batch: list[Job]) -> None:
        """Generates `batch` and the jobs admitted while it runs; each job gets its "done" when it ends."""
        jobs: dict[int, tuple[Job, _Reply]] = {}   # request number (BatchGeneration's row) -> job
        numbers = itertools.count()

        def accept(new: list[Job]) -> list[Job]:
            """The jobs still wanted, numbered in order (the others end now)."""
            fresh = []
            for job in new:
                self.active.add(job)
                reason = self._ending(job)
                if reason is not None:
                    self._end(job, reason)
                else:
                    jobs[next(numbers)] = (job, _Reply(TextStream(self.tok), StopStrings(job.stop)))
                    fresh.append(job)
            return fresh

        def should_stop(i: int) -> bool:
            job, reply = jobs[i]
            return reply.stops.found or self._ending(job) is not None

        def finished(i: int, reason: str) -> None:
            job, reply = jobs.pop(i)
            tail = reply.stops.flush()
            if tail:
                job.emit("text", tail)
            if reply.stops.found:
                reason = "stop"
            elif reason == "length":   # the limit, or a cancellation, a deadline or the shutdown cut
                reason = self._ending(job) or reason
            self._end(job, reason)

        first = accept(batch)
        if not first:
            return
        gen = BatchGeneration(self.model, [j.prompt for j in first], self.stop_ids, [j.sampling for j in first],
                              pad_id=self.tok.pad_id, should_stop=should_stop, max_rows=self.max_batch,
                              admit=lambda room: [(j.prompt, j.sampling) for j in accept(self._take(room))],
                              on_finish=finished)
        for i, token in gen:
            job, reply = jobs[i]
            job.generated += 1
            shown = reply.stops.push(reply.stream.push(token))
            if shown:
                job.emit("text", shown)

    def _end(self, job: Job, reason: str) -> None:
        self.active.discard(job)
        job.finish(reason)
