"""The request batcher: who shares a batch, how big batches get, and that results stay per request."""
from __future__ import annotations

import asyncio
import threading

import pytest

from deploylm.errors import Interrupted, UsageError
from deploylm.serving.batcher import Batcher, QueueFull
from deploylm.serving.schemas import Job
from tests.reliability.fakes import FakeGenerator


def job(*prompts, **options):
    return Job(tuple(prompts), options)


def run_jobs(jobs, *, fake=None, max_batch_size=8, max_wait_ms=50, max_queue=100):
    """Submit all jobs at once; return (results or exceptions, the fake's calls)."""
    fake = fake or FakeGenerator(delay=0.01)

    async def main():
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=max_batch_size,
                          max_wait_ms=max_wait_ms, max_queue=max_queue)
        batcher.start()
        futures = [batcher.submit(j) for j in jobs]
        # bounded: a request the batcher never settles fails the test instead of hanging the suite
        out = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), timeout=30)
        await batcher.stop()
        return out

    return asyncio.run(main()), fake.calls


def test_compatible_requests_share_one_batch_and_get_their_own_results():
    jobs = [job("a b", max_new_tokens=3), job("c d e", "f", max_new_tokens=3), job("g", max_new_tokens=3)]
    results, calls = run_jobs(jobs)
    assert [len(c[0]) for c in calls] == [4]
    for j, got in zip(jobs, results):
        assert got == FakeGenerator().generate(list(j.prompts), **j.options)


def test_different_options_never_share_a_batch():
    jobs = [job("a", num_beams=2), job("b", num_beams=3), job("c", num_beams=2), job("d", num_beams=2, max_new_tokens=5)]
    results, calls = run_jobs(jobs)
    assert sorted(c[0] for c in calls) == [["a", "c"], ["b"], ["d"]]
    assert results[1] == FakeGenerator().generate(["b"], num_beams=3)


def test_batches_are_bounded_and_keep_arrival_order():
    jobs = [job(str(i)) for i in range(10)] + [job("x", "y", "z")]
    _, calls = run_jobs(jobs, max_batch_size=4)
    assert [c[0] for c in calls] == [["0", "1", "2", "3"], ["4", "5", "6", "7"], ["8", "9"], ["x", "y", "z"]]


def test_one_request_with_more_prompts_than_the_batch_size_is_decoded_in_bounded_calls():
    big = job(*[str(i) for i in range(5)], max_new_tokens=3)
    results, calls = run_jobs([big], max_batch_size=2)
    assert [c[0] for c in calls] == [["0", "1"], ["2", "3"], ["4"]]
    assert results[0] == FakeGenerator().generate(list(big.prompts), max_new_tokens=3)
    _, calls = run_jobs([big], max_batch_size=1)                 # --max-batch-size 1: every prompt alone
    assert [c[0] for c in calls] == [[str(i)] for i in range(5)]



def test_a_refusal_in_a_later_call_of_a_big_request_names_the_prompt_counted_over_the_request():
    """5 prompts, 2 per call: the generator names the 4th "prompt 2" (its place in the second call)."""
    big = job("a", "b", "c", "BAD d", "e", max_new_tokens=3)
    results, calls = run_jobs([big], max_batch_size=2)
    assert [c[0] for c in calls] == [["a", "b"], ["c", "BAD d"]]
    assert isinstance(results[0], UsageError) and str(results[0]) == "prompt 4 contains BAD: scripted refusal"

def test_sampling_requests_are_decoded_alone():
    jobs = [job("a", do_sample=True, seed=1), job("b", do_sample=True, seed=1)]
    _, calls = run_jobs(jobs)
    assert [c[0] for c in calls] == [["a"], ["b"]]


def test_a_refused_request_does_not_fail_its_batch_neighbours():
    results, calls = run_jobs([job("ok one"), job("BAD two"), job("ok three")])
    assert isinstance(results[1], UsageError)
    assert results[0] == FakeGenerator().generate(["ok one"]) and results[2] == FakeGenerator().generate(["ok three"])
    assert [c[0] for c in calls][0] == ["ok one", "BAD two", "ok three"]  # tried together first


