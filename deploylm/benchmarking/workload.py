"""What `deploylm bench` runs: the standard workload (DESIGN.md §9), the config, and the rows it plans.

Standard workload: the 8 English prompts below (13–53 tokens with SmolLM2's tokenizer), one
left-padded batch of 8, beam search with 4 beams, exactly 64 new tokens per prompt (EOS is banned
until then: min_new_tokens = max_new_tokens, so EOS never shortens a run), 2 threads.

A row is one (model, backend) pair, or the `transformers.generate` reference of a model: the SRC itself
for a Hugging Face folder or .gguf file, the model an artifact was exported from (its manifest's
source). Rows that share an original model share one reference row.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploylm.decoding.options import DecodingOptions
from deploylm.errors import UsageError

STANDARD_PROMPTS: tuple[str, ...] = (
    "The capital of France is Paris, and the capital of Italy is",
    "Write a short note to a neighbour asking them to water the plants.",
    "Explain in simple words why the sky looks blue on a clear day and red at sunset.",
    "A train leaves the station at nine in the morning and travels at sixty miles per hour. By noon, it has",
    "Here is a recipe for a simple vegetable soup that anyone can cook at home in under an hour, using only "
    "carrots, onions, potatoes and a little salt:",
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Its first major consequence was",
    "Dear hiring committee, I am writing to apply for the position of junior software engineer advertised on "
    "your website last week. Over the past two years I have built web applications in Python and JavaScript, "
    "and I would like to",
    "Summarise the following paragraph in one sentence. Rivers shape the land around them: over thousands of "
    "years they carve valleys, carry sand and silt to the sea, and build wide, fertile plains where farmers "
    "have grown crops since the first cities were founded. Summary:",
)
REFERENCE = "transformers"          # the backend name of reference rows
SPIN_CHOICES = ("off", "on", "both")
FIXED_LENGTH_NOTE = ("EOS is banned at every step (min_new_tokens = max_new_tokens): every prompt "
                     "generates exactly max_new_tokens tokens")


@dataclass(frozen=True)
class BenchConfig:
    """One `deploylm bench` run. `backends` empty: each model with its default backend."""

    models: tuple[str, ...]
    backends: tuple[str, ...] = ("torch", "onnx")
    prompts: tuple[str, ...] = STANDARD_PROMPTS
    batch_size: int = 8
    num_beams: int = 4
    max_new_tokens: int = 64
    rounds: int = 3
    warmup: int = 1
    threads: int = 2
    reference: bool = True
    isolate: bool = True            # each row in its own worker process (per-row peak RSS)
    spin: str = "off"               # onnx rows: ONNX Runtime threads spinning ("on"), not ("off"), or a row of each ("both")

    def __post_init__(self) -> None:
        from deploylm.backends import backend_names

        object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        object.__setattr__(self, "backends", tuple(self.backends))
        object.__setattr__(self, "prompts", tuple(self.prompts))
        if not self.models:
            raise UsageError("no model given: pass --model SRC (a checkpoint, Hugging Face folder, .gguf file or artifact)")
        for name in self.backends:
            if name not in backend_names():
                raise UsageError(f"--backends: unknown backend {name!r}: expected any of {', '.join(backend_names())}")
        if not self.prompts or not all(isinstance(p, str) and p.strip() for p in self.prompts):
            raise UsageError("prompts: expected at least one non-empty prompt")
        if self.spin not in SPIN_CHOICES:
            raise UsageError(f"--spin {self.spin!r}: expected one of {', '.join(SPIN_CHOICES)}")
        if self.spin != "off" and self.backends and "onnx" not in self.backends:
            raise UsageError(f"--spin {self.spin} applies to onnx rows (ONNX Runtime's threads): add onnx to --backends")
        for name, low in (("batch_size", 1), ("num_beams", 1), ("max_new_tokens", 1), ("rounds", 1),
                          ("warmup", 0), ("threads", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {low}")

    def options(self) -> DecodingOptions:
        """The decoding options of every row: deterministic search, exactly max_new_tokens tokens."""
        return DecodingOptions(num_beams=self.num_beams, max_new_tokens=self.max_new_tokens,
                               min_new_tokens=self.max_new_tokens)

    def batches(self) -> tuple[tuple[str, ...], ...]:
        """The calls of one round: the prompts in batches of batch_size; a batch larger than the
        prompt list is filled by repeating the prompts in order."""
        prompts, size = self.prompts, self.batch_size
        if size >= len(prompts):
            return (tuple(prompts[i % len(prompts)] for i in range(size)),)
        return tuple(prompts[i:i + size] for i in range(0, len(prompts), size))

    def prompt_numbers(self) -> tuple[tuple[int, ...], ...]:
        """For each prompt of each call of `batches()`, its number (from 1) in `prompts`: what a refusal of
        "prompt 2" of the third call is called in the user's prompt list."""
        count, size = len(self.prompts), self.batch_size
        if size >= count:
            return (tuple(i % count + 1 for i in range(size)),)
        return tuple(tuple(range(i + 1, min(i + size, count) + 1)) for i in range(0, count, size))


@dataclass(frozen=True)
class Workload:
    """What every row runs, sent to worker processes (picklable)."""

    batches: tuple[tuple[str, ...], ...]
    options: DecodingOptions
    threads: int
    numbers: tuple[tuple[int, ...], ...] = ()     # per call, each prompt's number in the prompt list

    @property
    def num_prompts(self) -> int:
        return sum(len(b) for b in self.batches)


