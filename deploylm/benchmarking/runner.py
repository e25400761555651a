"""`run_bench`: open every row, warm each up, then interleave the timed rounds (A, B, C, A, B, C, ...).

Rows are opened (each in its own worker process unless `config.isolate` is off; the workers load
side by side), warmed up `config.warmup` times in row order, then measured `config.rounds` times, one row at a time,
in the same order every round, so slow drifts of the machine (other jobs, thermal) spread over every
row instead of landing on one.
"""
from __future__ import annotations

import datetime as _dt
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from deploylm.benchmarking.machine import load_average, machine_info, versions
from deploylm.benchmarking.report import BenchReport, compare, summarize
from deploylm.benchmarking.workload import FIXED_LENGTH_NOTE, STANDARD_PROMPTS, BenchConfig, RowSpec, Workload, plan_rows, workload_of
from deploylm.errors import OptionError, UsageError

OpenRunner = Callable[[RowSpec, Workload], Any]   # -> object with run() -> RoundResult, close(), load_s, rss_after_load_mib
Progress = Callable[[str], None]


def run_bench(config: BenchConfig, *, open_runner: OpenRunner | None = None,
              progress: Progress | None = None) -> BenchReport:
    """Run the benchmark `config` describes; `open_runner` replaces how rows are opened (tests)."""
    specs = plan_rows(config)
    workload = workload_of(config)
    say = progress or (lambda _: None)
    machine = machine_info(config.threads)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    in_process = not config.isolate and open_runner is None
    with _threads(config.threads, in_process), _quiet(in_process):
        opener = open_runner or _default_opener(config.isolate)
        rounds, memory = _measure(specs, workload, opener, config, say)
    rows = compare([summarize(s, rounds[i], *memory[i]) for i, s in enumerate(specs)])
    machine["load_average_end"] = load_average()
    isolated = config.isolate and open_runner is None
    return BenchReport(date=started, machine=machine, versions=versions(), workload=_workload_dict(config),
                       rows=tuple(rows), rss_scope="row" if isolated else "process",
                       process_peak_rss_mib=None if isolated else _process_peak(), notes=_notes(config, isolated))


def _measure(specs: list[RowSpec], workload: Workload, opener: OpenRunner, config: BenchConfig,
             say: Progress) -> tuple[list[list[Any]], list[tuple[float, float | None, float | None]]]:
    """Per row its measured rounds and (load_s, rss_after_load_mib, peak_rss_mib)."""
    with ExitStack() as stack:
        runners = []
        for spec in specs:
            say(f"loading {spec.label}")
            runner = opener(spec, workload)
            stack.callback(_kill, runner)
            runners.append(runner)
        for spec, runner in zip(specs, runners):
            with _named(spec):
                getattr(runner, "ready", lambda: None)()     # worker processes load side by side
        for n in range(config.warmup):
            for spec, runner in zip(specs, runners):
                say(f"warm-up {n + 1}/{config.warmup}: {spec.label}")
                with _named(spec):
                    runner.run()
        rounds: list[list[Any]] = [[] for _ in specs]
        for n in range(config.rounds):
            for i, (spec, runner) in enumerate(zip(specs, runners)):
                say(f"round {n + 1}/{config.rounds}: {spec.label}")
                with _named(spec):
                    rounds[i].append(runner.run())
        memory = [(r.load_s, r.rss_after_load_mib, r.close()) for r in runners]
    return rounds, memory


@contextmanager
def _named(spec: RowSpec) -> Iterator[None]:
    """A row's refusal of the workload (a prompt over its window, say) names the row, and advises what bench
    offers: shorter prompts (--prompts) or fewer new tokens, not generate's truncation option."""
    try:
        yield
    except UsageError as exc:
        from deploylm.long_inputs import prompts_flags_advice, without_truncation_advice

        message = without_truncation_advice(str(exc))
        if message.startswith("prompt "):
            message = prompts_flags_advice(message, "bench")
        if isinstance(exc, OptionError):   # still about an option: the CLI names it by bench's flag (--max-new-tokens)
            raise OptionError(f"{spec.label}: {message}", exc.option) from None
        raise UsageError(f"{spec.label}: {message}") from None


def _default_opener(isolate: bool) -> OpenRunner:
    if isolate:
        from deploylm.benchmarking.worker import ProcessRunner

        return ProcessRunner
    from deploylm.benchmarking.measure import open_local_runner

    return open_local_runner


def _kill(runner: Any) -> None:
    """Stop a worker left running by an error (a closed one is already gone)."""
    kill = getattr(runner, "kill", None)
    if kill is not None:
        kill()


@contextmanager
def _threads(threads: int, apply: bool) -> Iterator[None]:
    """torch's intra-op threads for rows run in this process, restored afterwards."""
    if not apply:
        yield
        return
    from deploylm.decoding.threads import torch_threads

    with torch_threads(threads):
        yield


@contextmanager
def _quiet(apply: bool) -> Iterator[None]:
    """transformers quiet while rows run in this process, as it was afterwards."""
    if not apply:
        yield
        return
    from deploylm.benchmarking.worker import quiet_libraries

    with quiet_libraries():
        yield


def _process_peak() -> float:
    from deploylm.benchmarking.worker import peak_rss_mib

    return peak_rss_mib()


def _workload_dict(config: BenchConfig) -> dict[str, Any]:
    batches = config.batches()
    return {"prompts": len(config.prompts), "prompt_texts": list(config.prompts),
            "standard_prompts": config.prompts == STANDARD_PROMPTS,
            "batch_size": config.batch_size, "calls_per_round": len(batches),
            "requests_per_round": sum(len(b) for b in batches), "options": config.options().to_dict(),
            "rounds": config.rounds, "warmup": config.warmup, "threads": config.threads, "spin": config.spin,
            "models": list(config.models), "backends": list(config.backends)}


def _notes(config: BenchConfig, isolated: bool) -> tuple[str, ...]:
    ratio = ("ratio = tokens/s ÷ transformers.generate's on the same original model in this run; "
             if config.reference else "")
    notes = [FIXED_LENGTH_NOTE,
             f"tokens/s counts the best sequence per prompt; {ratio}decoder = time outside backend/model calls",
             "peak RSS: each row's own worker process (imports + model + its runs)" if isolated else
             "peak RSS per row not measured: every row ran in this process (see process_peak_rss_mib)"]
    if config.rounds < 3:
        notes.append(f"only {config.rounds} round(s): the standard measurement is the median of >= 3")
    return tuple(notes)
