"""The ONNX Runtime backend: runs an exported artifact (graph names from deploylm.export.io_spec).

- Sessions are created once per artifact and shared: ORT `run` is thread-safe, and every per-call
  value (KV cache, masks) lives in the State the decoder passes back in.
- Tensors cross the boundary without copies: inputs are bound by pointer from torch tensors and
  outputs are written by ORT into preallocated torch tensors (IO binding), on CPU or CUDA. Each thread
  keeps its binding per graph and binds a name again only when its tensor moved or changed shape.
- Decoder-only: prefill runs `model.onnx` on the prompts with an empty past (length 0): once for the
  batch, or, in the append layout, once per group of similar prompt lengths when cutting the batch
  saves more padding than the extra runs cost (ort_kv.prefill_groups); the groups' K/V are then put
  together as one left-padded cache (KVAppend.from_parts).
- Encoder-decoder: `encoder_model.onnx` runs once per input. deploylm's own graphs take the cross
  K/V at one row per input, so they are never copied per beam. Hugging Face graphs (T5, BART) take
  them at one row per beam: they are expanded once when beams are created and gathered again only
  when the input a row belongs to changes.
- Decoder-only K/V live in a preallocated arena (deploylm.backends.ort_kv). Graphs of the "shared-prompt"
  KV layout (io_spec.KV_SHARED: Hugging Face causal LMs) take each prompt's K/V once, as the prefill made
  them (KVShared), and the generated positions as the append layout below; the prompt rows become beams
  without a copy and beam reorders never move a prompt; with one row per prompt (greedy) the prompts are
  moved into the rows' buffer at the first step. Graphs of the "append" KV layout (io_spec.KV_APPEND:
  Hugging Face causal LMs exported before) read the arena's one buffer as their past
  (unwritten positions masked) and output only the new positions' K/V, which the backend writes into
  the buffer in place; its rows are slots, so a beam reorder copies only the extra children of a
  parent, and the graph runs in the slots' row order. Graphs of the "concat" layout (present = past +
  new) write each step's present into the arena's other buffer; a reorder copies the rows whose
  parent changed.
- Encoder-decoder `reorder` is a gather (index_select) on the batch axis, skipped when it would change nothing.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deploylm.backends.base import BackendStats, EncodedBatch, ModelInfo, SpecialTokens, State, check_threads
from deploylm.backends.ort_kv import KVAppend, KVCache, KVShared, prefill_groups
from deploylm.errors import ArtifactError, MissingDependencyError, UsageError
from deploylm.export import io_spec
from deploylm.models.hf import rope_depends_on_length
from deploylm.models.source import Source, resolve_source

OPT_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_OPT_LEVEL = "all"  # parity with PyTorch holds at ORT_ENABLE_ALL (tests/test_onnx_backend.py)
SPIN_US = 20  # spin=True: a worker spins this long for the next kernel, and never between runs (issue 7)


def physical_cores() -> int:
    try:
        import psutil

        return psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        return os.cpu_count() or 1


def check_providers(providers: Any) -> None:
    """`providers`: None (device decides) or a non-empty list of ONNX Runtime execution provider names; else a
    UsageError (a plain string would be read letter by letter, an unknown name ends in ORT's fallback to CPU)."""
    import onnxruntime as ort

    if providers is None:
        return
    known = ort.get_all_providers()
    if isinstance(providers, str) or not isinstance(providers, (list, tuple)) or not providers \
            or not all(isinstance(p, str) and p in known for p in providers):
        raise UsageError(f"providers={providers!r}: expected a list of ONNX Runtime execution providers, "
                         f"e.g. ['CPUExecutionProvider'] (this onnxruntime has {', '.join(ort.get_available_providers())})")


def create_session(path: Path, *, device: str = "cpu", threads: int | None = None,
                   providers: list[str] | None = None, opt_level: str = DEFAULT_OPT_LEVEL, spin: bool = False) -> Any:
    """An InferenceSession for one graph; CUDA is refused loudly when ORT would fall back to CPU.

    The intra-op threads sleep between kernels by default. spin=True lets them spin SPIN_US for the
    next kernel inside a run (and stop when the run returns): on 2 idle cores, greedy calls 1.07-1.10x
    and beam-4 calls 1.01-1.04x faster; beside one busy process, greedy 0.87-0.93x and beam 0.90x
    (ORT's own unbounded spinning: 0.58-0.65x). Values are the same either way (benchmarks/spin_ab.py,
    docs/benchmarks.md, issue 7).
    """
    import onnxruntime as ort

    if opt_level not in OPT_LEVELS:
        raise UsageError(f"onnx opt_level {opt_level!r}: expected one of {', '.join(OPT_LEVELS)}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")  # unbounded: 0.58x under load
    if spin:
        options.add_session_config_entry("session.intra_op.spin_duration_us", str(SPIN_US))
        options.add_session_config_entry("session.force_spinning_stop", "1")  # no spinning between runs
    options.enable_cpu_mem_arena = False  # the arena keeps its high-water mark: -60 MiB peak RSS, same speed (issue 7)
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, f"ORT_{'ENABLE_' if opt_level != 'disable' else ''}{opt_level.upper()}")
    options.log_severity_level = 3
    wanted = providers or (["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"])
    if "CUDAExecutionProvider" in wanted and "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependencyError("onnxruntime has no CUDAExecutionProvider here: pip install 'deploylm[gpu]' "
                                     "(onnxruntime-gpu) on a machine with a CUDA GPU, then pip uninstall -y "
                                     "onnxruntime && pip install --force-reinstall --no-deps onnxruntime-gpu "
                                     "(docs/gpu.md); or use --device cpu")
    session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
    if wanted[0] != "CPUExecutionProvider" and session.get_providers()[0] != wanted[0]:
        raise MissingDependencyError(f"onnxruntime could not start {wanted[0]} for {path} (it fell back to "
                                     f"{session.get_providers()[0]}): check the CUDA/cuDNN install or use --device cpu")
    return session


