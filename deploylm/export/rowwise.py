"""int8 with activations quantized per row at run time: the `rowwise` quantization method.

Each MatMul over a constant weight W [K, N] becomes, in standard ONNX ops:

    x_s = x * (1 / smooth)                                 # [.., K]  SmoothQuant: outlier channels scaled down
    lo, hi = min(x_s), max(x_s) over K                     # [.., 1]  one range per row (per token)
    s = max((hi - lo) / 255, eps);  zp = round(-lo / s)    # [.., 1]  the row's scale and zero point
    xq = QuantizeLinear(x_s / s + zp)                      # [.., K]  uint8
    acc = MatMulInteger(xq, Wq)                            # [.., N]  int32; Wq = round((W * smooth) / s_col): int8
    y = s * s_col * (acc - zp * colsum(Wq))                # [.., N]  fp32

ONNX Runtime runs MatMulInteger's uint8 x int8 product on the CPU's integer dot-product units (AVX-512 VNNI, AMX):
on a 2-vCPU Xeon with AMX a chain of SmolLM2-sized MLP MatMuls at 32 rows took 17.3 ms in this pattern against
42.4 ms in fp32 and 38.4 ms as the `int8` profile's MatMulNBits (`benchmarks/matmul_bandwidth.py`, docs/benchmarks.md, "Twenty-fourth
session"). Per-tensor activation scales (onnxruntime's quantize_dynamic, the `int8-dynamic` profile) break on
SmolLM2's activation outliers (+11% perplexity at export); one scale and zero point per row, with SmoothQuant's per-channel
smoothing (Xiao et al., 2023: smooth_k = max|x_k|^alpha / max|W_k|^(1 - alpha), measured on calibration text),
bring the error near MatMulNBits' per-block activations.

Without VNNI (plain AVX2) the uint8 x int8 pairs can saturate a 16-bit intermediate: `reduce_range = true` keeps
the weights in 7 bits, which cannot.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("deploylm")
EPS = 1e-12     # the smallest row scale: a row of zeros quantizes to zeros, not NaN
MIN_MAX = 1e-5  # channel maxima are clamped to this before smoothing: a channel that never fires keeps factor ~1
# x86 flags of int8 dot-product units that accumulate uint8 x int8 pairs into 32 bits (no saturation)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
_warned: set[str] = set()


def target_nodes(model: Any, exclude: tuple[str, ...] = ()) -> list[Any]:
    """MatMul nodes over a 2-D fp32 initializer (after deploylm.export.quantize's untie/Gemm rewrites), not excluded."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
            and n.name not in exclude and n.input[1] in inits and len(inits[n.input[1]].dims) == 2
            and inits[n.input[1]].data_type == TensorProto.FLOAT]


def node_key(node: Any) -> str:
    """A node's name, or its first output's where it has none (names are optional in ONNX; outputs are unique): the
    prefix of what rewrite puts in its place and the key of channel_maxima."""
    return node.name or node.output[0]


def channel_maxima(model: Any, nodes: list[Any], feeds: list[dict[str, np.ndarray]],
                   skip_padding: bool = True) -> dict[str, np.ndarray]:
    """{node_key(node): max |x_k| over the rows of every feed [K]} for each node's activation input, from the fp32 graph;
    rows at padded positions (attention_mask 0) are left out: no real input ever has them."""
    import onnx
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    wanted = list(dict.fromkeys(n.input[0] for n in nodes))
    added = [onnx.ValueInfoProto(name=t) for t in wanted if t not in existing]
    model.graph.output.extend(added)           # exposed for this session only: no copy of a large model
    try:
        serialized = model.SerializeToString()
    finally:
        del model.graph.output[len(model.graph.output) - len(added):]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the tensors as named
    session = ort.InferenceSession(serialized, options, providers=["CPUExecutionProvider"])
    del serialized
    inputs = {i.name for i in session.get_inputs()}
    maxima: dict[str, np.ndarray] = {}
    for feed in feeds:   # only the wanted tensors come back (not the logits or the K/V)
        values = dict(zip(wanted, session.run(wanted, {k: v for k, v in feed.items() if k in inputs})))
        for tensor in wanted:
            x = np.abs(real_rows(values[tensor], feed.get("attention_mask") if skip_padding else None))
            x = x.max(axis=0, initial=0.0)                                                       # [K]
            maxima[tensor] = np.maximum(maxima[tensor], x) if tensor in maxima else x
    return {node_key(n): maxima[n.input[0]] for n in nodes}


def real_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """x [B, S, K] -> [rows, K]: the positions the mask [B, T] marks as real (its last S columns are x's positions);
    every row when there is no mask or x is not laid out [B, S, K] over it."""
    if mask is not None and x.ndim == 3 and x.shape[0] == mask.shape[0] and x.shape[1] <= mask.shape[1]:
        return x[mask[:, mask.shape[1] - x.shape[1]:].astype(bool)]
    return x.reshape(-1, x.shape[-1])


