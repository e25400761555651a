"""The A/B measurements of issue 7 (third to fifth sessions), on the bench workload (8 standard prompts, beam 4,
exactly 64 new tokens) and an exported decoder-only artifact (default: export/smollm2-fp32-v2). ORT's thread
spinning is measured by benchmarks/spin_ab.py (one process per setting).

    .venv/bin/python benchmarks/decoder_ab.py threads  [--artifact DIR] [--rounds 4] [--num-beams 4]
        decoder ms per step with the vocab block always on one thread vs StepThreads' measured choice,
        interleaved in one process (deploylm/decoding/threads.py)
    .venv/bin/python benchmarks/decoder_ab.py reorders [--artifact DIR]
        per decode step: rows whose parent changed (what an in-place reorder copies) vs rows an
        append cache with slots copies (R - distinct parents), from one search's recorded beam indices
    .venv/bin/python benchmarks/decoder_ab.py rss      [--artifact DIR] [--rounds 6] [--num-beams 4] [--trim] [--room N]
        peak RSS of each of several identical calls in one process (the high-water mark is reset before
        each call), and the RSS after it (--trim: after glibc's malloc_trim(0)); run it with
        MALLOC_MMAP_THRESHOLD_=1048576 in the environment to see malloc's part; --room 0: K/V without room
        (a new buffer at every growth, as before the fifth session)
    .venv/bin/python benchmarks/decoder_ab.py prefill  [--artifact DIR] [--rounds 4] [--num-beams 4] [--long-prompt]
        prefill and whole-call time with the grouped prefill (fourth session) vs one padded prefill run,
        interleaved in one process (--long-prompt: the last prompt replaced by one of ~460 tokens)
    .venv/bin/python benchmarks/decoder_ab.py binding  [--artifact DIR] [--rounds 4] [--num-beams 4]
        the backend's kept per-thread IO binding (fifth session) vs a fresh binding of every name per run:
        ms per run spent binding (outside ORT's run), then whole calls interleaved in one process
    .venv/bin/python benchmarks/decoder_ab.py artifacts --compare A B [--rounds 4] [--num-beams 4]
        two artifacts (e.g. export/smollm2-fp32-v2 and -v3, before/after packing MatMuls) interleaved in one
        process: wall time, time inside ONNX Runtime and the median decode run per call
    .venv/bin/python benchmarks/decoder_ab.py room     [--artifact DIR] [--rounds 4] [--num-beams 4]
        K/V buffers with room, grown in place (fifth session) vs a new buffer at every growth, interleaved
    .venv/bin/python benchmarks/decoder_ab.py lookup   --bench-json FILE [--artifact DIR]
        prompt-lookup speculation simulated on the greedy outputs of a `deploylm bench --num-beams 1 --json`
        run: tokens accepted per verification step, for n-grams of 2-3 and 2-4 proposed tokens
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _prompts() -> list[str]:
    from deploylm.benchmarking.workload import STANDARD_PROMPTS

    return list(STANDARD_PROMPTS)[:8]


def _options(num_beams: int = 4) -> dict:
    return dict(num_beams=num_beams, max_new_tokens=64, min_new_tokens=64)


def _timed(gen, options: dict) -> tuple[float, float, float]:
    """(wall s, backend s, decoder ms per step) of one generate call."""
    from deploylm.decoding.search import SearchStats

    stats = SearchStats()
    start = time.perf_counter()
    gen.generate(_prompts(), stats=stats, **options)
    return time.perf_counter() - start, stats.backend_seconds, 1e3 * stats.decoder_seconds / max(stats.steps, 1)


def threads(args) -> None:
    from deploylm.decoding import search, threads as policy
    from deploylm.generator import load

    class OneThread(policy.StepThreads):
        def __init__(self, count: int, **kwargs):
            super().__init__(1, **kwargs)

    gen = load(args.artifact, backend="onnx", threads=2)
    options = _options(args.num_beams)
    gen.generate(_prompts(), **options)                                                  # warm-up
    results = collections.defaultdict(list)
    for _ in range(args.rounds):
        for name, cls in (("one thread", OneThread), ("measured", policy.StepThreads)):
            search.step_threads = lambda logits, cls=cls: (None if logits.device.type != "cpu" else cls(
                torch.get_num_threads() if logits.numel() >= policy.WIDE_MIN_ELEMENTS else 1))
            results[name].append(_timed(gen, options))
    for name, rows in results.items():
        wall, backend, decoder = (statistics.median(col) for col in zip(*rows))
        print(f"{name:>10}: wall {wall:.3f} s, backend {backend:.3f} s, decoder {decoder:.3f} ms/step (medians)")


def reorders(args) -> None:
    from deploylm.generator import load

    gen = load(args.artifact, backend="onnx", threads=2)
    recorded, reorder = [], gen.backend.reorder

    def record(state, beam_idx):
        recorded.append(beam_idx.clone())
        return reorder(state, beam_idx)

    gen.backend.reorder = record
    gen.generate(_prompts(), **_options())
    steps = recorded[1:]                                                                 # [0]: prompts -> beams
    changed = sum(int((idx != torch.arange(idx.shape[0])).sum()) for idx in steps) / len(steps)
    slots = sum(idx.shape[0] - len(set(idx.tolist())) for idx in steps) / len(steps)
    print(f"{len(steps)} reorders: {changed:.1f} rows per step change parent, {slots:.1f} copied with slots")


def _vm_hwm_mib() -> float:
    """VmHWM of /proc/self/status (what clear_refs resets), in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def rss(args) -> None:
    """Peak RSS of each call on its own (the kernel's high-water mark reset before it), optionally with
    glibc's malloc_trim(0) after every call (fifth session: it returns the freed heap, not the peak)."""
    import ctypes

    from deploylm.benchmarking.worker import current_rss_mib, peak_rss_mib
    from deploylm.generator import load

    if args.room is not None:
        from deploylm.backends import ort_kv

        ort_kv.APPEND_ROOM = args.room
    gen = load(args.artifact, backend="onnx", threads=2)
    libc = ctypes.CDLL("libc.so.6") if args.trim else None
    print(f"loaded: peak {peak_rss_mib():.0f} MiB, current {current_rss_mib():.0f} MiB")
    for i in range(args.rounds):
        Path("/proc/self/clear_refs").write_text("5")   # Linux: VmHWM := VmRSS, so the peak is this call's
        start = time.perf_counter()
        gen.generate(_prompts(), **_options(args.num_beams))
        wall, peak = time.perf_counter() - start, _vm_hwm_mib()
        if libc is not None:
            libc.malloc_trim(0)
        print(f"call {i}: {wall:.2f} s, peak {peak:.0f} MiB, current {current_rss_mib():.0f} MiB after the call"
              + (" and malloc_trim" if libc is not None else ""))