@dataclass(frozen=True)
class RowSpec:
    """One benchmarked configuration. backend "transformers" = the `transformers.generate` reference."""

    label: str
    src: str
    backend: str
    profile: str
    reference: str | None = None            # label of this row's reference row (None: no reference)
    notes: tuple[str, ...] = field(default=())
    spin: bool = False                      # onnx: ONNX Runtime threads spin between kernels (load(spin=True))

    @property
    def is_reference(self) -> bool:
        return self.backend == REFERENCE


def workload_of(config: BenchConfig) -> Workload:
    return Workload(config.batches(), config.options(), config.threads, config.prompt_numbers())


def plan_rows(config: BenchConfig) -> list[RowSpec]:
    """The rows in run order: each model with each listed backend that can open it, then the references."""
    from deploylm.models.source import resolve_source

    rows: list[RowSpec] = []
    references: dict[str, RowSpec] = {}
    digests: dict[str, str | None] = {}     # an original model's weights hashed once, however many artifacts
    for src in config.models:
        source = resolve_source(src)
        runs_on = _runs_on(source)
        names = [b for b in (config.backends or (runs_on[0],)) if b in runs_on]
        if not names:
            why = (f"its profile {_profile(source)} was exported for {' and '.join(runs_on)}" if source.kind == "artifact"
                   else "it runs on torch (artifacts run on onnx or trt)")
            raise UsageError(f"--model {src}: none of --backends {','.join(config.backends)} runs {source.a_kind}: {why}")
        ref, notes = _reference_for(source, config.reference, references, digests)
        for name in names:
            if any(Path(r.src).resolve() == source.path.resolve() and r.backend == name for r in rows):
                raise UsageError(f"--model {src} with backend {name} is given twice: give each model once")
            for spin in _spins(config.spin if name == "onnx" else "off"):
                label = _unique(f"{source.name} [{name}{', spin' if spin else ''}]", rows)
                rows.append(RowSpec(label, str(source.path), name, _profile(source), ref and ref.label, notes, spin))
    if config.spin != "off" and not any(r.backend == "onnx" for r in rows):
        raise UsageError(f"--spin {config.spin} applies to onnx rows (ONNX Runtime's threads), and none of the models "
                         "runs on onnx (artifacts do): add an artifact, or drop --spin")
    return rows + list(references.values())


def _spins(choice: str) -> tuple[bool, ...]:
    return {"off": (False,), "on": (True,), "both": (False, True)}[choice]


def _runs_on(source: Any) -> tuple[str, ...]:
    """The backends that run `source`, the default first: torch for a model; for an artifact the onnx/trt
    backends its export profile was made for (a trt-* artifact's graphs on ONNX Runtime are not what its
    profile measures, and an onnx artifact has no engines for trt)."""
    if source.kind != "artifact":
        return ("torch",)
    from deploylm.artifact import read_manifest

    profile = read_manifest(source.path).get("profile")
    listed = profile.get("backends") if isinstance(profile, dict) else None
    names = tuple(b for b in (listed if isinstance(listed, list) else ["onnx"]) if b in ("onnx", "trt"))
    return names or ("onnx",)


def _profile(source: Any) -> str:
    """The artifact's export profile; a model run by the torch backend is fp32."""
    if source.kind != "artifact":
        return "fp32"
    from deploylm.artifact import read_manifest

    profile = read_manifest(source.path).get("profile") or {}
    return str(profile.get("name", "?")) if isinstance(profile, dict) else str(profile)


def _reference_for(source: Any, wanted: bool, references: dict[str, RowSpec],
                   digests: dict[str, str | None]) -> tuple[RowSpec | None, tuple[str, ...]]:
    """The reference row for `source` (created once per original model), or None and why."""
    if not wanted:
        return None, ()
    origin, why = original_model(source, digests)
    if origin is None:
        return None, (why,)
    key = str(origin.path.resolve())
    if key not in references:           # two origins of one name (copies at two paths) get #2, #3 ...
        label = _unique(f"{REFERENCE} ({origin.name})", list(references.values()))
        references[key] = RowSpec(label, str(origin.path), REFERENCE, "fp32")
    return references[key], ()


def original_model(source: Any, digests: dict[str, str | None] | None = None) -> tuple[Any, str]:
    """(Source of the Hugging Face/GGUF model transformers can run for `source`, "") or (None, why not).
    digests: weights_sha256 by resolved path, filled in (one hash per original model of a plan)."""
    from deploylm.artifact import read_manifest, weights_sha256
    from deploylm.models.source import resolve_source

    if source.kind == "artifact":
        recorded = read_manifest(source.path).get("source") or {}
        origin, digest = recorded.get("path"), recorded.get("weights_sha256")
        if not origin or not Path(origin).exists():
            return None, f"no transformers reference: the model this artifact was exported from ({origin}) is gone"
        if digest:
            digests = {} if digests is None else digests
            key = str(Path(origin).resolve())
            if key not in digests:
                digests[key] = weights_sha256(Path(origin))
            if digests[key] != digest:
                return None, (f"no transformers reference: the model at {origin} changed since this artifact was "
                              "exported (its weights' sha256 is not the manifest's), so it is another model")
        source = resolve_source(origin)
    if source.kind not in ("hf", "gguf"):
        return None, f"no transformers reference: {source.path} is a deploylm {source.kind}, which transformers cannot load"
    return source, ""


def _unique(label: str, rows: list[RowSpec]) -> str:
    taken = {r.label for r in rows}
    n, out = 2, label
    while out in taken:
        out, n = f"{label} #{n}", n + 1
    return out
