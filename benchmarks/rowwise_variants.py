"""int8 rowwise variants of an fp32 artifact, judged as export judges them (issue 7, the quantized target).

    .venv/bin/python benchmarks/rowwise_variants.py export/smollm2-fp32-vN [VARIANT ...] [--texts FILE]

Each VARIANT quantizes the artifact's model.onnx and measures it with deploylm.export.quality.measure_quality
against the fp32 graphs, as export's quality step does, without timing rounds. Variants: `int8` (the int8
profile's weight-only MatMulNBits, for comparison), `rowwise` (the int8-rowwise profile as export quantizes:
alpha 0.5, padded calibration rows left out, the lm_head int8 weight-only), `alpha=A` (the same with another
smoothing strength; 0 = none), `reduce-range` / `full-range` (the same with 7-bit / 8-bit weights), and with deploylm.export.rowwise alone (the embedding as int8 rows):
`rowwise-head` (the lm_head in the rowwise pattern too), `padded` (the same, padded calibration rows counted),
`fp32-head` (the lm_head left fp32); `dynamic-alpha=A` (one activation scale per tensor, onnxruntime's
quantize_dynamic: DynamicQuantizeMatMul, after SmoothQuant smoothing of strength A; the lm_head and embedding as
`rowwise`). Any variant with `+fused` appended is then rewritten by benchmarks/fusions_ab.py's `rms-norm` and `rotary`
fusions (ONNX Runtime's SimplifiedLayerNormalization and RotaryEmbedding kernels).
Calibration is the built-in text, as for a model without training data (GGUF, Hugging Face).

The built-in held-out material is 4 prompts and 6 sentences; `--texts FILE` (one text a line, e.g.
benchmarks/long_prompts.txt: 8 passages of the docs, 128 tokens scored of each) scores perplexity on those instead, and adds the 8 prompts of bench's standard workload to the 4 for the beam-4
agreement, which tells the variants apart less by chance. Graphs go to a temporary folder, deleted at the end.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace


def quantize_variant(ref: Path, out: Path, variant: str, feeds: list[dict]) -> None:
    from dataclasses import replace

    if variant.endswith("+fused"):
        from fusions_ab import fuse_graph_file

        quantize_variant(ref, out, variant.removesuffix("+fused"), feeds)
        fuse_graph_file(out / "model.onnx", ("rms-norm", "rotary"))
        return
    if variant.startswith("dynamic-alpha="):
        smoothed_dynamic(ref, out, float(variant.split("=", 1)[1]), feeds)
        return

    import onnx

    from deploylm.export import rowwise
    from deploylm.export.onnx_export import save_graph
    from deploylm.export.quantize import gemm_to_matmul, quantize_embedding, quantize_graph, untie_lm_head
    from deploylm.profiles import load_profile

    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("*.onnx", "*.data", "*.onnx_data"))
    profile = load_profile("int8-rowwise").quantization
    if variant in ("int8", "rowwise", "reduce-range", "full-range") or variant.startswith("alpha="):   # as export does
        q = (load_profile("int8").quantization if variant == "int8" else
             replace(profile, reduce_range=variant == "reduce-range") if "range" in variant else
             replace(profile, smooth_alpha=float(variant.split("=", 1)[1])) if "=" in variant else profile)
        quantize_graph(ref / "model.onnx", out / "model.onnx", "int8", q, feeds=feeds)
        return
    model = onnx.load(str(ref / "model.onnx"))                # rowwise everywhere, or the lm_head left fp32
    gemm_to_matmul(model)
    untie_lm_head(model)
    nodes = rowwise.target_nodes(model)
    if variant == "fp32-head":
        outputs = {o.name for o in model.graph.output}
        nodes = [n for n in nodes if n.output[0] not in outputs]
    maxima = rowwise.channel_maxima(model, nodes, feeds, skip_padding=variant != "padded")
    rowwise.rewrite(model, nodes, maxima, profile.smooth_alpha, reduce_range=False)
    save_graph(quantize_embedding(model, 8, 0), out / "model.onnx")


def smoothed_dynamic(ref: Path, out: Path, alpha: float, feeds: list[dict]) -> None:
    """Per-tensor dynamic int8 (onnxruntime's quantize_dynamic, per-column int8 weights) after SmoothQuant's
    smoothing (x * 1/f before each MatMul, W * f); the lm_head int8 weight-only and the embedding int8 rows, as the
    int8-rowwise profile quantizes them."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from deploylm.export import rowwise
    from deploylm.export.onnx_export import save_graph
    from deploylm.export.quantize import (HEAD_BLOCK, _quiet, gemm_to_matmul, int8_weight_only, lm_head_nodes,
                                          quantize_embedding, scratch_cwd, untie_lm_head)

    shutil.copytree(ref, out, ignore=shutil.ignore_patterns("*.onnx", "*.data", "*.onnx_data"))
    model = onnx.load(str(ref / "model.onnx"))
    gemm_to_matmul(model)
    untie_lm_head(model)
    heads = lm_head_nodes(model)
    nodes = rowwise.target_nodes(model, tuple(heads))
    targets = {n.name for n in nodes}
    if alpha > 0:
        maxima = rowwise.channel_maxima(model, nodes, feeds)
        inits = {i.name: i for i in model.graph.initializer}
        for node in nodes:
            key, weight = rowwise.node_key(node), numpy_helper.to_array(inits[node.input[1]])
            factor = rowwise.smoothing(maxima[key], weight, alpha)
            inits[node.input[1]].CopyFrom(numpy_helper.from_array((weight * factor[:, None]).astype(np.float32),
                                                                  node.input[1]))
            model.graph.initializer.append(numpy_helper.from_array((1 / factor).astype(np.float32), f"{key}.unsmooth"))
            smooth = helper.make_node("Mul", [node.input[0], f"{key}.unsmooth"], [f"{key}.xs"], name=f"{key}.smooth")
            node.input[0] = f"{key}.xs"
            model.graph.node.insert(list(model.graph.node).index(node), smooth)
    model = quantize_embedding(int8_weight_only(model, heads, HEAD_BLOCK, 4), 8, 0)
    dst = (out / "model.onnx").absolute()
    with scratch_cwd() as tmp, _quiet():
        save_graph(model, tmp / "smoothed.onnx")
        others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in targets]
        quantize_dynamic(str(tmp / "smoothed.onnx"), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8, nodes_to_exclude=others,
                         extra_options={"MatMulConstBOnly": True}, use_external_data_format=True)


