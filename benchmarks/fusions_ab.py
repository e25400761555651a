"""Graph fusions of the exported fp32 decoder, measured and NOT landed (issue 7, fourth session).

Three rewrites of the torch export into ONNX Runtime's own kernels, each exact in what it computes but
not in the order of floating-point operations:
- `rms-norm`: Pow → ReduceMean → Add(eps) → Sqrt → Reciprocal → Mul(x) → Mul(weight) (Hugging Face's
  RMSNorm) becomes one `SimplifiedLayerNormalization`, or one `com.microsoft.SkipSimplifiedLayerNormalization`
  together with the residual Add that makes x;
- `rotary`: x·cos + rotate_half(x)·sin (Slice, Slice, Neg, Concat, two Mul, Add) on [B, H, S, Dh] becomes one
  `com.microsoft.RotaryEmbedding` whose cos/sin caches are the graph's own cos/sin rows of this run;
- `weights-first-matmul`: x [.., K] @ W [K, N] becomes (Wᵀ [N, K] @ xᵀ [K, rows])ᵀ, the weights as
  SGEMM's first operand; a tied lm_head reads the embedding itself.

What it showed on SmolLM2-135M (docs/benchmarks.md, "Issue 7, fourth session"): one decode step of the
fused graph in isolation is 1.05–1.14× faster, but in real `generate` calls, interleaved, the wall time
is the same (greedy 1.000×, beam 1.011×), and every fusion moves max |Δ logit| against PyTorch past the
fp32 profile's 1e-4 (1.1–1.7e-4; tokens stay identical). So none is part of the exporter.

    .venv/bin/python benchmarks/fusions_ab.py --artifact export/smollm2-fp32-v2 --model $GGUF \\
        [--out /tmp/fusions-ab] [--rows 8 32] [--runs 20] [--rounds 4] [--only-calls]

1. Writes one copy of the artifact per variant (each fusion alone, all three) under --out.
2. Parity against the torch backend of --model, as `deploylm parity` measures it: the standard bench
   prompts in one padded batch, teacher-forced over 32 beam-search tokens, and each candidate's own
   greedy and beam-4 tokens.
3. One decode step per variant at each --rows (past 100), interleaved with the plain graph
   (benchmarks/onnx_step.py, medians).
4. The bench workload's `generate` call (8 prompts, exactly 64 new tokens; greedy, then beam 4) on the
   plain and the all-fused artifact, interleaved in one process for --rounds rounds after a warm-up.
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FUSIONS = ("rms-norm", "rotary", "weights-first-matmul")
MS_DOMAIN = "com.microsoft"


class _Graph:
    """Producers, consumers and constant values of one ONNX graph, for pattern matching."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model, self.graph = model, model.graph
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in self.graph.node:
            for name in node.input:
                self.consumers[name].append(node)
        self.outputs = {o.name for o in self.graph.output}
        self._array = numpy_helper.to_array

    def const(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output, else None."""
        if name in self.inits:
            return self._array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return self._array(node.attribute[0].t)
        return None

    def made_by(self, name: str, op_type: str) -> Any:
        node = self.producer.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    def only_for(self, name: str, node: Any) -> bool:
        """Is `node` the only reader of `name` (so the producer may go)?"""
        return name not in self.outputs and [id(n) for n in self.consumers[name]] == [id(node)]

    def add_init(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.inits[name] = self.graph.initializer[-1]
        return name

    def rebuild(self, drop: set[int], replace: dict[int, list[Any]], before: dict[int, list[Any]] | None = None) -> None:
        """Drop nodes (by id), put `replace[id]` in a node's place, `before[id]` in front of it; keep order."""
        before = before or {}
        nodes = []
        for node in self.graph.node:
            nodes += before.get(id(node), [])
            if id(node) in replace:
                nodes += replace[id(node)]
            elif id(node) not in drop:
                nodes.append(node)
        used = {name for n in nodes for name in n.input}
        kept = [i for i in self.graph.initializer if i.name in used]
        del self.graph.node[:]
        self.graph.node.extend(nodes)
        del self.graph.initializer[:]
        self.graph.initializer.extend(kept)


def _scalar(value: np.ndarray | None) -> float | None:
    return float(value.reshape(-1)[0]) if value is not None and value.size == 1 else None


def _last_axis(g: _Graph, node: Any, rank: int) -> bool:
    """ReduceMean/Slice over the last axis only (axes as input or attribute)."""
    axes = None
    if node.op_type == "Slice" and len(node.input) > 3:
        axes = g.const(node.input[3])
    elif node.op_type == "ReduceMean":
        axes = g.const(node.input[1]) if len(node.input) > 1 else next(
            (np.array(a.ints) for a in node.attribute if a.name == "axes"), None)
    return axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) in (-1, rank - 1)


