"""Streaming: emit token ids as soon as every hypothesis that can still win agrees on them.

In beam search the final best hypothesis is either the best one finished so far or an extension of a
live beam, so the tokens all of those share are final (the common prefix). For greedy decoding that is
every token. When an input is done, the rest of its best hypothesis is emitted.
"""
from __future__ import annotations

from typing import Generator, Iterable, Sequence

from deploylm.backends.base import Backend, EncodedBatch
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import Hypothesis, SearchStats, StepEvent, iter_search


def common_prefix(sequences: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """The longest token prefix shared by all `sequences` (empty when there are none)."""
    seqs = list(sequences)
    if not seqs:
        return ()
    prefix = list(seqs[0])
    for seq in seqs[1:]:
        n = 0
        while n < len(prefix) and n < len(seq) and prefix[n] == seq[n]:
            n += 1
        del prefix[n:]
    return tuple(prefix)


def agreed_ids(event: StepEvent) -> list[tuple[int, ...]]:
    """Per input, the generated tokens that are final after this step."""
    return [common_prefix(event.live_token_ids(i)) for i in range(int(event.done.shape[0]))]


def stream_ids(backend: Backend, batch: EncodedBatch, options: DecodingOptions,
               stats: SearchStats | None = None
               ) -> Generator[list[tuple[int, ...]], None, list[list[Hypothesis]]]:
    """Yield, after each step, per input the newly agreed token ids (often empty); at the end the rest of
    each input's best hypothesis. Returns the hypotheses as `generate_ids` would."""
    events = iter_search(backend, batch, options, stats)
    emitted: list[int] = [0] * batch.batch_size
    while True:
        try:
            event = next(events)
        except StopIteration as stop:
            hyps: list[list[Hypothesis]] = stop.value
            break
        agreed = agreed_ids(event)
        yield [ids[n:] for ids, n in zip(agreed, emitted)]
        emitted = [max(n, len(ids)) for ids, n in zip(agreed, emitted)]
    rest = [h[0].token_ids[n:] for h, n in zip(hyps, emitted)]
    if any(rest):
        yield rest
    return hyps