def main() -> None:
    from deploylm.benchmarking.workload import STANDARD_PROMPTS
    from deploylm.export.calibration import TextSet, graph_feeds, text_sets, token_ids
    from deploylm.export.quality import measure_quality
    from deploylm.models.source import folder_source
    from deploylm.models.tokenizer import load_tokenizer
    from deploylm.profiles import load_profile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path, help="an fp32 artifact folder (deploylm export --profile fp32)")
    parser.add_argument("variants", nargs="*", default=["int8", "rowwise", "alpha=0", "rowwise-head", "padded",
                                                               "fp32-head"])
    parser.add_argument("--texts", type=Path, help="a text file, one text a line, to score perplexity on")
    args = parser.parse_args()
    samples = load_profile("int8-rowwise").quantization.calibration_samples
    calib, held = text_sets(SimpleNamespace(kind="gguf", path=args.artifact), None, samples, False)
    if args.texts:
        held = TextSet(tuple(held.inputs) + STANDARD_PROMPTS, None, "builtin",
                       scored=tuple(line for line in args.texts.read_text().splitlines() if line.strip()))
    tokenizer = load_tokenizer(folder_source(args.artifact))
    feeds = graph_feeds(args.artifact, token_ids(tokenizer, calib.inputs, 64))["model.onnx"]
    print(f"{len(feeds)} calibration feeds, {len(held.inputs)} prompts for beam-4 agreement, "
          f"{len(held.scored) if held.scored else 'built-in'} perplexity texts")
    with tempfile.TemporaryDirectory(prefix="rowwise-variants-") as tmp:
        for variant in args.variants:
            start = time.perf_counter()
            out = Path(tmp) / variant.replace("=", "-")
            quantize_variant(args.artifact, out, variant, feeds)
            r = measure_quality(args.artifact, out, held, rounds=0)
            print(f"{variant:>10}: perplexity {r.perplexity_increase:+.2%}, beam-4 agreement {r.beam_agreement:.3f} "
                  f"({r.sequences_identical}/{r.prompts} identical), next token top-1 {r.top1_agreement:.3f}, "
                  f"KL {r.mean_kl:.4f}  [{time.perf_counter() - start:.0f} s]", flush=True)
            shutil.rmtree(out)


if __name__ == "__main__":
    main()