def test_a_request_whose_logits_overflow_does_not_fail_its_batch_neighbours():
    """An input on which the model's logits overflow (float16) stops the whole generate call with a
    NumericalOverflow since greedy and beam search check for it. Batched with it, other requests got the 500 too,
    where before they were answered (the overflow spoiled only its own input's output). As for a refusal, the
    batch is decoded request by request then: the overflow reaches only its own request."""
    from deploylm.errors import NumericalOverflow

    results, calls = run_jobs([job("ok one"), job("NAN two"), job("ok three")])
    assert isinstance(results[1], NumericalOverflow)
    assert results[0] == FakeGenerator().generate(["ok one"]) and results[2] == FakeGenerator().generate(["ok three"])
    assert [c[0] for c in calls] == [["ok one", "NAN two", "ok three"], ["ok one"], ["NAN two"], ["ok three"]]


def test_a_refused_batch_decodes_alone_only_the_requests_still_waited_for():
    """After a refusal the batch's requests are decoded one by one; a client that left meanwhile is skipped,
    not decoded for nobody."""
    async def main():
        fake = FakeGenerator(delay=1.0)
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=8, max_wait_ms=20,
                          max_queue=10)
        batcher.start()
        futures = [batcher.submit(job(text)) for text in ("ok one", "BAD two", "gone three")]
        await asyncio.sleep(0.3)              # the batch was refused at once; "ok one" is decoding alone (1 s)
        batcher.cancel(futures[2])
        out = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        await batcher.stop()
        return out, fake.calls

    out, calls = asyncio.run(main())
    assert [c[0] for c in calls] == [["ok one", "BAD two", "gone three"], ["ok one"], ["BAD two"]]
    assert isinstance(out[1], UsageError) and isinstance(out[2], asyncio.CancelledError)


def test_a_backend_failure_reaches_every_request_of_the_batch():
    results, _ = run_jobs([job("a"), job("BOOM")])
    assert all(isinstance(r, RuntimeError) for r in results)


def test_the_first_request_waits_at_most_max_wait_for_company():
    async def main():
        fake = FakeGenerator()
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=8, max_wait_ms=20, max_queue=10)
        batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await batcher.submit(job("alone"))
        waited = loop.time() - t0
        await batcher.stop()
        return waited, fake.calls

    waited, calls = asyncio.run(main())
    assert 0.015 <= waited < 1.0 and calls == [(["alone"], {})]


async def full_queue(fake):
    """A one-at-a-time batcher with a queue of 2, decoding "first" while "second" and "third" fill the queue;
    returns (batcher, first, second, third)."""
    batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=1, max_wait_ms=0, max_queue=2)
    batcher.start()
    first = batcher.submit(job("first"))
    await asyncio.sleep(0.01)           # "first" is decoding now; the queue is empty
    return batcher, first, batcher.submit(job("second")), batcher.submit(job("third"))


def test_queue_limit_and_cancelled_requests_are_not_decoded():
    async def main():
        fake = FakeGenerator(delay=0.05)
        batcher, first, second, third = await full_queue(fake)
        with pytest.raises(QueueFull):
            batcher.submit(job("fourth"))
        batcher.cancel(second)
        await asyncio.gather(first, third)
        await batcher.stop()
        return fake.calls

    calls = asyncio.run(main())
    assert [c[0] for c in calls] == [["first"], ["third"]]


def test_stop_finishes_every_queued_request():
    async def main():
        fake = FakeGenerator(delay=0.01)
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=2, max_wait_ms=0, max_queue=10)
        batcher.start()
        futures = [batcher.submit(job(str(i))) for i in range(5)]
        await batcher.stop()
        return [f.result() for f in futures]

    assert [r[0].prompt for r in asyncio.run(main())] == ["0", "1", "2", "3", "4"]


