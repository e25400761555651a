"""How close fp32 greedy decoding can get to the memory bandwidth (issue 7, the greedy 3.5x target).

A greedy step over 8 prompts reads every fp32 weight once for 8 rows of arithmetic, so it is bound by
how fast the MatMul kernel streams weights. This measures, on the machine at hand:
- the read bandwidth (`torch.sum` over 540 MB, SmolLM2-135M's fp32 weights, at 1 and `--threads`);
- a chain of `--layers` MLP-shaped MatMuls (576 -> 3072 -> 576, Tanh between them: 318 MB at 30 layers)
  at 8 and 32 rows, interleaved, as ONNX Runtime fp32 MatMul, as the same MatMuls over one layer's
  weights shared by every layer (`fp32-cached`: 14 MB that stay in a 32 MB L3, so the kernel's own rate
  without DRAM), as MatMulNBits with 4-bit and 8-bit
  weights at fp32 compute (accuracy_level 1: the same fp32 arithmetic on fewer bytes; exact for
  weights on a GGUF grid), as MatMulNBits 4-bit and 8-bit at accuracy_level 4 (int8 activations per
  block), as DynamicQuantizeMatMul (`dynamic-int8`: uint8 activations per tensor x int8 weights per column,
  the int8-dynamic profile's kernel), as the int8-rowwise profile's pattern (`rowwise-int8`: uint8
  activations with a scale and zero point per row, MatMulInteger, deploylm.export.rowwise's ops), and as torch
  `F.linear` (fp32 rows only; with `--inductor` also compiled by torch.compile with freezing and
  inductor's C++ GEMM template, which autotunes against MKL: ~30 s of compiling first); with `--blas`
  also as numpy's OpenBLAS (`x @ W`) and oneDNN's packed linear (`torch.ops.mkldnn._linear_pointwise`
  on weights reordered for the row count once, as inductor's CPU freezing does).

    .venv/bin/python benchmarks/matmul_bandwidth.py [--layers 30] [--threads 2] [--runs 7] [--inductor] [--blas]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

K, F = 576, 1536          # SmolLM2-135M: hidden size, MLP width (gate and up fused: 2F)


def block_quantize(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """w [K, N] -> MatMulNBits' B [N, K/32, 32*bits/8] uint8 and scales [N * K/32] (symmetric, block 32)."""
    k, n = w.shape
    blocks = w.reshape(k // 32, 32, n)
    top = 2 ** (bits - 1)
    scale = np.abs(blocks).max(1) / (top - 1) + 1e-12                                 # [K/32, N]
    q = (np.clip(np.round(blocks / scale[:, None, :]), -top, top - 1) + top).astype(np.uint8)
    q = q.transpose(2, 0, 1)                                                           # [N, K/32, 32]
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return np.ascontiguousarray(q), scale.T.reshape(-1).astype(np.float32)


def chain_session(kind: str, layers: int, threads: int, rng: np.random.Generator):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, x = [], [], "x"
    for layer in range(layers):
        for name, (k, n) in (("up", (K, 2 * F)), ("down", (2 * F, K))):
            w = (rng.standard_normal((k, n)) * 0.02).astype(np.float32)
            out = f"{name}{layer}"
            if kind == "fp32-cached":                     # every layer reads layer 0's weights
                if layer == 0:
                    inits.append(numpy_helper.from_array(w, f"w_{name}"))
                nodes.append(helper.make_node("MatMul", [x, f"w_{name}"], [out]))
            elif kind in ("fp32", "rowwise-int8"):
                inits.append(numpy_helper.from_array(w, f"w_{out}"))
                nodes.append(helper.make_node("MatMul", [x, f"w_{out}"], [out]))
            elif kind == "dynamic-int8":                  # DynamicQuantizeMatMul: u8 activations per tensor x s8 weights
                from deploylm.export.rowwise import quantize_weight

                q, scale = quantize_weight(w, reduce_range=False)                        # int8, one scale per column
                inits += [numpy_helper.from_array(q, f"q_{out}"), numpy_helper.from_array(scale, f"s_{out}")]
                nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, f"q_{out}", f"s_{out}"], [out],
                                              domain="com.microsoft"))
            else:
                bits, level = {"nbits4-fp32": (4, 1), "nbits8-fp32": (8, 1), "nbits4-int8": (4, 4),
                               "nbits8-int8": (8, 4)}[kind]
                b, s = block_quantize(w, bits)
                inits += [numpy_helper.from_array(b, f"b_{out}"), numpy_helper.from_array(s, f"s_{out}")]
                nodes.append(helper.make_node("MatMulNBits", [x, f"b_{out}", f"s_{out}"], [out], domain="com.microsoft",
                                              K=k, N=n, bits=bits, block_size=32, accuracy_level=level))
            if name == "up":
                nodes.append(helper.make_node("Tanh", [out], [out + "_t"]))
                x = out + "_t"
            else:
                x = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", K])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    if kind == "rowwise-int8":                            # the int8-rowwise profile's own rewrite, unsmoothed
        from deploylm.export import rowwise

        rowwise.rewrite(model, rowwise.target_nodes(model), None, 0.0, reduce_range=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compiled_chain(linear: list) -> Any:
    """The F.linear chain as a module compiled with frozen weights and inductor's C++ GEMM template."""
    import torch
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.max_autotune = True
    inductor.max_autotune_gemm_backends = "CPP,ATEN"

    class Chain(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weights = torch.nn.ParameterList([torch.nn.Parameter(w, requires_grad=False) for pair in linear for w in pair])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for up, down in zip(self.weights[0::2], self.weights[1::2]):
                x = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, up)), down)
            return x

    return torch.compile(Chain().eval())