@dataclass(frozen=True)
class CausalState:
    """Decoder-only: R rows."""

    cache: KVCache | KVAppend | KVShared  # past_key_values.{i}.key/value in spec order, kv [2N, R, Hkv, P | capacity, Dh]
    attention_mask: Tensor    # [R, P] int64, P = positions written (the prompt's included)
    next_position: Tensor     # [R] int64

    @property
    def past(self) -> tuple[Tensor, ...]:
        return self.cache.past  # each [R, Hkv, P, Dh]


@dataclass(frozen=True)
class Seq2SeqState:
    """Encoder-decoder: R decoder rows over C rows of cross K/V (C = inputs for deploylm graphs)."""

    self_past: tuple[Tensor, ...]  # each [R, H, P, Dh]
    cross: tuple[Tensor, ...]      # each [C, H, S, Dh]
    src_mask: Tensor               # [C, S]
    row_input: Tensor              # [R] input each decoder row belongs to
    cross_input: Tensor            # [C] input each cross row holds
    clock: list[int] = field(default_factory=lambda: [0])   # one per generation: bumped by an in-place reorder
    epoch: int = 0                 # the clock when this state was made; older states' self_past may be rewritten

    def check_latest(self) -> None:
        if self.epoch != self.clock[0]:
            raise RuntimeError("onnx backend: this state was superseded by a later step of the same generation; "
                               "only the newest state can be advanced (its self-attention K/V were reordered in place)")


class _LayoutError(ArtifactError):
    """Graphs whose inputs/outputs this deploylm cannot run; from_folder turns it into an ArtifactError naming
    the command that rebuilds the artifact."""


