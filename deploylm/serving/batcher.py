"""Request batching: concurrent requests with identical decoding options share one generate call.

One asyncio worker takes the oldest waiting request, gathers waiting requests with the same
`Job.batch_key()` (up to `max_batch_size` prompts, waiting at most `max_wait_ms` for company), and
runs `Generator.generate` on one dedicated thread; a single request with more prompts than
`max_batch_size` is decoded in several calls of at most that many. While a batch decodes, the next one forms, so
under load batches fill without waiting. Batching never changes a result: only requests with equal
options share a batch (sampling never does; requests that do not sample share whatever sampling-only
options, such as an OpenAI client's seed, they carry), and each prompt's result is its own row.

A decode stops after its current step (the generate call raises Interrupted) once every client of its
batch has left, or once the server's `stop` event is set (its drain is over): a batch that waited
behind a stream for the model is then not decoded for nobody.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from deploylm.errors import Interrupted, NumericalOverflow, UsageError, counted_over_all
from deploylm.serving.schemas import Job

log = logging.getLogger("deploylm.serve")

GenerateFn = Callable[[list[str], dict[str, Any], "StopSignal"], Sequence[Any]]   # (prompts, options, stop)


class QueueFull(Exception):
    """The waiting queue is at its limit; the client should retry later."""


class StopSignal:
    """What a batch's generate call reads as its `stop` (`is_set()`, as threading.Event): set when the
    server's stop event is, or when every request of the batch has been cancelled (clients gone); a stream's
    `abandoned` is the event its reader sets when the client has gone."""

    def __init__(self, server: threading.Event | None, abandoned: threading.Event | None = None) -> None:
        self.server, self.abandoned = server, abandoned if abandoned is not None else threading.Event()

    def is_set(self) -> bool:
        return self.abandoned.is_set() or (self.server is not None and self.server.is_set())


@dataclass(eq=False)
class _Pending:
    job: Job
    key: Any
    future: asyncio.Future
    request_id: str


class Batcher:
    """Groups waiting jobs into batches and decodes them one batch at a time."""

    def __init__(self, generate: GenerateFn, *, max_batch_size: int, max_wait_ms: float,
                 max_queue: int, stop: threading.Event | None = None) -> None:
        self._generate, self._stop = generate, stop
        self.max_batch_size, self.max_wait_s, self.max_queue = max_batch_size, max_wait_ms / 1000, max_queue
        self._waiting: collections.deque[_Pending] = collections.deque()
        self._arrived = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="deploylm-batch")
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.batches = 0          # generate calls made
        self._current: tuple[list[_Pending], StopSignal] | None = None     # the batch decoding now, its stop

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def decoding(self) -> int:
        """Jobs in the batch being decoded now."""
        return len(self._current[0]) if self._current is not None else 0

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._run(), name="deploylm-batcher")

    def runs_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether this batcher's worker runs on `loop` (it was started there and has not ended)."""
        return self._loop is loop and self._worker is not None and not self._worker.done()

    def abandon(self) -> None:
        """Let go of a batcher whose event loop is gone (its worker with it): its thread ends."""
        self._closing = True
        self._executor.shutdown(wait=False)

    async def stop(self) -> None:
        """Finish every waiting job, then stop the worker."""
        self._closing = True
        self._arrived.set()
        if self._worker is not None:
            await self._worker
        self._executor.shutdown(wait=True)

    def submit(self, job: Job, request_id: str = "-") -> asyncio.Future:
        """Queue `job`; the future resolves to its list of Results. Raises QueueFull at the limit."""
        if len(self._waiting) >= self.max_queue:
            raise QueueFull(f"{len(self._waiting)} requests are waiting (limit {self.max_queue})")
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(_Pending(job, job.batch_key(), future, request_id))
        self._arrived.set()
        return future

    def cancel(self, future: asyncio.Future) -> None:
        """Drop a job whose client is gone: a waiting one leaves the queue; a decoding batch whose every
        job is cancelled stops after its current step (its neighbours' results are still wanted)."""
        future.cancel()
        for item in list(self._waiting):
            if item.future is future:
                self._waiting.remove(item)
        if self._current is not None:
            batch, stop = self._current
            if any(item.future is future for item in batch) and all(item.future.cancelled() for item in batch):
                stop.abandoned.set()

    async def _run(self) -> None:
        while True:
            while not self._waiting:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            batch = await self._gather()
            if batch:
                await self._decode(batch)

    async def _gather(self) -> list[_Pending]:
        """Take the oldest job and compatible ones; wait (bounded) while the batch is not full."""
        first = self._waiting[0]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while True:
            batch = self._compatible(first)
            size = sum(len(p.job.prompts) for p in batch)
            remaining = deadline - asyncio.get_running_loop().time()
            if size >= self.max_batch_size or remaining <= 0 or self._closing or first.future.done():
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        batch = [p for p in self._compatible(first) if not p.future.done()]
        for item in self._compatible(first):
            self._waiting.remove(item)
        return batch

    def _compatible(self, first: _Pending) -> list[_Pending]:
        """`first` plus later jobs with its key, while the prompts fit in one batch (FIFO order)."""
        if first not in self._waiting:
            return []
        batch, size = [first], len(first.job.prompts)
        for item in self._waiting:
            if item is first or item.key != first.key:
                continue
            if size + len(item.job.prompts) > self.max_batch_size:
                break
            batch.append(item)
            size += len(item.job.prompts)
        return batch

    async def _decode(self, batch: list[_Pending]) -> None:
        loop = asyncio.get_running_loop()
        prompts = [p for item in batch for p in item.job.prompts]
        stop = StopSignal(self._stop)
        self._current = (batch, stop)
        try:
            results: list[Any] = []
            for start in range(0, len(prompts), self.max_batch_size):  # one request may bring more prompts
                chunk = prompts[start:start + self.max_batch_size]
                try:
                    results += await loop.run_in_executor(self._executor, self._generate, chunk,
                                                          batch[0].job.options, stop)
                except UsageError as exc:   # it numbers the prompts of its chunk: count them over the request
                    raise counted_over_all(exc, start) from None
                self.batches += 1
        except (UsageError, NumericalOverflow) as exc:
            # one bad request must not fail its neighbours: decode each alone. A NumericalOverflow is the model's
            # logits overflowing on some input (float16): it stops the whole call, but is no fault of the others
            if len(batch) > 1:
                for item in batch:
                    if not item.future.done():   # a client that left (cancelled) is not decoded for
                        await self._decode([item])
                return
            _settle(batch[0].future, exc=exc)   # an overflow is logged once, with its request id, by the endpoint
            return
        except Interrupted as exc:   # the server's drain is over, or every client left: nobody waits for these
            why = "every client left" if stop.abandoned.is_set() else "shutdown"
            log.info("batch of %d request(s) stopped (%s): %s", len(batch), why, [p.request_id for p in batch])
            for item in batch:
                _settle(item.future, exc=exc)
            return
        except Exception as exc:  # noqa: BLE001 - reported to every waiting client as a 500
            log.exception("batch of %d request(s) failed: %s", len(batch), [p.request_id for p in batch])
            for item in batch:
                _settle(item.future, exc=exc)
            return
        finally:
            self._current = None
        log.debug("batch of %d prompt(s) from %s", len(prompts), [p.request_id for p in batch])
        start = 0
        for item in batch:
            _settle(item.future, value=list(results[start:start + len(item.job.prompts)]))
            start += len(item.job.prompts)


def _settle(future: asyncio.Future, *, value: Any = None, exc: BaseException | None = None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)