# -- rms-norm ---------------------------------------------------------------------------------------
def fuse_rms_norm(model: Any) -> int:
    """weight * (x * 1/sqrt(mean(x², -1) + eps)) -> SimplifiedLayerNormalization(x, weight)."""
    from onnx import helper

    g = _Graph(model)
    drop: set[int] = set()
    replace: dict[int, list[Any]] = {}
    for out_mul in g.graph.node:
        if out_mul.op_type != "Mul" or id(out_mul) in drop:
            continue
        weight_side = [i for i in out_mul.input if i in g.inits and len(g.inits[i].dims) == 1]
        if len(weight_side) != 1:
            continue
        weight = weight_side[0]
        inner = g.made_by(next(i for i in out_mul.input if i != weight), "Mul")
        if inner is None:
            continue
        for x_side, r_side in ((0, 1), (1, 0)):
            recip = g.made_by(inner.input[r_side], "Reciprocal")
            sqrt = recip and g.made_by(recip.input[0], "Sqrt")
            add = sqrt and g.made_by(sqrt.input[0], "Add")
            if not add:
                continue
            eps_in = [i for i in add.input if _scalar(g.const(i)) is not None]
            mean = g.made_by(next((i for i in add.input if i not in eps_in), ""), "ReduceMean") if len(eps_in) == 1 else None
            power = mean and g.made_by(mean.input[0], "Pow")
            x = inner.input[x_side]
            keepdims = mean and next((a.i for a in mean.attribute if a.name == "keepdims"), 1)
            if not (power and power.input[0] == x and _scalar(g.const(power.input[1])) == 2.0 and keepdims
                    and _last_axis(g, mean, 3) and g.inits[weight].dims[0] > 1):
                continue
            chain = [(power, mean), (mean, add), (add, sqrt), (sqrt, recip), (recip, inner), (inner, out_mul)]
            if not all(g.only_for(a.output[0], b) for a, b in chain):
                continue
            eps = _scalar(g.const(eps_in[0]))
            name = f"{out_mul.name or out_mul.output[0]}.rms_norm"
            drop |= {id(power), id(mean), id(add), id(sqrt), id(recip), id(inner)}
            residual = g.made_by(x, "Add")
            if residual is not None and x not in g.outputs and not any(g.const(i) is not None for i in residual.input) \
                    and id(residual) not in replace:
                # x = a + b (a residual connection): the sum and the norm in one kernel, placed where the
                # Add was; the sum keeps its name for the Add's other readers
                replace[id(residual)] = [helper.make_node(
                    "SkipSimplifiedLayerNormalization", [*residual.input, weight], [out_mul.output[0], "", "", x],
                    name=name, domain=MS_DOMAIN, epsilon=eps)]
                drop.add(id(out_mul))
            else:
                replace[id(out_mul)] = [helper.make_node(
                    "SimplifiedLayerNormalization", [x, weight], [out_mul.output[0]], name=name,
                    epsilon=eps, axis=-1, stash_type=1)]
            break
    g.rebuild(drop, replace)
    if any(n.domain == MS_DOMAIN for n in model.graph.node):
        _use_ms_domain(model)
    return len(replace)