class OnnxBackend:
    """Backend protocol over ONNX Runtime sessions of one artifact (see module docstring)."""

    name = "onnx"

    def __init__(self, path: Path, sessions: dict[str, Any], info: ModelInfo, device: torch.device,
                 generation_defaults: dict[str, Any] | None = None) -> None:
        self.path, self.sessions, self.info, self.device = path, sessions, info, device
        self.generation_defaults = dict(generation_defaults or {})
        self.stats = BackendStats()
        self.encoder_calls = 0  # inputs encoded (rows): tests check once per input
        self._io_device = ("cuda", device.index or 0) if device.type == "cuda" else ("cpu", 0)
        self._bindings = threading.local()  # per thread: {graph file: (IOBinding, {name: what is bound})}
        self._placeholder = torch.zeros(1, device=device)  # bound for empty tensors: ORT refuses a null buffer
        self._layout()

    @classmethod
    def from_source(cls, source: Source | str, *, device: str = "cpu", threads: int | None = None,
                    providers: list[str] | None = None, opt_level: str = DEFAULT_OPT_LEVEL, spin: bool = False,
                    **_: Any) -> "OnnxBackend":
        """Open an artifact folder (checksums verified) with CPU (default) or CUDA sessions.

        threads: intra-op threads (default: the physical cores); spin: see create_session."""
        from deploylm.artifact import load_artifact

        source = source if isinstance(source, Source) else resolve_source(source)
        if source.kind != "artifact":
            raise UsageError(f"model {str(source.path)!r} is {source.a_kind}, not an exported artifact: the onnx "
                             f"backend runs artifacts; export it first (deploylm export --model {source.path} --profile fp32)")
        if device not in ("cpu", "cuda"):
            raise UsageError(f"device {device!r}: expected cpu or cuda")
        check_threads(threads, "the physical cores")
        check_providers(providers)
        artifact = load_artifact(source.path)  # verifies checksums and graph IO against the manifest
        if device == "cpu":
            from deploylm.export.rowwise import warn_if_saturating

            warn_if_saturating(artifact.manifest, artifact.path)
        return cls.from_folder(artifact.path, name=source.name, generation=artifact.manifest.get("generation"),
                               device=device, threads=threads, providers=providers, opt_level=opt_level,
                               spin=spin, manifest=artifact.manifest)

    @classmethod
    def from_folder(cls, folder: Path, *, name: str, generation: dict[str, Any] | None = None, device: str = "cpu",
                    threads: int | None = None, providers: list[str] | None = None,
                    opt_level: str = DEFAULT_OPT_LEVEL, spin: bool = False,
                    manifest: dict[str, Any] | None = None) -> "OnnxBackend":
        """Open the graphs in `folder` without verifying a manifest (export uses it on its temporary folder).

        manifest: the artifact's, when there is one: graphs this deploylm cannot run are refused with the
        command that rebuilds the artifact (its source and profile)."""
        from deploylm.artifact import rebuild_hint

        folder = Path(folder)
        hint = rebuild_hint(folder, manifest) if manifest is not None else "re-export it with this deploylm (deploylm export)"
        files = [f for f in (io_spec.MODEL_FILE, io_spec.ENCODER_FILE, io_spec.DECODER_FILE) if (folder / f).is_file()]
        if not files or (io_spec.MODEL_FILE not in files and len(files) < 2):
            raise ArtifactError(f"{folder}: no complete set of ONNX graphs (expected {io_spec.MODEL_FILE} or "
                                f"{io_spec.ENCODER_FILE} + {io_spec.DECODER_FILE}); {hint}")
        sessions = {f: create_session(folder / f, device=device, threads=threads, providers=providers,
                                      opt_level=opt_level, spin=spin) for f in files}
        try:
            try:
                info, defaults = artifact_info(folder, sessions, generation or {}, name)
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                # transformers reading a config.json that is a JSON object but no model's configuration
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}" if str(exc) else type(exc).__name__
                raise ArtifactError(f"{folder}: config.json / generation_config.json do not describe the model "
                                    f"the graphs came from ({reason}); {hint}") from None
            return cls(folder, sessions, info, torch.device(device), defaults)
        except _LayoutError as exc:
            raise ArtifactError(f"{exc}; {hint}") from None

    def _layout(self) -> None:
        """Read layer count and fixed sizes from the graphs themselves."""
        self.is_seq2seq = io_spec.DECODER_FILE in self.sessions
        graph = self.sessions[io_spec.DECODER_FILE if self.is_seq2seq else io_spec.MODEL_FILE]
        shapes = {a.name: a.shape for a in graph.get_inputs()}
        part = "decoder" if self.is_seq2seq else ""
        self.n_layers = sum(1 for n in shapes if n.startswith("past_key_values.") and n.endswith(".key")
                            and (".decoder." in n or not self.is_seq2seq))
        expected = io_spec.past_names(max(self.n_layers, 1), part)[-1]
        if not self.n_layers or expected not in shapes:
            raise _LayoutError(f"{self.path}: graph inputs do not follow the IO spec (no {expected})")
        self._self_kv = shapes[io_spec.past_names(1, part)[0]]          # [rows, H, past, Dh]
        outputs = [o.name for o in graph.get_outputs()]
        self.kv_layout = io_spec.KV_CONCAT if self.is_seq2seq else io_spec.kv_layout(outputs, list(shapes))
        kv_out = (io_spec.new_kv_names(self.n_layers) if self.kv_layout in (io_spec.KV_APPEND, io_spec.KV_SHARED)
                  else io_spec.present_names(self.n_layers, part))
        if not set(kv_out) <= set(outputs):
            raise _LayoutError(f"{self.path}: graph outputs follow no KV layout of the IO spec (no {kv_out[-1]})")
        if self.kv_layout == io_spec.KV_SHARED and not set(io_spec.prompt_names(self.n_layers)) <= set(shapes):
            raise _LayoutError(f"{self.path}: graph inputs do not follow the IO spec's shared-prompt layout "
                               f"(no {io_spec.prompt_names(self.n_layers)[-1]})")
        self._cross_shared = self.is_seq2seq and shapes["encoder_attention_mask"][0] == "rows"
        if self.is_seq2seq:
            self._cross_kv = shapes[io_spec.past_names(1, "encoder")[0]]  # [enc_batch | rows, H, src, Dh]
        # a rotary embedding chosen by each call's longest position (Phi-3's longrope) must see the whole
        # batch in one prefill, as transformers does: grouped prefill would give short prompts other factors
        self._groups_prompts = (self.kv_layout in (io_spec.KV_APPEND, io_spec.KV_SHARED)
                                and not rope_depends_on_length(self._config()))

    def _config(self) -> dict[str, Any]:
        import json

        try:
            found = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return found if isinstance(found, dict) else {}

    # -- the Backend protocol -------------------------------------------------------------------
    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, State]:
        """Prompt (decoder-only) or encoder + decoder start (enc-dec) -> logits [B, V] fp32, state of B rows."""
        return self.stats.timed(self._prefill_seq2seq if self.is_seq2seq else self._prefill_causal, batch.to(self.device))

    def decode(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """tokens [R] -> logits [R, V] fp32 and the advanced state."""
        tokens = tokens.to(self.device, torch.long)
        return self.stats.timed(self._decode_seq2seq if self.is_seq2seq else self._decode_causal, tokens, state)

    def reorder(self, state: State, beam_idx: Tensor) -> State:
        """Keep rows beam_idx [R'] (gather on the batch axis)."""
        fn = self._reorder_seq2seq if self.is_seq2seq else self._reorder_causal
        return self.stats.timed(fn, state, beam_idx.to(self.device, torch.long))

    # -- running a graph ------------------------------------------------------------------------
    def _run(self, file: str, feeds: dict[str, Tensor], outputs: dict[str, tuple[int, ...] | Tensor]) -> dict[str, Tensor]:
        """Run one graph: inputs bound by pointer, outputs written into new torch tensors (given a
        shape) or into the given preallocated contiguous tensors.

        The IO binding is kept per thread and graph, and a name is bound again only when its pointer,
        shape or type changed: a decode step rebinds the ids, mask, positions and logits, and the K/V
        only after a growth or a change of rows (binding all 120 K/V names costs ~0.45 ms per step)."""
        import numpy as np

        binding, bound = self._binding(file)
        kind, index = self._io_device
        feeds = {n: t.contiguous() for n, t in feeds.items()}  # kept alive until the run returns
        for name, t in feeds.items():
            dtype = np.int64 if t.dtype == torch.long else np.float32
            what = ((t if t.numel() else self._placeholder).data_ptr(), tuple(t.shape), dtype)
            if bound.get(name) != what:
                binding.bind_input(name, kind, index, dtype, what[1], what[0])
                bound[name] = what
        result = {}
        for name, shape in outputs.items():
            out = shape if isinstance(shape, Tensor) else torch.empty(shape, dtype=torch.float32, device=self.device)
            what = ((out if out.numel() else self._placeholder).data_ptr(), tuple(out.shape), np.float32)
            if bound.get("out:" + name) != what:
                binding.bind_output(name, kind, index, np.float32, what[1], what[0])
                bound["out:" + name] = what
            result[name] = out
        if kind == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # inputs written by torch's stream are ready
        self.sessions[file].run_with_iobinding(binding)
        if kind == "cuda":
            binding.synchronize_outputs()
        return result

    def _binding(self, file: str) -> tuple[Any, dict[str, tuple]]:
        """This thread's IO binding of graph `file` and what each of its names is bound to."""
        per_thread = self._bindings.__dict__.setdefault("by_file", {})
        if file not in per_thread:
            per_thread[file] = (self.sessions[file].io_binding(), {})
        return per_thread[file]

    def _kv_shape(self, rows: int, length: int) -> tuple[int, int, int, int]:
        return (rows, int(self._self_kv[1]), length, int(self._self_kv[3]))

    def _empty_past(self, rows: int) -> tuple[Tensor, ...]:
        return tuple(torch.zeros(self._kv_shape(rows, 0), device=self.device) for _ in range(2 * self.n_layers))

    # -- decoder-only ---------------------------------------------------------------------------
    def _causal_step(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: KVCache) -> tuple[Tensor, KVCache]:
        """One run of model.onnx: ORT writes the present K/V straight into the arena's other buffer."""
        rows, total = mask.shape
        present = cache.next_buffer(rows, total)                                  # kv [2N, R, Hkv, P+T, Dh]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 **dict(zip(io_spec.past_names(self.n_layers), cache.past))}
        outputs = {"logits": (rows, 1, self.info.vocab_size), **dict(zip(io_spec.present_names(self.n_layers), present.past))}
        out = self._run(io_spec.MODEL_FILE, feeds, outputs)
        return out["logits"][:, 0, :], present                                    # [R, V]

    def _append_step(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: KVAppend) -> tuple[Tensor, KVAppend]:
        """One run of an append-layout model.onnx (see `_buffer_run`)."""
        cache.check_latest()
        return self._buffer_run(ids, mask, positions, cache)

    def _buffer_run(self, ids: Tensor, mask: Tensor, positions: Tensor, buffer: KVAppend,
                    shared: KVShared | None = None) -> tuple[Tensor, KVAppend]:
        """One run of a model.onnx that reads a past buffer (append and shared-prompt layouts): the past is
        the whole buffer (capacity C ≥ written L), positions L..C-1 masked; ORT writes the T new positions'
        K/V into scratch, then they are copied into the buffer at L.. . mask [R, Lp + L + T] (Lp: the
        prompts' positions of a shared-prompt graph, whose K/V `shared` holds; else 0) becomes
        [R, Lp + C + T]. ids, mask, positions and the logits are in the decoder's (logical) row order;
        the graph runs in the buffer's physical row order (KVAppend.slots)."""
        ids, mask, positions = buffer.to_physical(ids, mask, positions)            # the rows' slots
        rows, seq = ids.shape
        offset = shared.prompt_length if shared is not None else 0
        written, capacity = offset + buffer.length, offset + buffer.capacity
        if capacity > written:  # [R, Lp + C + T]: the unwritten positions masked out
            full = mask.new_zeros((rows, capacity + seq))
            full[:, :written], full[:, capacity:] = mask[:, :written], mask[:, written:]
            mask = full
        new = buffer.new_positions(seq)                                           # [2N, R, Hkv, T, Dh]
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 **dict(zip(io_spec.past_names(self.n_layers), buffer.past)),
                 **(dict(zip(io_spec.prompt_names(self.n_layers), shared.prompt)) if shared is not None else {})}
        outputs = {"logits": (rows, 1, self.info.vocab_size), **dict(zip(io_spec.new_kv_names(self.n_layers), new.unbind(0)))}
        logits = buffer.to_logical(self._run(io_spec.MODEL_FILE, feeds, outputs)["logits"][:, 0, :])  # [R, V]
        del feeds, outputs  # views of the buffers: a growth in `reserve` frees them one group at a time
        return logits, buffer.reserve(seq).append(new)

    def _shared_prefill_run(self, ids: Tensor, mask: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """One prefill run of a shared-prompt model.onnx (empty prompt and past): logits [B, V] and the
        prompts' K/V [2N, B, Hkv, T, Dh], written by ORT straight into the tensor they stay in."""
        rows, seq = ids.shape
        heads, head_dim = int(self._self_kv[1]), int(self._self_kv[3])
        empty = torch.zeros((rows, heads, 0, head_dim), device=self.device)
        kv = torch.empty((2 * self.n_layers, rows, heads, seq, head_dim), device=self.device)
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions,
                 **{n: empty for n in io_spec.past_names(self.n_layers)},
                 **{n: empty for n in io_spec.prompt_names(self.n_layers)}}
        outputs = {"logits": (rows, 1, self.info.vocab_size), **dict(zip(io_spec.new_kv_names(self.n_layers), kv.unbind(0)))}
        return self._run(io_spec.MODEL_FILE, feeds, outputs)["logits"][:, 0, :], kv

    def _shared_step(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: KVShared) -> tuple[Tensor, KVShared]:
        """One run of a shared-prompt model.onnx: the prompts' K/V [P, Hkv, Lp, Dh] as they are (or, for
        one row per prompt, first folded into the rows' buffer: KVShared.fold_prompt), the generated
        positions' buffer as in the append layout (`_buffer_run`)."""
        cache.generated.check_latest()
        if cache.one_row_per_prompt:   # greedy: the prompt's own products would only cost (fold_prompt)
            cache = cache.fold_prompt()
        logits, generated = self._buffer_run(ids, mask, positions, cache.generated, cache)
        return logits, cache.with_generated(generated)

    def _empty_causal_cache(self, rows: int) -> KVCache | KVAppend:
        kind = KVAppend if self.kv_layout == io_spec.KV_APPEND else KVCache
        return kind.empty(2 * self.n_layers, rows, int(self._self_kv[1]), int(self._self_kv[3]), self.device)

    def _prefill_causal(self, batch: EncodedBatch) -> tuple[Tensor, CausalState]:
        ids, mask = batch.input_ids, batch.attention_mask                        # [B, T]
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)               # [B, T]
        lengths = mask.sum(-1).tolist()                                           # [B] prompt lengths
        groups = prefill_groups(lengths) if self._groups_prompts else []
        if self.kv_layout == io_spec.KV_SHARED:
            logits, cache = self._shared_prefill(ids, mask, positions, groups if len(groups) > 1 else [], lengths)
        elif len(groups) > 1:
            logits, cache = self._grouped_prefill(ids, mask, positions, groups, lengths)
        else:
            step = self._append_step if self.kv_layout == io_spec.KV_APPEND else self._causal_step
            logits, cache = step(ids, mask, positions, self._empty_causal_cache(ids.shape[0]))
        return logits, CausalState(cache, mask, positions[:, -1] + 1)

    def _prefill_in_groups(self, ids: Tensor, mask: Tensor, positions: Tensor, groups: list[list[int]],
                           lengths: list[int], run: Any) -> tuple[Tensor, list[tuple[list[int], Tensor, int, Any]]]:
        """Prompts of very different lengths: one prefill `run(ids, mask, positions) -> (logits, part)` per group
        of similar lengths (ort_kv.prefill_groups), each cut to its own longest prompt, so the padding of short
        prompts to the longest one is not computed. Returns the logits [B, V] in row order and, per group, its
        rows, their index tensor, its width and its part."""
        rows, width = ids.shape
        logits = torch.empty((rows, self.info.vocab_size), device=self.device)     # [B, V]
        parts = []
        for group in groups:
            index = torch.tensor(group, device=self.device)
            own = max(1, max(lengths[r] for r in group))                           # its longest prompt
            part_logits, part = run(*(t.index_select(0, index)[:, width - own:] for t in (ids, mask, positions)))
            logits[index] = part_logits
            parts.append((group, index, own, part))
        return logits, parts

    def _grouped_prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, groups: list[list[int]],
                         lengths: list[int]) -> tuple[Tensor, KVAppend]:
        """`_prefill_in_groups` in the append layout: the parts' K/V put together as one left-padded cache."""
        logits, parts = self._prefill_in_groups(
            ids, mask, positions, groups, lengths,
            lambda *inputs: self._append_step(*inputs, self._empty_causal_cache(inputs[0].shape[0])))
        return logits, KVAppend.from_parts([(group, part) for group, _, _, part in parts], *ids.shape)

    def _shared_prefill(self, ids: Tensor, mask: Tensor, positions: Tensor, groups: list[list[int]],
                        lengths: list[int]) -> tuple[Tensor, KVShared]:
        """The prompts' K/V of a shared-prompt graph: one run, or one per group of similar prompt lengths
        (`_prefill_in_groups`), each group's K/V at the right end of its rows, zeros before (masked)."""
        if not groups:
            logits, kv = self._shared_prefill_run(ids, mask, positions)
            return logits, KVShared.from_prefill(kv)
        logits, parts = self._prefill_in_groups(ids, mask, positions, groups, lengths, self._shared_prefill_run)
        rows, width = ids.shape
        kv = torch.zeros((2 * self.n_layers, rows, int(self._self_kv[1]), width, int(self._self_kv[3])),
                         device=self.device)                                      # [2N, B, Hkv, T, Dh]
        for _, index, own, part in parts:
            kv[:, index, :, width - own:] = part
        return logits, KVShared.from_prefill(kv)

    def _decode_causal(self, tokens: Tensor, state: CausalState) -> tuple[Tensor, CausalState]:
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones((tokens.shape[0], 1))], dim=1)  # [R, P+1]
        step = {io_spec.KV_APPEND: self._append_step, io_spec.KV_SHARED: self._shared_step}.get(
            self.kv_layout, self._causal_step)
        logits, cache = step(tokens[:, None], mask, state.next_position[:, None], state.cache)
        return logits, CausalState(cache, mask, state.next_position + 1)

    def _reorder_causal(self, state: CausalState, beam_idx: Tensor) -> CausalState:
        if _is_identity(beam_idx, state.attention_mask.shape[0]):
            return state
        return CausalState(state.cache.reorder(beam_idx), state.attention_mask.index_select(0, beam_idx),
                           state.next_position.index_select(0, beam_idx))

    # -- encoder-decoder ------------------------------------------------------------------------
    def _prefill_seq2seq(self, batch: EncodedBatch) -> tuple[Tensor, Seq2SeqState]:
        ids, mask = batch.input_ids, batch.attention_mask                        # [B, S]
        rows, src = ids.shape
        names = io_spec.present_names(self.n_layers, "encoder")
        heads, head_dim = int(self._cross_kv[1]), int(self._cross_kv[3])
        out = self._run(io_spec.ENCODER_FILE, {"input_ids": ids, "attention_mask": mask},
                        {n: (rows, heads, src, head_dim) for n in names})
        self.encoder_calls += rows
        inputs = torch.arange(rows, device=self.device)
        state = Seq2SeqState(self._empty_past(rows), tuple(out[n] for n in names), mask, inputs, inputs)
        start = torch.full((rows,), self.info.special.decoder_start_token_id, dtype=torch.long, device=self.device)
        return self._decode_seq2seq(start, state)

    def _decode_seq2seq(self, tokens: Tensor, state: Seq2SeqState) -> tuple[Tensor, Seq2SeqState]:
        state.check_latest()
        rows, past_len = tokens.shape[0], state.self_past[0].shape[2]
        feeds = {"input_ids": tokens[:, None], "encoder_attention_mask": state.src_mask,
                 **dict(zip(io_spec.past_names(self.n_layers, "decoder"), state.self_past)),
                 **dict(zip(io_spec.past_names(self.n_layers, "encoder"), state.cross))}
        names = io_spec.present_names(self.n_layers, "decoder")
        out = self._run(io_spec.DECODER_FILE, feeds, {"logits": (rows, 1, self.info.vocab_size),
                                                      **{n: self._kv_shape(rows, past_len + 1) for n in names}})
        return out["logits"][:, 0, :], Seq2SeqState(tuple(out[n] for n in names), state.cross, state.src_mask,
                                                     state.row_input, state.cross_input, state.clock, state.clock[0])

    def _reorder_seq2seq(self, state: Seq2SeqState, beam_idx: Tensor) -> Seq2SeqState:
        """Rows beam_idx [R'] of the state. When R' = R and at most half the rows change, only those rows of
        the self-attention K/V move, in place (gather them, then scatter: no copy of the whole cache); the
        state passed in is then superseded. Otherwise a gather into new tensors. Cross K/V are shared."""
        state.check_latest()
        rows = state.row_input.shape[0]
        if _is_identity(beam_idx, rows):
            return state
        changed = (beam_idx != torch.arange(rows, device=beam_idx.device)).nonzero().squeeze(1) \
            if beam_idx.shape[0] == rows else None                                 # [Ch] rows whose parent changed
        epoch = state.epoch
        if changed is not None and 2 * changed.numel() <= rows:
            parents = beam_idx.index_select(0, changed)                          # [Ch]
            for t in state.self_past:                                             # each [R, H, P, Dh]
                t.index_copy_(0, changed, t.index_select(0, parents))
            self_past = state.self_past
            state.clock[0] += 1
            epoch = state.clock[0]
        else:
            self_past = tuple(t.index_select(0, beam_idx) for t in state.self_past)
        row_input = state.row_input.index_select(0, beam_idx)                    # [R']
        cross, src_mask, cross_input = state.cross, state.src_mask, state.cross_input
        if not self._cross_fits(row_input, cross_input):
            idx = (cross_input[None, :] == row_input[:, None]).long().argmax(1)  # [R'] first cross row of each input
            cross = tuple(t.index_select(0, idx) for t in cross)                  # one row per decoder row
            src_mask, cross_input = src_mask.index_select(0, idx), row_input
        return Seq2SeqState(self_past, cross, src_mask, row_input, cross_input, state.clock, epoch)

    def _cross_fits(self, row_input: Tensor, cross_input: Tensor) -> bool:
        """Can decoder rows read these cross rows as they are? (row r reads cross row r // (R / C))."""
        rows, cross_rows = row_input.shape[0], cross_input.shape[0]
        if rows % cross_rows or (self._cross_shared and rows != cross_rows):
            return False
        return bool(torch.equal(cross_input.repeat_interleave(rows // cross_rows), row_input))


def _is_identity(beam_idx: Tensor, rows: int) -> bool:
    return beam_idx.shape[0] == rows and bool(torch.equal(beam_idx, torch.arange(rows, device=beam_idx.device)))




def artifact_info(folder: Path, sessions: dict[str, Any], generation: dict[str, Any],
                  name: str) -> tuple[ModelInfo, dict[str, Any]]:
    """ModelInfo and generation defaults from config.json, generation_config.json and the graphs."""
    import json

    from deploylm.models.hf import decoding_defaults, generation_settings

    gen_file = folder / "generation_config.json"
    gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    graph = sessions.get(io_spec.DECODER_FILE) or sessions[io_spec.MODEL_FILE]
    logits = next((o for o in graph.get_outputs() if o.name == "logits"), None)
    if logits is None:
        raise _LayoutError(f"{folder}: the graph has no logits output, which the IO spec requires")
    vocab = logits.shape[-1] if logits.shape else None          # a dim name ('vocab') or None where not fixed
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise _LayoutError(f"{folder}: the graph's logits output has no fixed vocabulary size (last dimension "
                           f"{vocab!r}), which the IO spec requires")
    special, is_seq2seq, window = folder_special(folder)
    info = ModelInfo(is_encoder_decoder=is_seq2seq, vocab_size=vocab, special=special, max_positions=window,
                     name=name, generation=generation_settings(gen))  # model-level processors, as torch
    defaults = decoding_defaults(gen, name, given=generation)
    defaults.update(generation)
    return info, defaults


def folder_special(folder: Path) -> tuple[SpecialTokens, bool, int | None]:
    """(special tokens, is_encoder_decoder, position window) of an artifact folder, from its config.json and
    generation_config.json, as the backends resolve them for the model it came from."""
    import json

    from deploylm.backends.torch_seq2seq import seed_special_tokens

    config = json.loads((folder / "config.json").read_text())
    if str(config.get("model_type", "")).startswith("deploylm"):
        gen_file = folder / "generation_config.json"
        gen = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
        return seed_special_tokens(config, gen), config.get("arch") == "seq2seq", config.get("max_positions")
    return _hf_special(folder)


def _hf_special(path: Path) -> tuple[SpecialTokens, bool, int | None]:
    """Special tokens exactly as the torch backend resolves them (deploylm.models.hf.special_tokens):
    from config.json / generation_config.json without importing transformers where the model type
    allows (`special_tokens_from_files`), else through AutoConfig / GenerationConfig."""
    from types import SimpleNamespace

    from deploylm.models.hf import special_tokens_from_files

    found = special_tokens_from_files(path)
    if found is not None:
        return found

    from transformers import AutoConfig, GenerationConfig

    from deploylm.models.hf import position_window, special_tokens

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except OSError:
        gen = GenerationConfig.from_model_config(config)
    special = special_tokens(SimpleNamespace(config=config, generation_config=gen, name_or_path=str(path)))
    return special, bool(config.is_encoder_decoder), position_window(config)

