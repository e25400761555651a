"""torch -> ONNX: pick the graphs for a model, build example inputs from the IO spec, export each graph.

`torch.onnx.export(dynamo=True)` with `dynamic_shapes` from the IO spec. Example sizes are all ≥ 2
and distinct (a size of 1, or two equal sizes, would silently fix or tie axes); the past is a
`Dim(min=0)` so the same graph takes an empty past on the first step.
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from deploylm.errors import UsageError
from deploylm.export import attention_ops
from deploylm.export.graph_optimize import optimize_exported
from deploylm.export.io_spec import AXIS_MIN, GraphSpec, ModelDims, TensorSpec, graph_specs

DEFAULT_OPSET = 18
# Graphs whose weights reach this size keep them in `<graph>.data` next to the graph (ONNX external data)
# instead of inside the protobuf: ONNX Runtime then opens the graph without parsing a protobuf copy of
# every weight, and maps the embedding table (read only by a Gather) from the file instead of copying it.
# SmolLM2 fp32 in an onnx worker (issue 7): load peak 912 vs 1303 MiB, resident after loading 912 vs 1021; in
# a long run the embedding pages the Gather touches become resident again (+~85 MiB of file pages).
# Small graphs (tests, toy models) stay one file. Above 2 GiB (protobuf's limit) it is required anyway.
EXTERNAL_DATA_BYTES = 32 * 1024**2
# sizes used to trace: every axis ≥ 2 and distinct from the others it could be confused with
EXPORT_SIZES = {"batch": 2, "seq": 3, "past": 4, "src": 5, "rows": 6, "enc_batch": 3}
# the shared-prompt layout's rows are prompts × beams: 8 rows of 2 prompts (4 beams each), 7 prompt positions
SHARED_EXPORT_SIZES = {"batch": 8, "prompts": 2, "plen": 7}


@dataclass(frozen=True)
class GraphPlan:
    """What to export for one model: kind, sizes, and (spec, module) per graph file."""

    kind: str                      # "decoder-only" | "encoder-decoder"
    family: str                    # "hf" | "seed"
    dims: ModelDims
    cross_rows: str                # "enc_batch" (seed) | "rows" (HF enc-dec); unused for decoder-only
    graphs: tuple[tuple[GraphSpec, nn.Module], ...]

    @property
    def specs(self) -> tuple[GraphSpec, ...]:
        return tuple(spec for spec, _ in self.graphs)


def plan_graphs(model: nn.Module) -> GraphPlan:
    """The graphs for a loaded torch model: HF causal / enc-dec, or deploylm's own models."""
    from deploylm.export import hf_graphs, seed_graphs
    from deploylm.models.causal_lm import CausalTransformerLM
    from deploylm.models.transformer import Seq2SeqTransformer

    model = model.eval()
    if isinstance(model, Seq2SeqTransformer):
        dims = seed_graphs.seed_dims(model.config)
        modules = (seed_graphs.SeedEncoderGraph(model), seed_graphs.SeedDecoderGraph(model, dims.n_layers))
        return _plan("encoder-decoder", "seed", dims, "enc_batch", modules)
    if isinstance(model, CausalTransformerLM):
        dims = seed_graphs.seed_dims(model.config)
        return _plan("decoder-only", "seed", dims, "enc_batch", (seed_graphs.SeedCausalGraph(model),))
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise UsageError(f"cannot export a {type(model).__name__}: expected a transformers model or a deploylm model")
    hf_graphs.check_exportable(model)
    if getattr(config, "is_encoder_decoder", False):
        dims = hf_graphs.hf_seq2seq_dims(model)
        modules = (hf_graphs.HFEncoderGraph(model), hf_graphs.HFDecoderGraph(model, dims.n_layers))
        return _plan("encoder-decoder", "hf", dims, "rows", modules)
    dims = hf_graphs.hf_causal_dims(model)              # its kv_layout: the graph's (one decision)
    return _plan("decoder-only", "hf", dims, "enc_batch", (hf_graphs.HFCausalGraph(model, dims.kv_layout),))


