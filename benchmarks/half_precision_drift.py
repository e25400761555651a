"""How far a causal model's logits move from fp32 when PyTorch computes in fp16 or bf16 — three ways.

The torch backend's `--dtype float16|bfloat16` casts the whole model (weights, activations, the residual
stream, the logits). The fp16/bf16 profiles' [parity] budgets (logits_atol 0.05 / 0.25) were set for the
ONNX exports, whose auto fallback keeps nodes in fp32 until parity holds. This script measures, on one
model and on `--device`, the max |Δ logit| and top-1 agreement against fp32 of:

  cast          the model cast to the dtype (what `--dtype` does)
  fp32-lm-head  the same, with the last hidden state and the output projection in fp32
  autocast      fp32 weights under torch.autocast(dtype): matrix products in the dtype, the rest fp32

Teacher forcing over one full-sequence forward: 8 prompts of 16 random tokens, then fp32 greedy's 64 new
tokens; the logits of the 64 generated positions (8 × 64 × vocabulary) are compared.

    .venv/bin/python benchmarks/half_precision_drift.py --model $GGUF [--device cuda] [--new-tokens 64]

What it showed (docs/benchmarks.md, "GPU, third session"): on the real SmolLM2-135M no mode keeps fp16
within 0.05 nor bf16 within 0.25 (CPU: cast 0.22 / 1.69, fp32-lm-head 0.22 / 1.68, autocast 0.12 / 0.60);
the drift comes from the 30 layers, not from rounding the logits.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploylm.models import hf                         # noqa: E402
from deploylm.models.source import resolve_source      # noqa: E402


def drift(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """(max |Δ logit|, top-1 agreement) of logits [B, N, V] against the fp32 reference [B, N, V]."""
    agreement = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return (logits - reference).abs().max().item(), agreement


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Hugging Face folder or a .gguf file (causal)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source, device = resolve_source(args.model), torch.device(args.device)
    fp32 = hf.load_hf_model(source, dtype=torch.float32, device=device)
    prompts = torch.randint(3, fp32.config.vocab_size, (8, 16), generator=torch.Generator().manual_seed(1)).to(device)
    start = prompts.shape[1] - 1   # logits at this position predict the first new token
    with torch.inference_mode():
        ids = fp32.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=args.new_tokens,
                            min_new_tokens=args.new_tokens, do_sample=False, num_beams=1,
                            pad_token_id=fp32.config.eos_token_id)                  # [8, 16 + N]
        reference = fp32(ids).logits[:, start:-1].float()                           # [8, N, V]
    print(f"{args.model} on {args.device}: fp32 logits up to {reference.abs().max().item():.1f} in magnitude")
    print(f"{'dtype':>9} {'mode':>13} {'max |Δ logit|':>14} {'top-1 agreement':>16}")
    for dtype in (torch.float16, torch.bfloat16):
        half = hf.load_hf_model(source, dtype=dtype, device=device)
        with torch.inference_mode():
            hidden = half.model(ids).last_hidden_state                               # [8, T, D] in dtype
            modes = {"cast": half.lm_head(hidden)[:, start:-1].float(),
                     "fp32-lm-head": torch.nn.functional.linear(hidden.float(), fp32.lm_head.weight)[:, start:-1]}
            autocast = torch.autocast(device.type, dtype=dtype) if device.type in ("cpu", "cuda") else contextlib.nullcontext()
            with autocast:
                modes["autocast"] = fp32(ids).logits[:, start:-1].float()
        del half
        for mode, logits in modes.items():
            dmax, agree = drift(reference, logits)
            print(f"{str(dtype).removeprefix('torch.'):>9} {mode:>13} {dmax:>14.3f} {agree:>16.4f}")


if __name__ == "__main__":
    main()