# -- rotary -----------------------------------------------------------------------------------------
def fuse_rotary(model: Any) -> int:
    """x * cos_u + concat(-x[..., h:], x[..., :h]) * sin_u (cos_u = Unsqueeze(cos, 1), cos = Cos(concat(f, f)))
    on x [B, H, S, Dh] -> com.microsoft.RotaryEmbedding(x, positions, cos rows, sin rows)."""
    from onnx import helper

    g = _Graph(model)
    found: list[tuple[Any, str, list[Any]]] = []       # (Add, x, nodes to drop)
    tables: set[tuple[str, str]] = set()
    half = None
    for add in g.graph.node:
        if add.op_type != "Add" or len(add.input) != 2:
            continue
        muls = [g.made_by(i, "Mul") for i in add.input]
        if not all(muls):
            continue
        for cos_mul, sin_mul in (muls, muls[::-1]):
            cat = next((g.made_by(i, "Concat") for i in sin_mul.input if g.made_by(i, "Concat")), None)
            if cat is None or len(cat.input) != 2:
                continue
            neg, first = g.made_by(cat.input[0], "Neg"), g.made_by(cat.input[1], "Slice")
            second = neg and g.made_by(neg.input[0], "Slice")
            if not (first and second) or first.input[0] != second.input[0]:
                continue
            x = first.input[0]
            if x not in cos_mul.input or not (_last_axis(g, first, 4) and _last_axis(g, second, 4)):
                continue
            starts = [(g.const(s.input[1]), g.const(s.input[2])) for s in (first, second)]
            if any(v is None for pair in starts for v in pair):
                continue
            h = int(starts[0][1].reshape(-1)[0])
            if int(starts[0][0].reshape(-1)[0]) != 0 or int(starts[1][0].reshape(-1)[0]) != h or \
                    int(starts[1][1].reshape(-1)[0]) < 2 * h or (half is not None and h != half):
                continue
            cos_u = g.made_by(next(i for i in cos_mul.input if i != x), "Unsqueeze")
            sin_u = g.made_by(next((i for i in sin_mul.input if i != cat.output[0]), ""), "Unsqueeze")
            if not (cos_u and sin_u) or not all(_unsqueezes_heads(g, u) for u in (cos_u, sin_u)):
                continue
            if not _is_doubled_angle(g, cos_u.input[0], "Cos") or not _is_doubled_angle(g, sin_u.input[0], "Sin"):
                continue
            if not (g.only_for(first.output[0], cat) and g.only_for(second.output[0], neg) and g.only_for(neg.output[0], cat)
                    and g.only_for(cat.output[0], sin_mul) and g.only_for(cos_mul.output[0], add)
                    and g.only_for(sin_mul.output[0], add)):
                continue
            half = h
            tables.add((cos_u.input[0], sin_u.input[0]))
            found.append((add, x, [cos_mul, sin_mul, cat, neg, first, second]))
            break
    if not found or len(tables) != 1 or "position_ids" not in {i.name for i in g.graph.input}:
        return 0
    (cos, sin), = tables
    k = g.add_init
    z, hh, last = k("rotary.zero", np.array([0], np.int64)), k("rotary.half", np.array([half], np.int64)), k("rotary.last", np.array([-1], np.int64))
    rows_shape = k("rotary.rows_shape", np.array([-1, half], np.int64))
    pre = [  # once per run: the cos/sin rows of this run's positions, and positions 0..B*S-1 that read them
        helper.make_node("Slice", [cos, z, hh, last], ["rotary.cos_half"]),
        helper.make_node("Reshape", ["rotary.cos_half", rows_shape], ["rotary.cos_rows"]),       # [B*S, Dh/2]
        helper.make_node("Slice", [sin, z, hh, last], ["rotary.sin_half"]),
        helper.make_node("Reshape", ["rotary.sin_half", rows_shape], ["rotary.sin_rows"]),
        helper.make_node("Size", ["position_ids"], ["rotary.count"]),
        helper.make_node("Range", [k("rotary.start", np.array(0, np.int64)), "rotary.count",
                                   k("rotary.step", np.array(1, np.int64))], ["rotary.range"]),
        helper.make_node("Shape", ["position_ids"], ["rotary.positions_shape"]),
        helper.make_node("Reshape", ["rotary.range", "rotary.positions_shape"], ["rotary.positions"]),  # [B, S]
    ]
    drop = {id(n) for _, _, nodes in found for n in nodes}
    replace = {id(add): [helper.make_node("RotaryEmbedding", [x, "rotary.positions", "rotary.cos_rows", "rotary.sin_rows"],
                                          [add.output[0]], name=f"{add.name or add.output[0]}.rotary",
                                          domain=MS_DOMAIN, interleaved=0)] for add, x, _ in found}
    first_use = min((i for i, n in enumerate(g.graph.node) if id(n) in replace or id(n) in drop))
    g.rebuild(drop, replace, {id(g.graph.node[first_use]): pre})
    _use_ms_domain(model)
    return len(found)


def _unsqueezes_heads(g: _Graph, unsqueeze: Any) -> bool:
    """Unsqueeze(table [B, S, Dh], axes=[1]): the table broadcast over the heads of x [B, H, S, Dh]."""
    axes = g.const(unsqueeze.input[1]) if len(unsqueeze.input) > 1 else None
    return axes is not None and [int(a) for a in axes.reshape(-1)] == [1]


