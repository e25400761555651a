"""The `trt` backend: TensorRT engines from an artifact's trt/ folder, KV cache in torch CUDA memory.

- The engine is deserialized once; one execution context runs every call on its own CUDA stream
  (`execute_async_v3`; TensorRT synchronizes the device around the legacy default stream), ordered
  after the caller's current torch stream and before its next work, selecting the optimization
  profile of the phase (prefill / decode).
- Inputs and outputs are torch tensors bound by address (`set_tensor_address`, 256-byte aligned);
  nothing is copied through the host. A shape outside the phase's profile is refused by name. The
  KV cache lives in ping-pong buffers (trt_buffers.KvPingPong), grown to what a call needs (up to
  the engine's maximum): each step reads `past_key_values.*` from one buffer and writes `present.*`
  into the other.
- `reorder` gathers the kept rows into the other buffer and swaps, so the next engine call reads
  the reordered cache; a state that was already advanced or reordered is refused.
Decoder-only artifacts (model.onnx -> trt/model.plan). TensorRT is imported via trt_env only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import torch
from torch import Tensor

from deploylm.backends.base import EncodedBatch, EngineLimits, ModelInfo
from deploylm.backends.torch_backend import is_identity
from deploylm.backends.trt_buffers import KvPingPong
from deploylm.errors import ArtifactError, UsageError
from deploylm.export.trt_env import (check_engines, current_trt_env, import_tensorrt, require_trt_gpu,
                                     torch_dtype_for, trt_dtype_name)
from deploylm.export.trt_shapes import KvBufferPlan, check_prefill, kv_buffer_plan


def pair_kv_names(inputs: list[str], outputs: list[str]) -> list[tuple[str, str]]:
    """(past input, present output) pairs: past_key_values.X <-> present.X, every past paired."""
    pairs = []
    for name in inputs:
        if name.startswith("past_key_values."):
            present = "present." + name[len("past_key_values."):]
            if present not in outputs:
                raise ArtifactError(f"engine input {name} has no matching output {present}")
            pairs.append((name, present))
    return pairs


@dataclass(frozen=True)
class TrtState:
    """Decoder state: the KV buffers (owned by this generation) and per-row bookkeeping."""

    kv: KvPingPong
    epoch: int                 # kv.epoch when this state was made; any other value = stale
    rows: int
    length: int                # cached tokens
    attention_mask: Tensor     # [R, length] int64
    next_pos: Tensor           # [R] int64, position id of the next token


class EngineRunner:
    """One engine and its execution context: bind torch tensors by address and run a phase."""

    def __init__(self, engine: Any, context: Any, phases: tuple[str, ...], device: torch.device, keep: Any = None):
        self.engine, self.context, self.phases, self.device = engine, context, phases, device
        self._keep = keep                                   # objects the engine must outlive (runtime)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if trt_dtype_name(engine.get_tensor_mode(n)) == "INPUT"]
        self.outputs = [n for n in names if n not in self.inputs]
        self.dtypes = {n: torch_dtype_for(engine.get_tensor_dtype(n)) for n in names}
        self._profile: int | None = None
        self._lock = threading.Lock()
        self._dummy = torch.zeros(1, device=device)         # an address for zero-size tensors
        self._side = torch.cuda.Stream(device) if device.type == "cuda" else None  # TensorRT's own stream

    def _bind(self, name: str, tensor: Tensor) -> None:
        self.context.set_tensor_address(name, tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr())

    def _held(self, name: str, tensor: Tensor) -> Tensor:
        """The input as the engine's dtype, dense, at a 256-byte aligned address (TensorRT's rule)."""
        held = tensor.to(self.dtypes[name]).contiguous()
        if self._side is not None and held.numel() and held.data_ptr() % ALIGNMENT:   # on CUDA
            held = held.clone()                              # a view at an offset: a fresh, aligned block
        return held

    def _set_shape(self, phase: str, index: int, name: str, shape: tuple[int, ...]) -> None:
        if self.context.set_input_shape(name, shape) is False:
            lo, _, hi = (tuple(s) for s in self.engine.get_tensor_profile_shape(name, index))
            raise UsageError(f"{name} of shape {shape} is outside the TensorRT engine's {phase} profile "
                             f"({lo} to {hi}): shorten the prompts, lower --batch-size/--num-beams, or re-export "
                             "with larger [tensorrt] shapes")

    def run(self, phase: str, feeds: Mapping[str, Tensor], outputs: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run `phase` with inputs `feeds`; outputs in `outputs` are written in place, the others
        (logits) allocated at the shape the engine reports. Returns every output."""
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ArtifactError(f"the TensorRT engine needs inputs {missing} that the trt backend does not provide")
        with self._lock, _on_device(self.device):
            caller = torch.cuda.current_stream(self.device) if self._side is not None else None
            held = {n: self._held(n, feeds[n]) for n in self.inputs}     # casts/copies queued on the caller's stream
            if self._side is not None:
                self._side.wait_stream(caller)                # inputs, those copies, buffers: the caller's first
            stream = self._side.cuda_stream if self._side is not None else 0
            index = self.phases.index(phase)
            if self._profile != index:
                try:                                          # TensorRT 10's binding raises where C++ returns false
                    selected = self.context.set_optimization_profile_async(index, stream) is not False
                except RuntimeError as exc:
                    raise RuntimeError(f"TensorRT could not select optimization profile {index} ({phase}): "
                                       f"{exc}") from None
                if not selected:
                    raise RuntimeError(f"TensorRT could not select optimization profile {index} ({phase})")
                self._profile = index
            for name, tensor in held.items():
                self._set_shape(phase, index, name, tuple(tensor.shape))
                self._bind(name, tensor)
            result = {}
            for name in self.outputs:
                shape = tuple(self.context.get_tensor_shape(name))
                out = outputs.get(name)
                if out is None:
                    out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
                elif tuple(out.shape) != shape or out.dtype != self.dtypes[name]:
                    raise RuntimeError(f"{name}: engine writes {shape} {self.dtypes[name]}, buffer is {tuple(out.shape)} {out.dtype}")
                self._bind(name, out)
                result[name] = out
            if not self.context.execute_async_v3(stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed in phase {phase}")
            if self._side is not None:
                caller.wait_stream(self._side)                # the caller's next work (and the reuse of
                                                              # `held`'s memory) waits for the engine
        return result


ALIGNMENT = 256                                               # bytes, for set_tensor_address


def _cuda_device(device: str | torch.device) -> torch.device:
    """`device` as a CUDA torch.device, or a UsageError: TensorRT reads every bound address as GPU memory."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type != "cuda":
        raise UsageError(f"device={str(device)!r}: the trt backend runs TensorRT engines on a CUDA GPU: expected "
                         "'cuda' or 'cuda:N' (the onnx and torch backends run on the CPU)")
    return parsed


def _on_device(device: torch.device) -> Any:
    """The CUDA device as current for the engine's calls (a no-op context off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


class TrtBackend:
    """Backend protocol over a decoder-only TensorRT engine (prefill and decode profiles)."""

    name = "trt"

    def __init__(self, runner: EngineRunner, info: ModelInfo, plan: KvBufferPlan):
        if plan.positions is not None and plan.prefill_tokens is not None:
            # the Generator checks a request against the engine's lengths before it decodes; without them the
            # engine would refuse the cache only once it outgrew the decode profile, after most of the work
            info = dataclasses.replace(info, engine=EngineLimits(plan.positions, plan.prefill_tokens))
        self.runner, self.info, self.plan = runner, info, plan
        self.device = runner.device
        self.pairs = pair_kv_names(runner.inputs, runner.outputs)
        self.kv_dtype = runner.dtypes[self.pairs[0][0]]
        self.generation_defaults: dict[str, Any] = {}

    @classmethod
    def from_source(cls, source: Any, *, device: str | torch.device = "cuda", rows: int | None = None,
                    **_options: Any) -> "TrtBackend":
        """Open an artifact exported with a trt-* profile (refuses missing TensorRT/CUDA or foreign engines).

        rows: most KV buffer rows (batch x beams) a call may use; default the engine's maximum.
        """
        from deploylm.artifact import load_artifact

        require_trt_gpu("the trt backend")
        device = _cuda_device(device)
        if getattr(source, "kind", None) != "artifact":
            raise UsageError(f"--backend trt needs an artifact folder with TensorRT engines, got a {source.kind} "
                             f"({source.path}): first run deploylm export --model {source.path} --profile trt-fp16")
        artifact = load_artifact(source.path)                         # checksums, IO signature
        check_engines(artifact.manifest, artifact.path, current_trt_env(device.index or 0))
        return cls.from_folder(artifact.path, artifact.manifest["tensorrt"], name=source.name,
                               generation=artifact.manifest.get("generation"), device=device, rows=rows)

    @classmethod
    def from_folder(cls, folder: Path, section: Mapping[str, Any], *, name: str,
                    generation: Mapping[str, Any] | None = None, device: str | torch.device = "cuda",
                    rows: int | None = None) -> "TrtBackend":
        """Open the engine described by a `tensorrt` manifest section in `folder` (export uses it on
        its temporary folder, before the manifest exists)."""
        from deploylm.backends.onnx_backend import artifact_info

        engines = {e["name"]: e for e in section.get("engines", [])}
        if "model" not in engines:
            raise UsageError(f"{folder}: the trt backend runs decoder-only artifacts (trt/model.plan); "
                             "use the onnx or torch backend for encoder-decoder models (--backend onnx, or "
                             "backend=\"onnx\" in deploylm.load)")
        entry, device = engines["model"], torch.device(device)
        runner = _load_runner(Path(folder), entry, device)
        pairs = pair_kv_names(runner.inputs, runner.outputs)
        if not pairs:
            raise ArtifactError(f"{folder}: the TensorRT engine has no past_key_values inputs")
        itemsize = torch.empty(0, dtype=runner.dtypes[pairs[0][0]]).element_size()
        vocab = int(tuple(runner.engine.get_tensor_shape("logits"))[-1])
        info, defaults = artifact_info(Path(folder), {"model.onnx": _LogitsShape(vocab)}, dict(generation or {}), name)
        backend = cls(runner, info, kv_buffer_plan(entry["shapes"], itemsize, rows))
        backend.generation_defaults = defaults
        return backend

    # ---- Backend protocol --------------------------------------------------------------------------

    def prefill(self, batch: EncodedBatch) -> tuple[Tensor, TrtState]:
        ids = batch.input_ids.to(self.device, torch.long)              # [B, T], left-padded
        mask = batch.attention_mask.to(self.device, torch.long)        # [B, T]
        rows, length = ids.shape
        check_prefill(rows, length, self.plan)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)                       # [B, T]
        kv = KvPingPong(self.plan, self.kv_dtype, self.device)
        logits = self._step("prefill", kv, rows, 0, length, ids, mask, pos)
        return logits, TrtState(kv, kv.epoch, rows, length, mask, pos[:, -1] + 1)

    def decode(self, tokens: Tensor, state: TrtState) -> tuple[Tensor, TrtState]:
        self._check(state)
        rows, past = state.rows, state.length
        ones = torch.ones(rows, 1, dtype=torch.long, device=self.device)
        mask = torch.cat([state.attention_mask, ones], dim=1)         # [R, P+1]
        ids = tokens.to(self.device, torch.long).view(rows, 1)         # [R, 1]
        logits = self._step("decode", state.kv, rows, past, 1, ids, mask, state.next_pos.view(rows, 1))
        return logits, TrtState(state.kv, state.kv.epoch, rows, past + 1, mask, state.next_pos + 1)

    def reorder(self, state: TrtState, beam_idx: Tensor) -> TrtState:
        self._check(state)
        idx = beam_idx.to(self.device, torch.long)                     # [R']
        if is_identity(idx, state.rows):                               # nothing moves: no copy
            return state
        state.kv.reorder(state.rows, state.length, idx)                # gather into the other buffer, swap
        return TrtState(state.kv, state.kv.epoch, int(idx.numel()), state.length,
                        state.attention_mask.index_select(0, idx), state.next_pos.index_select(0, idx))

    # ---- internals ---------------------------------------------------------------------------------

    def _step(self, phase: str, kv: KvPingPong, rows: int, past: int, new: int,
              ids: Tensor, mask: Tensor, pos: Tensor) -> Tensor:
        """One engine call: past [R, H, past, D] -> present [R, H, past+new, D]; logits [R, V] fp32."""
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        feeds.update({p: kv.past(p, rows, past) for p, _ in self.pairs})
        outs = {q: kv.present(p, rows, past + new) for p, q in self.pairs}
        result = self.runner.run(phase, {k: v for k, v in feeds.items() if k in self.runner.inputs}, outs)
        kv.swap()
        return result["logits"][:, -1, :].float()                     # [R, V]

    @staticmethod
    def _check(state: TrtState) -> None:
        if state.epoch != state.kv.epoch:
            raise RuntimeError("stale trt state: it was already advanced or reordered; use the state returned last")


class _LogitsShape:
    """What onnx_backend.artifact_info reads from a graph: the logits output's shape (vocab last)."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def get_outputs(self) -> list[Any]:
        return [SimpleNamespace(name="logits", shape=(None, 1, self.vocab))]


def _load_runner(folder: Path, entry: Mapping[str, Any], device: torch.device) -> EngineRunner:
    """Deserialize the engine once and create its execution context on `device`."""
    trt = import_tensorrt()
    path = folder / entry["file"]
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: re-export with a trt-* profile (deploylm export ... --force)")
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    with torch.cuda.device(device):
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise ArtifactError(f"{path}: TensorRT could not deserialize the engine: re-export it on this "
                                "machine (deploylm export ... --force)")
        context = engine.create_execution_context()
    return EngineRunner(engine, context, tuple(entry["phases"]), device, keep=runtime)
