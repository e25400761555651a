"""Thread counts of the decoder's steps on CPU (deploylm/decoding/threads.py, issue 7): the policy that
picks one thread or the process's count for the full-vocabulary block, and proof that the choice never
changes a result."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest
import torch

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.decoding import search as search_module
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.decoding.threads import WIDE_MIN_ELEMENTS, StepThreads, ThreadCosts, for_logits, torch_threads


def run_steps(costs: ThreadCosts, seconds: dict[int, float] | list[dict[int, float]], steps: int) -> list[int]:
    """Drive `steps` steps; step i's vocab block takes seconds[i][n] (or seconds[n]) at n threads.
    Returns the thread count each step's block ran with."""
    picked = []
    for i in range(steps):
        n = costs.pick()
        picked.append(n)
        table = seconds[i] if isinstance(seconds, list) else seconds
        costs.record(n, table[n])
    return picked


def test_the_first_block_at_each_count_is_ignored_then_the_faster_count_is_kept():
    costs = ThreadCosts(2, probe_every=4)
    picked = run_steps(costs, {1: 1.0, 2: 0.5}, 4)
    # 1 (pool start, dropped), 1 (kept), 2 (dropped), 2 (kept): both measured after four steps
    assert picked == [1, 1, 2, 2] and costs.best() == 2
    picked = run_steps(costs, {1: 1.0, 2: 0.5}, 12)
    assert picked.count(1) == 2 and picked.count(2) == 10          # retries of 1 thread only, spaced out


def test_a_losing_retry_doubles_the_interval_up_to_the_cap():
    costs = ThreadCosts(2, probe_every=4, max_probe_every=16)
    run_steps(costs, {1: 1.0, 2: 0.5}, 4)
    picked = run_steps(costs, {1: 1.0, 2: 0.5}, 80)
    retries = [i for i, n in enumerate(picked) if n == 1]
    gaps = [b - a for a, b in zip(retries, retries[1:])]
    assert gaps[:3] == [8, 16, 16] and set(gaps[2:]) == {16}


def test_a_loaded_machine_moves_the_block_to_one_thread_and_a_quiet_one_moves_it_back():
    costs = ThreadCosts(2, probe_every=4, max_probe_every=8)
    run_steps(costs, {1: 1.0, 2: 0.5}, 6)
    assert costs.best() == 2
    loaded = {1: 1.2, 2: 6.0}                                      # a descheduled second thread
    run_steps(costs, loaded, 3)
    assert costs.best() == 1                                       # slow blocks outvote the old ones at once
    picked = run_steps(costs, loaded, 20)
    assert picked.count(2) <= 3                                    # rare retries while it stays loaded
    picked = run_steps(costs, {1: 1.0, 2: 0.5}, 20)                # quiet again: the next retry wins
    assert costs.best() == 2 and picked[-1] == 2



def test_searches_sharing_the_costs_start_one_retry_at_a_time():
    # Searches of one process share its ThreadCosts; when a retry of the slower count is due, the next
    # search to pick gets it, and the others keep the best count, not a retry each, while it runs.
    costs = ThreadCosts(2, probe_every=4)
    run_steps(costs, {1: 1.0, 2: 0.5}, 4)                          # both measured: 2 is best
    assert [costs.pick() for _ in range(6)] == [2, 2, 2, 1, 2, 2]  # steps of concurrent searches

def test_one_thread_process_never_widens():
    costs = ThreadCosts(1)
    assert run_steps(costs, {1: 1.0}, 10) == [1] * 10


def test_step_runs_on_one_thread_its_vocab_block_on_the_chosen_count_and_times_it():
    now = [0.0]
    costs = ThreadCosts(2, probe_every=4)
    with torch_threads(2):
        threads = StepThreads(2, costs=costs, clock=lambda: now[0])
        seen = []
        for i in range(6):
            with threads.step():
                seen.append(("step", torch.get_num_threads()))
                with threads.vocab():
                    seen.append(("vocab", torch.get_num_threads()))
                    now[0] += 1.0 if torch.get_num_threads() == 1 else 0.25
                seen.append(("after vocab", torch.get_num_threads()))
        assert torch.get_num_threads() == 2
    assert {n for kind, n in seen if kind != "vocab"} == {1}
    assert [n for kind, n in seen if kind == "vocab"] == [1, 1, 2, 2, 2, 2]
    assert list(costs.costs[1]) == [1.0] and list(costs.costs[2]) == [0.25, 0.25, 0.25]