def _is_doubled_angle(g: _Graph, name: str, op: str) -> bool:
    """name = Cos|Sin(Concat(f, f)): both halves of the table are the same angles (HF's default rope)."""
    trig = g.made_by(name, op)
    cat = trig and g.made_by(trig.input[0], "Concat")
    return bool(cat) and len(cat.input) == 2 and cat.input[0] == cat.input[1]


# -- weights-first-matmul ---------------------------------------------------------------------------
def fuse_weights_first_matmul(model: Any) -> int:
    """x [.., K] @ W [K, N] (W an initializer, or Transpose of an [N, K] initializer) -> (Wᵀ @ xᵀ)ᵀ."""
    from onnx import helper, numpy_helper

    g = _Graph(model)
    replace: dict[int, list[Any]] = {}
    drop: set[int] = set()
    flat: dict[str, str] = {}        # activation -> its [K, rows] transpose
    lead: dict[str, str] = {}        # activation -> its shape without the last axis
    transposed: dict[str, str] = {}  # weight -> its [N, K] initializer
    for node in g.graph.node:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        x, w = node.input
        weight_nk = _weight_rows(g, w)
        if weight_nk is None:
            continue
        name_nk, (n_out, k_in) = weight_nk
        new: list[Any] = []
        if w in g.inits:           # plain [K, N] initializer: store its transpose once
            if w not in transposed:
                transposed[w] = g.add_init(f"{w}.weights_first", np.ascontiguousarray(numpy_helper.to_array(g.inits[w]).T))
            name_nk = transposed[w]
        else:                      # Transpose(embedding [N, K]): read the embedding as it is
            transpose = g.producer[w]
            if g.only_for(w, node):
                drop.add(id(transpose))
        if x not in flat:
            shape = g.add_init(f"{x}.weights_first.rows_shape", np.array([-1, k_in], np.int64))
            new += [helper.make_node("Reshape", [x, shape], [f"{x}.rows"]),                           # [rows, K]
                    helper.make_node("Transpose", [f"{x}.rows"], [f"{x}.rows_t"], perm=[1, 0]),       # [K, rows]
                    helper.make_node("Shape", [x], [f"{x}.shape"]),
                    helper.make_node("Slice", [f"{x}.shape", g.add_init(f"{x}.zero", np.array([0], np.int64)),
                                               g.add_init(f"{x}.minus_one", np.array([-1], np.int64))], [f"{x}.lead"])]
            flat[x], lead[x] = f"{x}.rows_t", f"{x}.lead"
        out = node.output[0]
        new += [helper.make_node("MatMul", [name_nk, flat[x]], [f"{out}.t"]),                        # [N, rows]
                helper.make_node("Transpose", [f"{out}.t"], [f"{out}.rows"], perm=[1, 0]),          # [rows, N]
                helper.make_node("Concat", [lead[x], g.add_init(f"{out}.width", np.array([n_out], np.int64))],
                                 [f"{out}.shape"], axis=0),
                helper.make_node("Reshape", [f"{out}.rows", f"{out}.shape"], [out])]                # [.., N]
        replace[id(node)] = new
    g.rebuild(drop, replace)
    return len(replace)


def _weight_rows(g: _Graph, name: str) -> tuple[str, tuple[int, int]] | None:
    """(initializer holding Wᵀ or None for a plain W, (N, K)) for a MatMul's second input, else None."""
    from onnx import TensorProto

    init = g.inits.get(name)
    if init is not None:
        if len(init.dims) == 2 and init.data_type == TensorProto.FLOAT:
            return name, (int(init.dims[1]), int(init.dims[0]))
        return None
    transpose = g.made_by(name, "Transpose")
    perm = transpose and next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
    source = transpose and g.inits.get(transpose.input[0])
    if source is not None and perm == [1, 0] and len(source.dims) == 2 and source.data_type == TensorProto.FLOAT:
        return source.name, (int(source.dims[0]), int(source.dims[1]))
    return None


def _use_ms_domain(model: Any) -> None:
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


_PASSES = {"rms-norm": fuse_rms_norm, "rotary": fuse_rotary, "weights-first-matmul": fuse_weights_first_matmul}


def fuse_model(model: Any, fusions: tuple[str, ...]) -> dict[str, int]:
    """Apply `fusions` (in FUSIONS order) to an ONNX model in place; how many patterns each replaced."""
    unknown = [f for f in fusions if f not in _PASSES]
    if unknown:
        raise ValueError(f"unknown fusion(s) {', '.join(unknown)}: expected {', '.join(FUSIONS)}")
    return {name: _PASSES[name](model) for name in FUSIONS if name in fusions}