def smoothing(x_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's factor per input channel [K]: max|x_k|^alpha / max_n |W_kn|^(1 - alpha); x / f, W * f."""
    w_max = np.abs(weight).max(axis=1)
    factor = np.maximum(x_max, MIN_MAX) ** alpha / np.maximum(w_max, MIN_MAX) ** (1.0 - alpha)
    return factor.astype(np.float32)


def quantize_weight(weight: np.ndarray, reduce_range: bool) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] fp32 -> (Wq [K, N] int8, one scale per output column [N]), symmetric."""
    top = 63 if reduce_range else 127
    scale = np.maximum(np.abs(weight).max(axis=0), EPS) / top                                  # [N]
    q = np.clip(np.round(weight / scale), -top, top).astype(np.int8)
    return q, scale.astype(np.float32)


def rewrite(model: Any, nodes: list[Any], maxima: dict[str, np.ndarray] | None, alpha: float,
            reduce_range: bool) -> int:
    """Replace each of `nodes` in `model` (in place) by the rowwise int8 pattern above; `maxima` None (or alpha 0):
    no smoothing. The last node keeps the MatMul's output name, so what reads it is unchanged. Returns the count."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    shared = {"rowwise.inv255": np.array(1 / 255, np.float32),
              "rowwise.eps": np.array(EPS, np.float32), "rowwise.one": np.array(1, np.float32),
              "rowwise.zp0": np.array(0, np.uint8), **({"rowwise.axes": np.array([-1], np.int64)} if opset >= 18 else {})}
    for name, value in shared.items():
        if name not in inits:
            graph.initializer.append(numpy_helper.from_array(value, name))
    replaced = {n.input[1] for n in nodes}
    for node in nodes:
        weight = numpy_helper.to_array(inits[node.input[1]])                                    # [K, N]
        name, x, y = node_key(node), node.input[0], node.output[0]
        p = f"{name}.rowwise"
        new: list[Any] = []

        def op(kind: str, ins: list[str], out: str, **attrs: Any) -> str:
            new.append(helper.make_node(kind, ins, [out], name=f"{p}.{out.rsplit('.', 1)[-1]}", **attrs))
            return out

        if maxima is not None and alpha > 0:
            factor = smoothing(maxima[name], weight, alpha)
            weight = weight * factor[:, None]
            graph.initializer.append(numpy_helper.from_array((1.0 / factor).astype(np.float32), f"{p}.unsmooth"))
            x = op("Mul", [x, f"{p}.unsmooth"], f"{p}.x")
        q, col_scale = quantize_weight(weight, reduce_range)
        graph.initializer.extend([numpy_helper.from_array(q, f"{p}.weight"),
                                  numpy_helper.from_array(col_scale, f"{p}.col_scale"),
                                  numpy_helper.from_array(q.astype(np.float32).sum(axis=0), f"{p}.col_sum")])
        if opset >= 18:   # the reduced axis: an input from opset 18, an attribute before
            lo = op("ReduceMin", [x, "rowwise.axes"], f"{p}.lo", keepdims=1)                    # [.., 1]
            hi = op("ReduceMax", [x, "rowwise.axes"], f"{p}.hi", keepdims=1)
        else:
            lo = op("ReduceMin", [x], f"{p}.lo", keepdims=1, axes=[-1])
            hi = op("ReduceMax", [x], f"{p}.hi", keepdims=1, axes=[-1])
        span = op("Sub", [hi, lo], f"{p}.span")
        scale = op("Max", [op("Mul", [span, "rowwise.inv255"], f"{p}.raw_scale"), "rowwise.eps"], f"{p}.scale")
        zp = op("Neg", [op("Round", [op("Div", [lo, scale], f"{p}.lo_steps")], f"{p}.lo_round")], f"{p}.zp")
        shifted = op("Add", [op("Div", [x, scale], f"{p}.steps"), zp], f"{p}.shifted")
        xq = op("QuantizeLinear", [shifted, "rowwise.one", "rowwise.zp0"], f"{p}.xq")              # [.., K] uint8
        acc = op("MatMulInteger", [xq, f"{p}.weight"], f"{p}.acc")                                # [.., N] int32
        accf = op("Cast", [acc], f"{p}.accf", to=TensorProto.FLOAT)
        centred = op("Sub", [accf, op("Mul", [zp, f"{p}.col_sum"], f"{p}.zp_sum")], f"{p}.centred")
        rows = op("Mul", [centred, scale], f"{p}.rows")
        new.append(helper.make_node("Mul", [rows, f"{p}.col_scale"], [y], name=f"{p}.out"))
        index = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(index + offset, n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name in replaced and i.name not in used]:
        graph.initializer.remove(init)
    return len(nodes)


def cpu_has_vnni(cpuinfo: str | None = None) -> bool | None:
    """Whether this x86 CPU has VNNI or AMX (from the flags of `cpuinfo`, default this machine's /proc/cpuinfo,
    read once per process); None where that is not known (no /proc/cpuinfo, or no x86 flags line: ARM's int8 dot
    products do not saturate)."""
    if cpuinfo is None:
        return _this_cpu_has_vnni()
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags") and ":" in line), None)
    return None if flags is None else any(flag in flags for flag in VNNI_FLAGS)


@functools.cache
def _this_cpu_has_vnni() -> bool | None:
    """cpu_has_vnni of this machine: /proc/cpuinfo read at the first rowwise artifact opened, not at every one."""
    try:
        return cpu_has_vnni(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return None


def warn_if_saturating(manifest: dict[str, Any] | None, folder: Path) -> None:
    """Once per artifact folder: a rowwise int8 artifact with 8-bit weights on an x86 CPU without VNNI/AMX, whose
    onnxruntime kernels sum uint8 x int8 pairs in 16 bits (VPMADDUBSW) and clamp what does not fit."""
    profile = (manifest or {}).get("profile") or {}
    q = profile.get("quantization") or {}
    if q.get("method") != "rowwise" or q.get("reduce_range") or str(folder) in _warned or cpu_has_vnni() is not False:
        return
    _warned.add(str(folder))
    log.warning("note: %s (profile %s) multiplies uint8 activations by 8-bit weights, which this CPU (no AVX-512 "
                "VNNI, AVX-VNNI or AMX) sums in 16 bits that can saturate and change its outputs; re-export it with "
                "reduce_range = true in the profile's [quantization] (7-bit weights), or use the int8 profile",
                folder, profile.get("name", "?"))