def test_a_step_leaves_the_thread_count_of_threads_that_start_meanwhile_alone():
    """A thread of the host service that first runs torch while a search step is on one thread gets the
    process's count, not the step's: torch.set_num_threads(1) would also make 1 the default every thread
    starting then takes for good (an embedding service's request threads, deploylm's own callers)."""
    import ctypes

    try:
        ctypes.CDLL(None).omp_set_num_threads
    except (AttributeError, OSError, TypeError):
        pytest.skip("no OpenMP runtime reachable here: steps fall back to torch.set_num_threads")
    seen = []

    def fresh_thread():
        thread = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        thread.start()
        thread.join(30)

    with torch_threads(2):
        threads = StepThreads(2, costs=ThreadCosts(2))
        with threads.step():
            assert torch.get_num_threads() == 1
            fresh_thread()
            with threads.vocab():
                fresh_thread()
        assert torch.get_num_threads() == 2
        fresh_thread()
    assert seen == [2, 2, 2]



@pytest.mark.parametrize("fallback", [False, True])
def test_a_step_restores_the_calling_threads_count(monkeypatch, fallback):
    # torch_threads is own_threads' fallback where no OpenMP runtime is reachable (it then sets the process's
    # count): either way the count a step changed is restored after it, also when the step raises.
    from deploylm.decoding import threads as threads_module

    if fallback:
        monkeypatch.setattr(threads_module, "_omp_set_num_threads", lambda: None)
    with torch_threads(2):
        threads = StepThreads(2, costs=ThreadCosts(2))
        with pytest.raises(ValueError):
            with threads.step():
                assert torch.get_num_threads() == 1
                raise ValueError("a step that fails")
        assert torch.get_num_threads() == 2
        with threads_module.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2

def test_for_logits_widens_only_large_blocks_on_the_cpu():
    with torch_threads(2):
        assert for_logits(torch.zeros(32, WIDE_MIN_ELEMENTS // 32)).wide == 2
        assert for_logits(torch.zeros(8, 1000)).wide == 1
        assert for_logits(torch.zeros(32, 49152, device="meta")) is None


class TableBackend:
    """A 49,152-token vocabulary (enough for torch to really split the work over threads): the logits of
    a row are TABLE[(last token * 31 + step) % 64], so they depend on the row's history through reorder."""

    vocab_size = 49152

    def __init__(self):
        self.table = torch.randn(64, self.vocab_size, generator=torch.Generator().manual_seed(7)) * 4
        self.device = torch.device("cpu")

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(is_encoder_decoder=False, vocab_size=self.vocab_size, name="table",
                         special=SpecialTokens(eos_token_ids=(1,), pad_token_id=0))

    def _logits(self, last: torch.Tensor, step: int) -> torch.Tensor:
        return self.table[(last * 31 + step) % 64].clone()                     # [R, V]

    def prefill(self, batch: EncodedBatch):
        return self._logits(batch.input_ids[:, -1], 0), (batch.input_ids[:, -1], 0)

    def reorder(self, state, idx):
        return state[0].index_select(0, idx), state[1]

    def decode(self, tokens, state):
        return self._logits(tokens, state[1] + 1), (tokens, state[1] + 1)


class AlwaysWide(ThreadCosts):
    def pick(self) -> int:
        return self.wide


@pytest.mark.parametrize("options", [
    dict(num_beams=4, max_new_tokens=12, min_new_tokens=4, repetition_penalty=1.3, no_repeat_ngram_size=2),
    dict(num_beams=4, max_new_tokens=12, length_penalty=0.5, num_return_sequences=2),
    dict(num_beams=3, max_new_tokens=10, do_sample=True, seed=5, top_k=50, top_p=0.9, temperature=0.7),
    dict(num_beams=1, max_new_tokens=10, do_sample=True, seed=3, num_return_sequences=4, top_p=0.8),
    dict(num_beams=1, max_new_tokens=10, repetition_penalty=1.2),
], ids=["beam-processors", "beam", "beam-sample", "sample", "greedy"])
def test_results_do_not_depend_on_the_vocab_blocks_thread_count(monkeypatch, options):
    backend = TableBackend()
    batch = EncodedBatch(input_ids=torch.tensor([[5, 9, 11], [0, 7, 3], [0, 0, 2], [4, 4, 4],
                                                 [8, 1000, 3], [0, 2, 6], [9, 9, 9], [0, 3, 12]]),
                         attention_mask=torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 1, 1],
                                                      [1, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]]))
    opts = DecodingOptions(**options)
    seen: list[int] = []

    def forced(wide):
        def make(logits):
            threads = StepThreads(wide, costs=AlwaysWide(wide))
            block = threads.vocab

            @contextmanager
            def vocab():
                with block():
                    seen.append(torch.get_num_threads())
                    yield
            threads.vocab = vocab
            return threads
        return make

    with torch_threads(2):
        monkeypatch.setattr(search_module, "step_threads", forced(1))
        one = generate_ids(backend, batch, opts)
        assert set(seen) == {1}
        seen.clear()
        monkeypatch.setattr(search_module, "step_threads", forced(2))
        two = generate_ids(backend, batch, opts)
        assert set(seen) == {2}
    assert one == two
    assert len({h.token_ids for hyps in one for h in hyps}) > 1