def blas_chains(linear: list, rows: int) -> dict[str, Any]:
    """The same chain on numpy's BLAS (OpenBLAS in numpy's wheels) and on oneDNN's packed linear."""
    import torch

    arrays = [(up.T.numpy().copy(), down.T.numpy().copy()) for up, down in linear]        # x @ W: [K, N]
    packed = [(torch.ops.mkldnn._reorder_linear_weight(up, rows), torch.ops.mkldnn._reorder_linear_weight(down, rows))
              for up, down in linear]

    def numpy_chain(x: torch.Tensor) -> np.ndarray:
        h = x.numpy()
        for up, down in arrays:
            h = np.tanh(h @ up) @ down
        return h

    def onednn_chain(x: torch.Tensor) -> torch.Tensor:
        for up, down in packed:
            x = torch.ops.mkldnn._linear_pointwise(torch.ops.mkldnn._linear_pointwise(x, up, None, "tanh", [], ""),
                                                   down, None, "none", [], "")
        return x

    return {"numpy OpenBLAS": numpy_chain, "oneDNN packed": onednn_chain}


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--inductor", action="store_true", help="also the torch chain compiled by inductor (CPP GEMM)")
    parser.add_argument("--blas", action="store_true", help="also numpy's OpenBLAS and oneDNN's packed linear")
    args = parser.parse_args()
    weights = torch.randn(135_000_000)
    for threads in (1, args.threads):
        torch.set_num_threads(threads)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            weights.sum()
            times.append(time.perf_counter() - start)
        print(f"read bandwidth, {threads} thread(s): {540e6 / statistics.median(times) / 1e9:.1f} GB/s (median)")
    del weights
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    mbytes = args.layers * 2 * K * 2 * F * 4 / 1e6
    sessions = {kind: chain_session(kind, args.layers, args.threads, rng)
                for kind in ("fp32", "fp32-cached", "nbits4-fp32", "nbits8-fp32", "nbits4-int8", "nbits8-int8",
                             "dynamic-int8", "rowwise-int8")}
    linear = [(torch.randn(2 * F, K) * 0.02, torch.randn(K, 2 * F) * 0.02) for _ in range(args.layers)]

    def torch_chain(x: torch.Tensor) -> torch.Tensor:
        for up, down in linear:
            x = torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, up)), down)
        return x

    torch_chains = {"torch F.linear": torch_chain}
    if args.inductor:
        torch_chains["torch inductor"] = compiled_chain(linear)
    for rows in (8, 32):
        if args.blas:
            torch_chains.update(blas_chains(linear, rows))
        x = rng.standard_normal((rows, K)).astype(np.float32)
        times: dict[str, list[float]] = {name: [] for name in [*sessions, *torch_chains]}
        for _ in range(args.runs + 1):                        # the first round is a warm-up
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                times[name].append(time.perf_counter() - start)
            for name, chain in torch_chains.items():
                with torch.no_grad():
                    start = time.perf_counter()
                    chain(torch.from_numpy(x))
                    times[name].append(time.perf_counter() - start)
        print(f"{rows} rows, {args.layers} layers ({mbytes:.0f} MB of fp32 weights):")
        for name, ts in times.items():
            ms = 1000 * statistics.median(ts[1:])
            print(f"  {name:>15}: {ms:7.2f} ms  ({mbytes / ms:.1f} GB/s of fp32-equivalent weights)")


if __name__ == "__main__":
    main()