def test_a_batch_whose_every_client_left_stops_decoding():
    """Cancelling every request of the decoding batch sets its stop; one request of two does not."""
    async def main(cancel_both):
        fake = FakeGenerator(delay=1.0)                # a 1 s decode in 10 ms steps, stop read between
        server_stop = threading.Event()
        seen = []

        def generate(prompts, options, stop):
            seen.append(stop)
            return fake.generate(prompts, stop=stop, **options)

        batcher = Batcher(generate, max_batch_size=4, max_wait_ms=0, max_queue=10, stop=server_stop)
        batcher.start()
        a, b = batcher.submit(job("a", max_new_tokens=50)), batcher.submit(job("b", max_new_tokens=50))
        await asyncio.sleep(0.05)                      # both decode in one batch now
        batcher.cancel(a)
        if cancel_both:
            batcher.cancel(b)
        started = asyncio.get_running_loop().time()
        if not cancel_both:
            await b
        await batcher.stop()
        return seen, b, asyncio.get_running_loop().time() - started, server_stop.is_set()

    seen, b, took, server = asyncio.run(main(cancel_both=True))
    assert len(seen) == 1 and seen[0].is_set() and not server and took < 0.5 and b.cancelled()
    seen, b, took, server = asyncio.run(main(cancel_both=False))
    assert len(seen) == 1 and not seen[0].is_set() and b.result()[0].prompt == "b"


def test_a_full_batch_is_decoded_without_waiting_out_max_wait():
    """The oldest request waits for company only while the batch is not full: two requests that fill a batch
    of 2 are decoded at once, not after --max-wait-ms."""
    async def main():
        fake = FakeGenerator()
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=2, max_wait_ms=30_000,
                          max_queue=10)
        batcher.start()
        futures = [batcher.submit(job("a")), batcher.submit(job("b"))]
        done, _ = await asyncio.wait(futures, timeout=10)
        await batcher.stop()
        return len(done), fake.calls

    done, calls = asyncio.run(main())
    assert done == 2 and [c[0] for c in calls] == [["a", "b"]]


def test_a_cancelled_waiting_request_frees_its_place_in_the_queue():
    async def main():
        fake = FakeGenerator(delay=0.05)
        batcher, first, second, third = await full_queue(fake)
        batcher.cancel(second)
        queued = batcher.queued
        fourth = batcher.submit(job("fourth"))   # the cancelled request's place is free
        await asyncio.gather(first, third, fourth)
        await batcher.stop()
        return queued, fake.calls

    queued, calls = asyncio.run(main())
    assert queued == 1 and [c[0] for c in calls] == [["first"], ["third"], ["fourth"]]


def test_decoding_and_batches_count_what_health_reports():
    """`decoding` is the jobs of the batch decoding now (0 once it is answered); `batches` the generate calls."""
    async def main():
        fake = FakeGenerator(delay=0.2)
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=2, max_wait_ms=0, max_queue=10)
        batcher.start()
        futures = [batcher.submit(job("a")), batcher.submit(job("b")), batcher.submit(job("c", "d", "e"))]
        await asyncio.sleep(0.1)
        decoding = batcher.decoding                    # "a" and "b" share the first batch
        await asyncio.gather(*futures)
        after = batcher.decoding
        await batcher.stop()
        return decoding, after, batcher.batches, fake.calls

    decoding, after, batches, calls = asyncio.run(main())
    assert decoding == 2 and after == 0
    assert [c[0] for c in calls] == [["a", "b"], ["c", "d"], ["e"]] and batches == 3


def test_the_servers_stop_reaches_every_request_of_the_batch():
    """The server's stop event reaches the batch: every request of a batch that the end of the drain stopped gets
    Interrupted (its 503), not only the first."""
    async def main():
        fake = FakeGenerator(delay=1.0)
        server_stop = threading.Event()
        batcher = Batcher(lambda p, o, s: fake.generate(p, stop=s, **o), max_batch_size=4, max_wait_ms=0,
                          max_queue=10, stop=server_stop)
        batcher.start()
        futures = [batcher.submit(job("a")), batcher.submit(job("b", "c"))]
        await asyncio.sleep(0.05)
        server_stop.set()
        out = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 5)
        await batcher.stop()
        return out, fake.calls

    out, calls = asyncio.run(main())
    assert [c[0] for c in calls] == [["a", "b", "c"]] and all(isinstance(r, Interrupted) for r in out)