def _plan(kind: str, family: str, dims: ModelDims, cross_rows: str, modules: tuple[nn.Module, ...]) -> GraphPlan:
    specs = graph_specs(kind, dims, cross_rows)
    return GraphPlan(kind, family, dims, cross_rows, tuple(zip(specs, modules)))


def _mask(spec: TensorSpec, shape: list[int]) -> Tensor:
    """Ones with padding: left-padded row 0 for a [batch, total] mask, right-padded last row otherwise."""
    mask = torch.ones(shape, dtype=torch.long)
    rows, length = shape
    if rows > 1 and length > 2:
        if spec.axes[1] == "total":
            mask[0, :2] = 0
        else:
            mask[-1, -1] = 0
    return mask


def example_inputs(spec: GraphSpec, sizes: dict[str, int], vocab_size: int, seed: int = 0) -> tuple[Tensor, ...]:
    """Inputs in spec order. sizes gives each dynamic axis; total = (plen +) past + seq is derived."""
    shared = any("plen" in t.axes for t in spec.inputs)                  # the shared-prompt layout
    sizes = {"prompts": sizes.get("batch", 1), "plen": 0, **sizes} if shared else {**sizes, "plen": 0}
    sizes["total"] = sizes["plen"] + sizes["past"] + sizes["seq"]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for t in spec.inputs:
        shape = [sizes[a] if isinstance(a, str) else a for a in t.axes]
        if t.name == "input_ids":
            tensors[t.name] = torch.randint(0, vocab_size, shape, generator=gen)
        elif t.name.endswith("attention_mask"):
            tensors[t.name] = _mask(t, shape)
        elif t.name == "position_ids":
            positions = (tensors["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # [B, P+T]
            tensors[t.name] = positions[:, positions.shape[1] - shape[1]:].contiguous()
        else:
            tensors[t.name] = torch.randn(shape, generator=gen)
    return tuple(tensors[t.name] for t in spec.inputs)


def dynamic_shapes(spec: GraphSpec) -> dict[str, tuple[dict[int, object], ...]]:
    """torch.export dynamic_shapes for a wrapper whose forward takes `*inputs` in spec order."""
    dims = {name: torch.export.Dim(name, min=low) for name, low in AXIS_MIN.items()}
    return {"inputs": tuple({i: dims[a] for i, a in t.dynamic_axes.items()} for t in spec.inputs)}


def export_graph(module: nn.Module, spec: GraphSpec, out_dir: Path, vocab_size: int,
                 opset: int = DEFAULT_OPSET) -> Path:
    """Export one graph to out_dir/spec.file (weights of EXTERNAL_DATA_BYTES or more in spec.file + ".data")."""
    shared = any("plen" in t.axes for t in spec.inputs)
    args = example_inputs(spec, {**EXPORT_SIZES, **(SHARED_EXPORT_SIZES if shared else {})}, vocab_size)
    path = Path(out_dir) / spec.file
    n_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with torch.no_grad(), warnings.catch_warnings(), _quiet_torch_onnx(), _interrupts_stay_interrupts():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes(spec), opset_version=opset,
            input_names=spec.input_names, output_names=spec.output_names, optimize=False, verbose=False,
            custom_translation_table=attention_ops.TRANSLATIONS,
        )
        optimize_exported(program)   # optimize=True's passes without its quadratic rule (graph_optimize.py)
    program.save(path, external_data=n_bytes >= EXTERNAL_DATA_BYTES)
    _name_output_axes(path, spec)
    return path


@contextlib.contextmanager
def _interrupts_stay_interrupts() -> Iterator[None]:
    """Ctrl-C while torch.export imports its modules can surface as the exporter's own error ("Failed to
    export the model ... partially initialized module", a long traceback asking for a PyTorch PR): the
    interrupt was swallowed on the way. An export that fails after a SIGINT arrived (or whose error
    chain holds the interrupt) raises KeyboardInterrupt instead, which the CLI reports as "Aborted!"."""
    interrupted: list[bool] = []
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if callable(previous):
        def on_sigint(signum: int, frame: Any) -> None:
            interrupted.append(True)
            previous(signum, frame)

        signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    except Exception as exc:
        if interrupted or _holds_interrupt(exc):
            raise KeyboardInterrupt from None
        raise
    finally:
        if callable(previous):
            signal.signal(signal.SIGINT, previous)


def _holds_interrupt(exc: BaseException) -> bool:
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        if isinstance(link, KeyboardInterrupt):
            return True
        seen.add(id(link))
        link = link.__cause__ or link.__context__
    return False


def _name_output_axes(path: Path, spec: GraphSpec) -> None:
    """Give output dynamic axes the spec's names (the exporter writes expressions like 'past + seq')."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for value, tensor in zip(model.graph.output, spec.outputs):
        dims = value.type.tensor_type.shape.dim
        for i, axis in enumerate(tensor.axes):
            if isinstance(axis, str) and i < len(dims):
                dims[i].dim_param = axis
    onnx.save(model, str(path))


def save_graph(model: Any, path: Path, *, location: str | None = None, mode: int | None = None) -> Path:
    """Write a loaded graph as export writes its graphs: the weights in one data file beside it (`location`,
    default `<file>.data`) when `location` is given or they are EXTERNAL_DATA_BYTES or more (so a converted
    or quantized graph also escapes protobuf's 2 GiB); inline otherwise. The data file is written in small
    writes and gets `mode` (default: the graph's permissions): see finish_data_file."""
    import onnx

    path = Path(path)
    if location is None and not is_large(model):
        onnx.save(model, str(path))
        return path
    location = location or external_data_name(path)
    (path.parent / location).unlink(missing_ok=True)   # onnx appends to an existing file
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=1024)
    finish_data_file(path, location, mode)
    return path


def finish_data_file(path: Path, location: str | None = None, mode: int | None = None) -> None:
    """After onnx (or ONNX Runtime's quantizers) wrote a graph's data file: rewrite it in WRITE_CHUNK writes
    and give it `mode`, default the graph's own permissions (onnx creates it owner-only, which a service
    running as another user could not read). Nothing to do for a graph without one."""
    data = Path(path).parent / (location or external_data_name(path))
    if data.is_file():
        _rewrite_in_small_writes(data)
        data.chmod(Path(path).stat().st_mode & 0o777 if mode is None else mode)


WRITE_CHUNK = 1 << 16


def _rewrite_in_small_writes(data: Path) -> None:
    """Write `data` again in WRITE_CHUNK-byte writes (same bytes).

    onnx writes each tensor in one call; on Linux 6.x (ext4, large folios) a 113 MB write leaves the
    embedding in large page-cache folios, and ONNX Runtime maps external weights from the file: every
    embedding row a prompt's Gather touches then maps a whole folio. SmolLM2's bench prompts made 81 MiB
    of the file resident instead of 23 MiB (the same file written in 64 KiB writes, as torch's exporter
    leaves it), +58 MiB of peak RSS per process until the page cache drops the file.
    """
    staged = data.with_name(data.name + ".staged")
    data.rename(staged)
    with open(staged, "rb") as src, open(data, "wb") as dst:
        shutil.copyfileobj(src, dst, WRITE_CHUNK)
    staged.unlink()


def is_large(model: Any) -> bool:
    """True when a loaded graph's weights reach EXTERNAL_DATA_BYTES."""
    from onnx import numpy_helper

    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).nbytes
        if total >= EXTERNAL_DATA_BYTES:
            return True
    return False


def external_data_name(path: Path) -> str:
    return Path(path).name + ".data"


class _quiet_torch_onnx:
    """Silence torch.onnx's progress lines and torchvision notices while exporting."""

    def __enter__(self):
        self.loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)
