"""int8 / int4 quantization of ONNX graphs with onnxruntime's quantization tools.

- dynamic (int8): `quantize_dynamic` on MatMul weights (weights int8, activations quantized per
  call), QUInt8 or QInt8 weights, per channel and reduced range as the profile says;
- static (int8): `quantize_static`, QDQ format, activation ranges calibrated (MinMax or
  Percentile) on feeds from deploylm.export.calibration;
- rowwise (int8): activations quantized per row at run time, weights per column, MatMulInteger, with
  SmoothQuant's per-channel smoothing from calibration feeds (deploylm.export.rowwise);
- weight-only (int8 / int4): `MatMulNBitsQuantizer` (MatMulNBits, one scale per block of
  `block_size`), RTN, HQQ or (int4) q4_1: GGUF's Q4_1 grid as symmetric 4-bit MatMulNBits plus fp32
  block offsets (deploylm.export.q4_1); with int4 the lm_head (the MatMul writing the logits) is
  int8; with `embedding = true` the token embedding is quantized too (an int8 table with one scale
  per row, standard ONNX ops, for int8 and int4 alike).

Before quantizing, a lm_head tied to the embedding (MatMul over a Transpose of the embedding table)
is given its own constant weight, and a Gemm over a constant weight (GPT-2's Conv1D layers) becomes
MatMul + Add, so the quantizers, which take MatMul only, can see them. Every quantizer runs with the
working directory set to a scratch folder: onnxruntime writes helper files to the cwd.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from deploylm.errors import UsageError
from deploylm.export.onnx_export import finish_data_file, is_large, save_graph

HEAD_BLOCK = 64   # rowwise int8: the lm_head's MatMulNBits block, as the int8 profile's


@contextlib.contextmanager
def scratch_cwd() -> Iterator[Path]:
    """Run the body with cwd in a new temporary folder; the folder is deleted afterwards."""
    old = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="deploylm-quant-") as tmp:
        os.chdir(tmp)
        try:
            yield Path(tmp)
        finally:
            os.chdir(old)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """onnxruntime's quantizers log warnings (pre-processing advice, opset bumps) on every call, and its
    percentile calibrator prints its histogram settings to stdout: neither reaches export's output."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import warnings

        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def untie_lm_head(model: Any, keep: tuple[str, ...] = ()) -> int:
    """Give every MatMul whose weight is Transpose(initializer) its own transposed initializer, so that
    a quantizer sees a constant weight; MatMuls named in `keep` (left in fp32) stay as they are: their
    own copy would only add a second fp32 table to the artifact (SmolLM2: 108 MiB).

    Returns how many MatMuls were rewired. Transposes left without consumers are removed.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    changed = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits or node.name in keep:
            continue
        tr = producers.get(node.input[1])
        if tr is None or tr.op_type != "Transpose" or tr.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in tr.attribute if a.name == "perm"), None)
        weight = numpy_helper.to_array(inits[tr.input[0]])
        if weight.ndim != 2 or perm not in (None, [1, 0]):
            continue
        name = f"{tr.input[0]}.untied_T"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(weight.T), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        changed += 1
    used = {i for n in graph.node for i in n.input}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.output[0] not in used]:
        if node.input[0] in inits:
            graph.node.remove(node)
    return changed


def gemm_to_matmul(model: Any, keep: tuple[str, ...] = ()) -> int:
    """Rewrite every Gemm(A, W, C) over a constant weight W (GPT-2's Conv1D layers export as Gemm) as
    MatMul(A, W) followed by Add(C), so that the quantizers, which quantize MatMul only, see it. The MatMul
    keeps the Gemm's node name (the name [precision_fallback] nodes and the fallback search use) and the Add
    writes the Gemm's output. A transposed W (transB = 1) gets its own transposed initializer. Gemms named in
    `keep` (left in fp32), and those with alpha != 1, transA = 1 or beta != 1 with a C, stay as they are.

    Returns how many Gemms were rewritten.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    changed, originals = 0, set()
    for node in list(graph.node):
        if node.op_type != "Gemm" or node.name in keep or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("transA", 0) or (bias and attrs.get("beta", 1.0) != 1.0):
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = f"{weight}.gemm_T"
            if transposed not in inits:
                inits[transposed] = numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(inits[weight]).T), transposed)
                graph.initializer.append(inits[transposed])
            originals.add(weight)
            weight = transposed
        out = node.output[0]
        product = f"{out}.matmul" if bias else out
        replacement = [helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name)]
        if bias:
            replacement.append(helper.make_node("Add", [product, bias], [out], name=f"{node.name}.bias"))
        position = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new in enumerate(replacement):
            graph.node.insert(position + offset, new)
        changed += 1
    used = {i for n in graph.node for i in n.input}
    for name in originals - used:          # a transposed weight's original, now read by nothing
        graph.initializer.remove(inits[name])
    return changed