def prefill(args) -> None:
    """Grouped prefill (ort_kv.prefill_groups) vs one padded prefill run, same generator, interleaved."""
    from deploylm.backends import onnx_backend
    from deploylm.generator import load

    gen = load(args.artifact, backend="onnx", threads=2)
    prompts = _prompts()
    if args.long_prompt:                               # the last prompt replaced by all of them, twice over
        prompts = prompts[:7] + [" ".join(prompts) * 2]
    print("prompt tokens:", [gen.count_tokens(p) for p in prompts])
    grouped = onnx_backend.prefill_groups
    policies = {"one run": lambda lengths: [list(range(len(lengths)))], "grouped": grouped}
    options, backend_prefill = _options(args.num_beams), gen.backend.prefill
    prefills: dict[str, list[float]] = collections.defaultdict(list)
    walls: dict[str, list[float]] = collections.defaultdict(list)

    def timed_prefill(batch, name):
        start = time.perf_counter()
        out = backend_prefill(batch)
        prefills[name].append(time.perf_counter() - start)
        return out

    for warm in (True, *([False] * args.rounds)):
        for name, policy in policies.items():
            onnx_backend.prefill_groups = policy
            gen.backend.prefill = lambda batch, name=name: timed_prefill(batch, name)
            start = time.perf_counter()
            gen.generate(prompts, **options)
            if warm:
                prefills[name].clear()
            else:
                walls[name].append(time.perf_counter() - start)
    onnx_backend.prefill_groups, gen.backend.prefill = grouped, backend_prefill
    base = statistics.median(walls["one run"])
    for name in policies:
        wall = statistics.median(walls[name])
        print(f"{name:>8}: prefill {1e3 * statistics.median(prefills[name]):.0f} ms, whole call {wall:.3f} s "
              f"(x{base / wall:.3f}; rounds {', '.join(f'{t:.2f}' for t in walls[name])})")


