"""How many torch threads a search step uses on CPU (issue 7).

A step is two kinds of work:
- a few passes over the full logits [R, V] (log-softmax, processors, chunk maxima): ~0.9 ms of
  vectorized arithmetic at R = 32, V = 49,152, which two threads nearly halve on an idle machine
  (bench workload, onnx fp32: 1.88 -> 1.56 ms of decoder time per step);
- ~50 small ops on [B, K] tensors, which gain nothing from threads.

Threads are a bet on the cores being free. When they are shared with other work, every parallel
region waits for its descheduled second thread: issue 7 measured 6.3 ms per step instead of 1.9 with
two busy processes beside the bench (and 64 ms at load 8). So the small ops always run on one thread,
and `StepThreads` measures the full-vocabulary block at one thread and at the process's count and
keeps the faster, re-trying the other now and then (every `probe_every` steps, doubling the interval
each time the retry loses, so a loaded machine pays for a slow retry rarely).

Backend calls are outside the step and keep the process's thread count. The counts are set for the
calling thread only (`own_threads`): torch.set_num_threads also sets the process's default, which every
thread takes when it first runs torch, so a thread of the host service starting during a step would keep
one thread for good. Other threads (a server's other generators, the host's own) keep theirs.
Thread counts change no values: every op here splits its work by rows or by independent elements.
"""
from __future__ import annotations

import functools
import statistics
import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

import torch


WIDE_MIN_ELEMENTS = 1 << 20   # 4 MiB of fp32 logits: more than one core's L2 on the machines measured


class ThreadCosts:
    """Measured seconds of the vocab block at one thread and at `wide` threads, and the retry schedule.
    Shared by the searches of a process (`shared_costs`); every method holds the lock."""

    def __init__(self, wide: int, *, probe_every: int = 16, max_probe_every: int = 256):
        self.wide = max(1, int(wide))
        self.probe_every, self.max_probe_every = probe_every, max_probe_every
        self.costs: dict[int, deque[float]] = {1: deque(maxlen=3), self.wide: deque(maxlen=3)}
        self.interval = probe_every    # steps between retries of the slower count
        self.until_probe = probe_every
        self._warm: set[int] = set()   # counts whose first (pool-starting) block was seen
        self._lock = threading.Lock()

    def best(self) -> int:
        """The thread count with the lower median of its last 3 measured vocab blocks (1 if unmeasured)."""
        with self._lock:
            return self._best()

    def _best(self) -> int:
        if not all(self.costs.values()):
            return 1
        return min(self.costs, key=lambda n: (statistics.median(self.costs[n]), n))

    def pick(self) -> int:
        """The thread count for the next step's vocab block: an unmeasured one, a due retry, or the best."""
        if self.wide == 1:
            return 1
        with self._lock:
            unmeasured = [n for n in (1, self.wide) if not self.costs[n]]   # (the first block is not kept)
            if unmeasured:
                return unmeasured[0]
            best = self._best()
            self.until_probe -= 1
            if self.until_probe <= 0:
                self.until_probe = self.interval   # until this retry is recorded, do not start another
                return self.wide if best == 1 else 1
            return best

    def record(self, threads: int, seconds: float) -> None:
        """One step's vocab block took `seconds` at `threads`.

        The first block at each count is not kept (the first parallel region starts the thread pool).
        A retry replaces its count's old measurements (they describe a machine that may have changed):
        it wins when it beats the best count's median, and a retry that loses doubles the interval.
        """
        with self._lock:
            if threads not in self._warm:
                self._warm.add(threads)
                return
            best_before = self._best() if all(self.costs.values()) else None
            if best_before is None or threads == best_before:
                self.costs[threads].append(seconds)
                return
            won = seconds < statistics.median(self.costs[best_before])       # a retry
            self.costs[threads] = deque([seconds], maxlen=3)
            self.interval = self.probe_every if won else min(2 * self.interval, self.max_probe_every)
            self.until_probe = self.interval


_SHARED: dict[int, ThreadCosts] = {}
_SHARED_LOCK = threading.Lock()


def shared_costs(wide: int) -> ThreadCosts:
    """The process's ThreadCosts for `wide` threads (created on first use)."""
    with _SHARED_LOCK:
        return _SHARED.setdefault(wide, ThreadCosts(wide))


class StepThreads:
    """Thread counts for the steps of one search: `step()` around a whole step (one thread),
    `vocab()` around its full-vocabulary block (the faster of one and `costs.wide`, as measured)."""

    def __init__(self, threads: int, *, costs: ThreadCosts | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.costs = costs if costs is not None else shared_costs(max(1, int(threads)))
        self.clock = clock
        self.chosen = 1               # thread count of the current step's vocab block
        self._spent = 0.0             # seconds in vocab blocks during the current step
        self._ran_vocab = False

    @property
    def wide(self) -> int:
        return self.costs.wide

    @contextmanager
    def step(self) -> Iterator[None]:
        """One search step: torch on one thread (restored after), its vocab block timed."""
        self.chosen, self._spent, self._ran_vocab = self.costs.pick(), 0.0, False
        with own_threads(1):
            yield
        if self._ran_vocab and self.wide > 1:
            self.costs.record(self.chosen, self._spent)

    @contextmanager
    def vocab(self) -> Iterator[None]:
        """The step's full-vocabulary passes, on the thread count chosen for this step."""
        with own_threads(self.chosen):
            start = self.clock()
            try:
                yield
            finally:
                self._spent += self.clock() - start
                self._ran_vocab = True


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` for the block, restored after (untouched when equal)."""
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def own_threads(n: int) -> Iterator[None]:
    """The calling thread's torch intra-op thread count set to `n` for the block, restored after; the process's
    default, which threads starting meanwhile take, is left alone. With torch's OpenMP runtime that is
    omp_set_num_threads (a per-thread setting that torch.get_num_threads reads); where it cannot be found,
    torch_threads."""
    setter = _omp_set_num_threads()
    if setter is None:
        with torch_threads(n):
            yield
        return
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    setter(n)
    try:
        yield
    finally:
        setter(before)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """omp_set_num_threads of the OpenMP runtime torch runs on, if it is loaded and really is torch's
    (setting it must change torch.get_num_threads() on this thread); looked up once."""
    import ctypes

    try:
        runtime = ctypes.CDLL(None)
        setter, getter = runtime.omp_set_num_threads, runtime.omp_get_max_threads
    except (AttributeError, OSError, TypeError):   # no OpenMP in the process, or no global namespace (Windows)
        return None
    setter.argtypes, setter.restype, getter.argtypes, getter.restype = [ctypes.c_int], None, [], ctypes.c_int
    torch.get_num_threads()                         # torch's own setting of this thread first
    before = getter()
    probe = 2 if before == 1 else 1
    setter(probe)
    works = torch.get_num_threads() == probe
    setter(before)
    return setter if works else None


def for_logits(logits: torch.Tensor) -> StepThreads | None:
    """The StepThreads of a search whose steps see logits like `logits` [R, V]; None off the CPU.

    The vocab block may use the process's threads only from WIDE_MIN_ELEMENTS logits up (beam 4 x 8
    prompts x 49,152: 1.6 M). Below, it is a few hundred microseconds of cache-resident work (greedy on
    8 prompts: 0.44 ms) where waking the pool's second thread costs about what it saves.
    """
    if logits.device.type != "cpu":
        return None
    return StepThreads(torch.get_num_threads() if logits.numel() >= WIDE_MIN_ELEMENTS else 1)


@contextmanager
def no_threads() -> Iterator[None]:
    """The default vocab block of a search run outside `run_search` (or not on CPU): nothing changes."""
    yield