def fuse_graph_file(path: Path, fusions: tuple[str, ...]) -> dict[str, int]:
    """Fuse one graph file in place; weights stay external (`<graph>.data`) if they were."""
    from deploylm.export.pack_matmuls import rewrite_graph_file

    counts: dict[str, int] = {}

    def fuse(model: Any) -> bool:
        counts.update(fuse_model(model, fusions))
        return True                                   # saved even when nothing matched, as before
    rewrite_graph_file(path, fuse)
    return counts


# -- the A/B -----------------------------------------------------------------------------------------
def variants(artifact: Path, out: Path) -> dict[str, Path]:
    made = {}
    for name, fusions in [*((f, (f,)) for f in FUSIONS), ("all", FUSIONS)]:
        folder = out / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(artifact, folder, ignore=shutil.ignore_patterns("manifest.json", "parity.json"))
        counts = fuse_graph_file(folder / "model.onnx", fusions)
        print(f"{name}: {counts}")
        made[name] = folder
    return made


def parity(model: str, folders: dict[str, Path]) -> None:
    import torch

    import deploylm
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.benchmarking.workload import STANDARD_PROMPTS
    from deploylm.parity import compare_backends
    from deploylm.profiles import load_profile

    torch.set_num_threads(2)
    reference = deploylm.load(model, backend="torch")
    candidates = {name: OnnxBackend.from_folder(path, name=name, threads=2) for name, path in folders.items()}
    options = reference.options(num_beams=4, max_new_tokens=32)
    batch = reference.encode(list(STANDARD_PROMPTS), options)
    report = compare_backends(reference.backend, candidates, batch, options, load_profile("fp32").parity,
                              tokenizer=reference.tokenizer)
    for b in report.backends:
        print(f"  {b.backend:22s} max|Δ logit| {b.max_abs_logit:.2e}  max|Δ log-prob| {b.max_abs_logprob:.2e}  "
              f"top-1 {b.token_agreement:.3f}  greedy same {b.greedy_identical}  beams same {b.beams_identical}")


def whole_calls(folders: dict[str, Path], beams: int, rounds: int) -> None:
    """The bench workload's generate call per artifact, interleaved: median wall time."""
    import torch

    import deploylm
    from deploylm.benchmarking.workload import STANDARD_PROMPTS

    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.generator import Generator

    torch.set_num_threads(2)
    first = next(iter(folders.values()))
    tokenizer = deploylm.load(first, backend="onnx", threads=2).tokenizer    # the artifact's own (variants: copies)
    generators = {name: Generator(OnnxBackend.from_folder(path, name=name, threads=2), tokenizer)
                  for name, path in folders.items()}

    def call(gen: Any) -> float:
        start = time.perf_counter()
        gen.generate(list(STANDARD_PROMPTS), num_beams=beams, max_new_tokens=64, min_new_tokens=64)
        return time.perf_counter() - start

    walls: dict[str, list[float]] = {name: [] for name in generators}
    for gen in generators.values():
        call(gen)                                      # warm-up
    for _ in range(rounds):
        for name, gen in generators.items():
            walls[name].append(call(gen))
    first = statistics.median(next(iter(walls.values())))
    for name, times in walls.items():
        print(f"  generate, num_beams {beams}, {name:10s}: median {statistics.median(times):.3f} s "
              f"(x{first / statistics.median(times):.3f})  rounds {' '.join(f'{t:.2f}' for t in times)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=ROOT / "export" / "smollm2-fp32-v2")
    parser.add_argument("--model", required=True, help="what the artifact was exported from (the torch reference)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fusions-ab"))
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only-calls", action="store_true", help="skip parity and the single steps (step 4 only)")
    args = parser.parse_args()
    folders = variants(args.artifact, args.out)
    if args.only_calls:
        for beams in (1, 4):
            whole_calls({"plain": args.artifact, "all fused": folders["all"]}, beams, args.rounds)
        return
    print("parity against torch (teacher-forced, 8 prompts, beam 4, 32 tokens):")
    parity(args.model, {"plain": args.artifact, **folders})
    graphs = [str(args.artifact / "model.onnx")] + [str(f / "model.onnx") for f in folders.values()]
    for rows in args.rows:
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "onnx_step.py"), *graphs, "--rows", str(rows),
                        "--runs", str(args.runs)], check=True)
    for beams in (1, 4):
        whole_calls({"plain": args.artifact, "all fused": folders["all"]}, beams, args.rounds)


if __name__ == "__main__":
    main()