class FeedReader:
    """onnxruntime CalibrationDataReader over a list of feed dicts."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._feeds = list(feeds)
        self._it = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def quantize_graph(src: Path, dst: Path, precision: str, q: Any, *, feeds: list[dict] | None = None,
                   exclude: tuple[str, ...] = ()) -> None:
    """Quantize the graph file `src` into `dst` as `q` (a deploylm.profiles.Quantization) says.

    exclude: node names left in fp32 (the fallback search's choice). feeds: calibration inputs
    (static only).
    """
    import onnx

    dst = Path(dst).absolute()  # the quantizers run in a scratch cwd: a relative dst would land there
    model = onnx.load(str(src))
    gemm_to_matmul(model, keep=exclude)
    untie_lm_head(model, keep=exclude)
    with scratch_cwd() as tmp, _quiet():
        if q.method == "dynamic":
            _dynamic(model, tmp, dst, q, exclude)
        elif q.method == "static":
            if not feeds:
                raise UsageError("int8 static quantization needs calibration samples (--calibration FILE)")
            _static(model, tmp, dst, q, exclude, feeds)
        elif q.method == "weight-only":
            _weight_only(model, dst, q, 4 if precision == "int4" else 8, exclude)
        elif q.method == "rowwise":
            _rowwise(model, dst, q, exclude, feeds)
        else:
            raise UsageError(f"quantization method {q.method!r} is not known for precision {precision!r}")


def _qtype(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QUInt8 if name == "quint8" else QuantType.QInt8


def _dynamic(model: Any, tmp: Path, dst: Path, q: Any, exclude: tuple[str, ...]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(model, str(dst), op_types_to_quantize=["MatMul"], per_channel=bool(q.per_channel),
                     reduce_range=bool(q.reduce_range), weight_type=_qtype(q.weight_type or "quint8"),
                     nodes_to_exclude=list(exclude), extra_options={"MatMulConstBOnly": True},
                     use_external_data_format=is_large(model))
    finish_data_file(dst)


def _static(model: Any, tmp: Path, dst: Path, q: Any, exclude: tuple[str, ...], feeds: list[dict]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    src = tmp / "fp32.onnx"
    large = is_large(model)
    save_graph(model, src)
    method = CalibrationMethod.Percentile if q.calibration_method == "percentile" else CalibrationMethod.MinMax
    # onnxruntime's QDQ MatMul ignores MatMulConstBOnly: without this it also quantizes the attention
    # products (activation x activation: scores and probabilities to uint8), which the fallback search,
    # ranking weight MatMuls, could never keep in fp32
    exclude = (*exclude, *sorted(activation_matmuls(model)))
    with _flat_histograms():
        quantize_static(str(src), str(dst), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], per_channel=bool(q.per_channel),
                        reduce_range=bool(q.reduce_range), activation_type=QuantType.QUInt8,
                        weight_type=_qtype(q.weight_type or "qint8"), nodes_to_exclude=list(exclude),
                        calibrate_method=method, extra_options={"MatMulConstBOnly": True},
                        use_external_data_format=large)
    finish_data_file(dst)


def activation_matmuls(model: Any) -> set[str]:
    """MatMul nodes whose second input is no constant weight (attention's Q·Kᵀ and P·V)."""
    from deploylm.export.fallback import quantizable_nodes

    return {n.name for n in model.graph.node if n.op_type == "MatMul"} - quantizable_nodes(model)


@contextlib.contextmanager
def _flat_histograms() -> Iterator[None]:
    """onnxruntime's percentile calibrator stacks each tensor's values from every batch with np.asarray,
    which fails when batches differ in shape (prompts of other lengths; prefills beside decode steps)
    although it only wants the values (it flattens them next). For this call, hand it each tensor's
    values already flattened into one array: the same histogram, whatever the batch shapes."""
    from onnxruntime.quantization.calibrate import HistogramCollector

    original = HistogramCollector.collect

    def collect(self: Any, name_to_arr: dict[str, Any]) -> Any:
        flat = {name: (np.concatenate([np.asarray(a).ravel() for a in arrs]) if isinstance(arrs, list) and arrs
                       else arrs) for name, arrs in name_to_arr.items()}
        return original(self, flat)

    HistogramCollector.collect = collect
    try:
        yield
    finally:
        HistogramCollector.collect = original


def _rowwise(model: Any, dst: Path, q: Any, exclude: tuple[str, ...], feeds: list[dict] | None) -> None:
    """int8 activations per row x int8 weights per column, MatMulInteger (deploylm.export.rowwise); SmoothQuant's
    factors from the calibration feeds when smooth_alpha > 0. The lm_head (the MatMul writing the logits) is int8
    weight-only MatMulNBits instead, as in the int8 profile: on SmolLM2, kept out of the rowwise pattern it raised
    beam-4 agreement with fp32 from 0.71 to 0.83 over 12 prompts (benchmarks/rowwise_variants.py)."""
    from deploylm.export import rowwise

    heads = [h for h in lm_head_nodes(model) if h not in exclude]
    nodes = rowwise.target_nodes(model, (*exclude, *heads))
    maxima = None
    if q.smooth_alpha:
        if not feeds:
            raise UsageError("int8 rowwise quantization with smooth_alpha > 0 needs calibration samples "
                             "(--calibration FILE, or the built-in text)")
        maxima = rowwise.channel_maxima(model, nodes, feeds)
    rowwise.rewrite(model, nodes, maxima, q.smooth_alpha or 0.0, bool(q.reduce_range))
    if heads:   # the logits decide the beams: int8 weights with int8 activations per block of 64, as the int8 profile
        model = int8_weight_only(model, heads, HEAD_BLOCK, 4)
    if q.embedding:
        model = quantize_embedding(model, 8, 0, exclude)
    save_graph(model, dst)


def _weight_only(model: Any, dst: Path, q: Any, bits: int, exclude: tuple[str, ...]) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                  HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    level = q.accuracy_level or None
    if q.algorithm in ("hqq", "q4_1") and bits != 4:
        raise UsageError(f"quantization.algorithm = {q.algorithm!r} is 4-bit only (onnxruntime's CPU MatMulNBits "
                         "takes no float zero points at 8 bits): use algorithm = 'rtn' for int8")
    heads = lm_head_nodes(model) if bits == 4 else []
    targets = [n.name for n in model.graph.node
               if n.op_type == "MatMul" and n.name not in exclude and n.name not in heads]
    if q.algorithm == "q4_1":   # Q4_1 grid: symmetric 4-bit MatMulNBits + fp32 block offsets (deploylm.export.q4_1)
        from deploylm.export.q4_1 import split_offsets

        targets = split_offsets(model, targets, q.block_size)
        config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=True, accuracy_level=level,
                                              bits=4, op_types_to_quantize=("MatMul",))
    elif q.algorithm == "hqq":
        config = HQQWeightOnlyQuantConfig(block_size=q.block_size, bits=4, op_types_to_quantize=("MatMul",))
    else:
        config = DefaultWeightOnlyQuantConfig(block_size=q.block_size, is_symmetric=bool(q.symmetric),
                                              accuracy_level=level, bits=bits, op_types_to_quantize=("MatMul",))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in targets]
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=q.block_size, accuracy_level=level,
                                     nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    model = quantizer.model.model
    heads = [h for h in heads if h not in exclude]
    if heads:   # int4: the lm_head in int8 (HQQ int4 on SmolLM2's lm_head alone cost +20% perplexity)
        # q4_1: the fast int8-activation kernel as for the other MatMuls; hqq/rtn: as before (level unset)
        model = int8_weight_only(model, heads, q.block_size, level if q.algorithm == "q4_1" else None)
    if q.embedding:   # int8 per row for both: 4-bit RTN embeddings lose too much (see quantize_embedding)
        model = quantize_embedding(model, 8, q.block_size, exclude)
    save_graph(model, dst)