class _TimedSession:
    """An ORT session whose run_with_iobinding appends its seconds to `runs` (everything else passes through)."""

    def __init__(self, session, runs: list[float]):
        self.session, self.runs = session, runs

    def run_with_iobinding(self, iobinding):
        start = time.perf_counter()
        self.session.run_with_iobinding(iobinding)
        self.runs.append(time.perf_counter() - start)

    def __getattr__(self, attr):
        return getattr(self.session, attr)


def _interleaved(gen, variants: dict, apply, options: dict, rounds: int) -> dict[str, list[float]]:
    """Wall times of `rounds` generate calls per variant, interleaved (the order alternates each round),
    after one warm-up call each; `apply(value)` switches to a variant. Checks the variants return the
    same tokens and scores."""
    results, walls = {}, collections.defaultdict(list)
    for name, value in variants.items():
        apply(value)
        results[name] = [[(h.token_ids, h.score) for h in r.sequences] for r in gen.generate(_prompts(), **options)]
    names = list(variants)
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            apply(variants[name])
            walls[name].append(_timed(gen, options)[0])
    same = all(results[n] == results[names[0]] for n in names)
    print(f"num_beams {options['num_beams']}, {rounds} rounds after a warm-up, load average "
          f"{os.getloadavg()[0]:.1f}; same tokens and scores: {same}")
    base = statistics.median(walls[names[0]])
    for name, ts in walls.items():
        print(f"  {name:26s} median {statistics.median(ts):.3f} s (x{base / statistics.median(ts):.3f}; "
              f"{', '.join(f'{t:.2f}' for t in ts)})")
    return walls


def binding(args) -> None:
    """The per-thread IO binding that rebinds only what moved (fifth session) vs a fresh binding of every
    input and output per run (before): time per run spent in `_run` outside ONNX Runtime's own run, then
    whole calls interleaved."""
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.generator import load

    gen = load(args.artifact, backend="onnx", threads=2)
    kept, run = OnnxBackend._binding, OnnxBackend._run

    def fresh(self, file):
        return self.sessions[file].io_binding(), {}

    policies = {"fresh binding per run": fresh, "kept binding": kept}
    inside: list[float] = []
    outside: dict[str, list[float]] = collections.defaultdict(list)
    def timed_run(self, *a, **k):
        inside.clear()
        start = time.perf_counter()
        out = run(self, *a, **k)
        outside[self._policy].append(time.perf_counter() - start - sum(inside))
        return out

    sessions = gen.backend.sessions
    gen.backend.sessions = {f: _TimedSession(sess, inside) for f, sess in sessions.items()}
    OnnxBackend._run = timed_run
    for r in range(2 * args.rounds):
        name = list(policies)[r % 2]
        OnnxBackend._binding, gen.backend._policy = policies[name], name
        gen.generate(_prompts(), **_options(args.num_beams))
    OnnxBackend._run, gen.backend.sessions = run, sessions
    for name, ts in outside.items():
        print(f"  {name:26s} {1e3 * statistics.median(ts):.3f} ms per run in _run outside ORT (median of {len(ts)})")
    _interleaved(gen, policies, lambda policy: setattr(OnnxBackend, "_binding", policy), _options(args.num_beams), args.rounds)
    OnnxBackend._binding = kept


