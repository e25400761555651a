"""The issue-7 peers, measured in one run on this machine: transformers.generate, onnxruntime-genai fp32
and deploylm's onnx backend on the bench workload (8 standard prompts, one left-padded batch, exactly
64 new tokens, 2 threads), interleaved rounds after a warm-up, medians.

onnxruntime-genai is not a deploylm dependency; run this in a separate virtual environment that has it
(and this checkout on sys.path, which the script adds itself):

    python3 -m venv /tmp/peers && /tmp/peers/bin/pip install torch==2.13.0 onnxruntime==1.32.0 \\
        onnxruntime-genai==0.18.0 onnx onnx_ir transformers gguf accelerate click tokenizers safetensors
    /tmp/peers/bin/python benchmarks/peers.py prepare --gguf $GGUF --out /tmp/peers-models   # ~15 s
    /tmp/peers/bin/python benchmarks/peers.py run --models /tmp/peers-models \\
        --artifact export/smollm2-fp32-v2 --num-beams 4 [--rounds 3] [--json FILE]

    /tmp/peers/bin/python benchmarks/peers.py step --models /tmp/peers-models \
        --artifact export/smollm2-fp32-v2 [--rows 8] [--past 100] [--runs 20]

`step` times one decode step of onnxruntime-genai's graph (its K/V buffer shared between past and
present, as onnxruntime-genai runs greedy search) against deploylm's graph (benchmarks/onnx_step.py's
feeds and bindings), interleaved, with the same ORT session options (2 threads, spinning off).

`prepare` writes the GGUF's weights as a plain fp32 Hugging Face folder (`hf/`) and builds
onnxruntime-genai's fp32 CPU model from it with its own model builder (`genai-fp32/`). `run` gives
onnxruntime-genai ORT's default spinning threads (its own default) and 2 intra-op threads; deploylm
runs as a user gets it (`deploylm.load(artifact, backend="onnx")`), and again with `spin=True` (its
threads spin 20 us between kernels, as onnxruntime-genai's spin by default). Token agreement is counted
against transformers, row by row over the 64 new tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NEW_TOKENS = 64


def prepare(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    hf = out / "hf"
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    plain = LlamaForCausalLM(model.config)              # a GGUF-loaded model refuses save_pretrained
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(hf)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf)
    config = json.loads((hf / "config.json").read_text())
    config.pop("quantization_config", None)             # the genai builder refuses "gguf" quantization
    (hf / "config.json").write_text(json.dumps(config, indent=1))
    subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf),
                    "-o", str(out / "genai-fp32"), "-p", "fp32", "-e", "cpu"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    genai_config = out / "genai-fp32" / "genai_config.json"
    config = json.loads(genai_config.read_text())
    config["model"]["decoder"]["session_options"].update(intra_op_num_threads=2, inter_op_num_threads=1)
    genai_config.write_text(json.dumps(config, indent=1))
    print(f"wrote {hf} and {out / 'genai-fp32'}")


def runners(models: Path, artifact: Path, beams: int) -> dict[str, object]:
    import numpy as np
    import onnxruntime_genai as og
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import deploylm
    from deploylm.benchmarking.workload import STANDARD_PROMPTS

    prompts = list(STANDARD_PROMPTS)
    tok = AutoTokenizer.from_pretrained(models / "hf")
    tok.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(models / "hf", dtype=torch.float32).eval()
    enc = tok(prompts, return_tensors="pt", padding=True)
    width = enc.input_ids.shape[1]

    def transformers_generate() -> list[list[int]]:
        with torch.inference_mode():
            out = hf.generate(**enc, num_beams=beams, do_sample=False, max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS)
        return [row[width:].tolist() for row in out]

    genai = og.Model(str(models / "genai-fp32"))
    ids = enc.input_ids.numpy().astype(np.int32)        # left-padded with the pad id, as transformers has it

    def genai_generate() -> list[list[int]]:
        params = og.GeneratorParams(genai)
        params.set_search_options(max_length=width + NEW_TOKENS, min_length=width + NEW_TOKENS, num_beams=beams,
                                  do_sample=False, batch_size=len(prompts), past_present_share_buffer=beams == 1)
        generator = og.Generator(genai, params)
        generator.append_tokens(ids)
        while not generator.is_done():
            generator.generate_next_token()
        return [list(generator.get_sequence(i))[width:] for i in range(len(prompts))]

    def deploylm_generate(spin: bool):
        ours = deploylm.load(artifact, backend="onnx", threads=2, spin=spin)

        def generate() -> list[list[int]]:
            results = ours.generate(prompts, num_beams=beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
            return [list(r.sequences[0].token_ids) for r in results]
        return generate

    torch.set_num_threads(2)
    return {"transformers.generate fp32": transformers_generate, "onnxruntime-genai fp32": genai_generate,
            f"deploylm onnx ({artifact.name})": deploylm_generate(False),
            f"deploylm onnx ({artifact.name}), spin": deploylm_generate(True)}


def run(models: Path, artifact: Path, beams: int, rounds: int, json_path: Path | None) -> None:
    rows = runners(models, artifact, beams)
    tokens = {name: fn() for name, fn in rows.items()}   # warm-up
    times: dict[str, list[float]] = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    reference_name = next(iter(rows))
    reference = statistics.median(times[reference_name])
    print(f"num_beams {beams}, {rounds} interleaved rounds after a warm-up, load average {os.getloadavg()[0]:.1f}")
    report = []
    for name in rows:
        median = statistics.median(times[name])
        same = sum(a[:NEW_TOKENS] == b[:NEW_TOKENS] for a, b in zip(tokens[name], tokens[reference_name]))
        report.append({"row": name, "median_s": median, "x_transformers": reference / median,
                       "rounds_s": times[name], "rows_identical_to_transformers": same})
        print(f"  {name:34s} {median:6.2f} s  x{reference / median:4.2f}  rounds "
              f"{' '.join(f'{t:.2f}' for t in times[name])}  tokens = transformers {same}/{len(tokens[name])}")
    if json_path:
        json_path.write_text(json.dumps({"num_beams": beams, "rounds": rounds, "rows": report}, indent=1))


def step(models: Path, artifact: Path, rows: int, past: int, runs: int) -> None:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import onnx_step

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 2, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    genai = ort.InferenceSession(str(models / "genai-fp32" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    binding = genai.io_binding()
    ids, mask = rng.integers(0, 49152, (rows, 1)).astype(np.int64), np.ones((rows, past + 1), np.int64)
    binding.bind_cpu_input("input_ids", ids)               # by pointer: ids and mask must outlive the runs
    binding.bind_cpu_input("attention_mask", mask)
    keep = [ids, mask]
    decoder = json.loads((models / "genai-fp32" / "genai_config.json").read_text())["model"]["decoder"]
    heads, head_dim = decoder["num_key_value_heads"], decoder["head_size"]
    for arg in genai.get_inputs():
        if arg.name.startswith("past_key_values."):
            buffer = ort.OrtValue.ortvalue_from_numpy(
                rng.standard_normal((rows, heads, past + 28, head_dim)).astype(np.float32))
            binding.bind_ortvalue_input(arg.name, buffer)                   # one buffer: past and present
            binding.bind_ortvalue_output(arg.name.replace("past_key_values", "present"), buffer)
            keep.append(buffer)
    logits = np.empty((rows, 1, 49152), np.float32)
    binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(logits))
    ours = onnx_step.open_session(str(artifact / "model.onnx"), 2)
    ours_feeds = onnx_step.feeds_for(ours, rows, past)
    ours_binding, ours_outputs = onnx_step.bind(ours, ours_feeds, rows, past)
    keep += [ours_feeds, ours_outputs]                     # bound by pointer: kept alive until the end
    sessions = {"onnxruntime-genai fp32": (genai, binding), f"deploylm ({artifact.name})": (ours, ours_binding)}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for session, bound in sessions.values():
        session.run_with_iobinding(bound)                                    # warm-up
    for _ in range(runs):
        for name, (session, bound) in sessions.items():
            start = time.perf_counter()
            session.run_with_iobinding(bound)
            times[name].append(time.perf_counter() - start)
    print(f"one decode step, {rows} rows, past {past}, {runs} interleaved runs, load {os.getloadavg()[0]:.1f}")
    for name, ts in times.items():
        print(f"  {name:34s} median {1e3 * statistics.median(ts):.1f} ms (min {1e3 * min(ts):.1f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run")
    r.add_argument("--models", type=Path, required=True)
    r.add_argument("--artifact", type=Path, default=ROOT / "export" / "smollm2-fp32-v2")
    r.add_argument("--num-beams", type=int, default=4)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--json", type=Path)
    st = sub.add_parser("step")
    st.add_argument("--models", type=Path, required=True)
    st.add_argument("--artifact", type=Path, default=ROOT / "export" / "smollm2-fp32-v2")
    st.add_argument("--rows", type=int, default=8)
    st.add_argument("--past", type=int, default=100)
    st.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.gguf, args.out)
    elif args.command == "step":
        step(args.models, args.artifact, args.rows, args.past, args.runs)
    else:
        run(args.models, args.artifact, args.num_beams, args.rounds, args.json)


if __name__ == "__main__":
    main()