def int8_weight_only(model: Any, nodes: list[str], block_size: int, level: int | None) -> Any:
    """The MatMuls named in `nodes` as int8 MatMulNBits (symmetric, one scale per block of `block_size`)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8, accuracy_level=level,
                                          op_types_to_quantize=("MatMul",))
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=block_size, accuracy_level=level,
                                     nodes_to_exclude=others, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def lm_head_nodes(model: Any) -> list[str]:
    """MatMul nodes that write a graph output (the logits)."""
    outputs = {o.name for o in model.graph.output}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.output[0] in outputs]


def quantize_embedding(model: Any, bits: int, block_size: int, exclude: tuple[str, ...] = ()) -> Any:
    """Quantize Gather nodes over a 2-D float table: an int8 table with one scale per row.

    bits = 4 (GatherBlockQuantized, RTN with integer zero points) is kept for callers that want the
    smallest table, but the int4 profile does not use it: on SmolLM2 it cost +19% perplexity.
    """
    if bits == 4:
        from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                      MatMulNBitsQuantizer)

        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=False, bits=4,
                                              op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
        quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=block_size, nodes_to_exclude=list(exclude),
                                         algo_config=config)
        quantizer.process()
        return quantizer.model.model
    for node in [n for n in model.graph.node if n.op_type == "Gather" and n.name not in exclude]:
        _int8_gather(model, node)
    return model


def _int8_gather(model: Any, node: Any) -> None:
    """Gather(table [V, D] fp32, ids) -> Cast(Gather(q [V, D] int8, ids)) * Gather(scale [V, 1], ids)."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    if node.input[0] not in inits or any(a.name == "axis" and a.i != 0 for a in node.attribute):
        return
    table = numpy_helper.to_array(inits[node.input[0]])
    if table.ndim != 2 or table.dtype != np.float32:
        return
    scale = np.maximum(np.abs(table).max(axis=1, keepdims=True), 1e-12) / 127.0           # [V, 1]
    q = np.clip(np.round(table / scale), -127, 127).astype(np.int8)                        # [V, D]
    base, ids, out = node.input[0], node.input[1], node.output[0]
    model.graph.initializer.extend([numpy_helper.from_array(q, f"{base}.int8"),
                                    numpy_helper.from_array(scale.astype(np.float32), f"{base}.scale")])
    new = [helper.make_node("Gather", [f"{base}.int8", ids], [f"{out}.q"], name=f"{node.name}.q"),
           helper.make_node("Cast", [f"{out}.q"], [f"{out}.f"], name=f"{node.name}.cast", to=TensorProto.FLOAT),
           helper.make_node("Gather", [f"{base}.scale", ids], [f"{out}.s"], name=f"{node.name}.scale"),
           helper.make_node("Mul", [f"{out}.f", f"{out}.s"], [out], name=f"{node.name}.dequant")]
    index = list(model.graph.node).index(node)
    model.graph.node.remove(node)
    for offset, n in enumerate(new):
        model.graph.node.insert(index + offset, n)
    if not any(base in n.input for n in model.graph.node):
        model.graph.initializer.remove(inits[base])