def artifacts(args) -> None:
    """Two artifacts (e.g. before/after an export change) in one process, calls interleaved: wall time and
    the time inside ONNX Runtime's runs per call, and the median run of a decode step."""
    from deploylm.generator import load

    if len(args.compare) != 2:
        raise SystemExit("artifacts needs --compare A B (two artifact folders)")
    runs: dict[str, list[float]] = {}
    gens = {}
    for name in args.compare:
        runs[name] = []
        gens[name] = load(name, backend="onnx", threads=2)
        gens[name].backend.sessions = {f: _TimedSession(sess, runs[name]) for f, sess in gens[name].backend.sessions.items()}
    options = _options(args.num_beams)
    results = {name: [[(h.token_ids, h.score) for h in r.sequences] for r in gen.generate(_prompts(), **options)]
               for name, gen in gens.items()}
    walls, inside, steps = (collections.defaultdict(list) for _ in range(3))
    for r in range(args.rounds):
        for name in (args.compare if r % 2 == 0 else args.compare[::-1]):
            runs[name].clear()
            walls[name].append(_timed(gens[name], options)[0])
            inside[name].append(sum(runs[name]))
            steps[name].append(statistics.median(runs[name][1:]))
    a, b = args.compare
    print(f"num_beams {args.num_beams}, {args.rounds} rounds after a warm-up, load average {os.getloadavg()[0]:.1f}; "
          f"same tokens and scores: {results[a] == results[b]}")
    for name in args.compare:
        print(f"  {name}: wall {statistics.median(walls[name]):.3f} s (x{statistics.median(walls[a]) / statistics.median(walls[name]):.3f}), "
              f"inside ORT {statistics.median(inside[name]):.3f} s, decode run p50 {1e3 * statistics.median(steps[name]):.2f} ms "
              f"(x{statistics.median(steps[a]) / statistics.median(steps[name]):.3f})")


def room(args) -> None:
    """K/V buffers with APPEND_ROOM positions of room, grown in place (fifth session), vs no room (a new
    buffer at every growth, as before): whole calls interleaved in one process."""
    from deploylm.backends import ort_kv
    from deploylm.generator import load

    gen = load(args.artifact, backend="onnx", threads=2)
    default = ort_kv.APPEND_ROOM
    variants = {"no room (new buffers)": 0, f"room {default} (in place)": default}
    _interleaved(gen, variants, lambda value: setattr(ort_kv, "APPEND_ROOM", value), _options(args.num_beams), args.rounds)
    ort_kv.APPEND_ROOM = default


def lookup(args) -> None:
    from deploylm.generator import load

    report = json.loads(Path(args.bench_json).read_text())
    row = next(r for r in report["rows"] if Path(r["src"]).resolve() == Path(args.artifact).resolve())
    outputs = row["rounds"][0]["token_ids"]
    gen = load(args.artifact, backend="onnx")
    batch = gen.encode(_prompts(), gen.options(num_beams=1))
    for proposed in (2, 3, 4):
        for n in (2, 3):
            steps = total = 0
            for b, out in enumerate(outputs):
                context = batch.input_ids[b][batch.attention_mask[b] == 1].tolist()
                i = 0
                while i < len(out):
                    draft, tail = [], context[-n:]
                    for j in range(len(context) - n - 1, -1, -1):                 # latest earlier match
                        if context[j:j + n] == tail:
                            draft = context[j + n:j + n + proposed]
                            break
                    accepted = 0
                    while accepted < len(draft) and i + accepted < len(out) and draft[accepted] == out[i + accepted]:
                        accepted += 1
                    advance = min(accepted + 1, len(out) - i)                      # + the verifier's own token
                    context += out[i:i + advance]
                    i += advance
                    steps += 1
                total += len(out)
            print(f"{proposed} proposed, {n}-gram match: {total / steps:.2f} tokens per verification step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("threads", "reorders", "rss", "lookup", "prefill", "binding", "room", "artifacts"))
    parser.add_argument("--artifact", default=str(ROOT / "export" / "smollm2-fp32-v2"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--bench-json", help="lookup: a `deploylm bench --num-beams 1 --json` report")
    parser.add_argument("--trim", action="store_true", help="rss: call glibc's malloc_trim(0) after every call")
    parser.add_argument("--compare", nargs="+", default=[], metavar="ARTIFACT", help="artifacts: the two artifacts")
    parser.add_argument("--room", type=int, help="rss: K/V room in positions (ort_kv.APPEND_ROOM; 0 = a new buffer per growth)")
    parser.add_argument("--long-prompt", action="store_true", help="prefill: one prompt of ~460 tokens among short ones")
    args = parser.parse_args()
    if args.what == "lookup" and not args.bench_json:
        parser.error("lookup needs --bench-json FILE")
    {"threads": threads, "reorders": reorders, "rss": rss, "lookup": lookup,
     "prefill": prefill, "binding": binding, "room": room,
     "artifacts": artifacts}[args.what](args)


if __name__ == "__main__":
    main()
