"""The torch backend's dtype "int8" (dynamic int8 Linear layers, CPU): it really quantizes, its logits stay
within the int8 profile's parity tolerances of fp32 (teacher-forced along fp32's greedy path, as `deploylm
parity` measures), and it is reachable from `deploylm.load` and `deploylm generate`; CUDA is one clear error."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from deploylm.backends.torch_backend import TorchBackend
from deploylm.backends.torch_int8 import quantize_int8, quantized_linears
from deploylm.cli import cli
from deploylm.errors import UsageError
from deploylm.generator import load
from deploylm.profiles import load_profile

PROMPTS = ["the quick brown fox jumps", "hello", "one two three"]
STEPS = 8


@pytest.fixture(scope="module")
def sources(tiny_gpt2_dir, tiny_llama_dir, tiny_t5_dir, seed_seq2seq_dir, seed_lm_dir):
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir, "t5": tiny_t5_dir,
            "seed-seq2seq": seed_seq2seq_dir, "seed-lm": seed_lm_dir}


def forced_logits(backend, batch, steps: int, path: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [steps, R, V] along `path` [steps, R] (default: this backend's own greedy tokens) and the path."""
    logits, state = backend.prefill(batch)
    out, tokens = [logits], []
    for step in range(steps - 1):
        token = logits.argmax(-1) if path is None else path[step]
        tokens.append(token)
        logits, state = backend.decode(token, state)
        out.append(logits)
    tokens.append(out[-1].argmax(-1) if path is None else path[steps - 1])
    return torch.stack(out), torch.stack(tokens)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "t5", "seed-seq2seq", "seed-lm"])
def test_int8_logits_within_the_int8_profile_tolerances(sources, kind):
    tol = load_profile("int8").parity
    ref = load(sources[kind])
    int8 = load(sources[kind], dtype="int8")
    assert quantized_linears(int8.backend.model) > 0
    assert quantized_linears(ref.backend.model) == 0
    batch = ref.encode(PROMPTS)
    expected, path = forced_logits(ref.backend, batch, STEPS)
    got, _ = forced_logits(int8.backend, batch, STEPS, path)
    assert got.dtype == torch.float32
    diff = (got - expected).abs().max().item()
    assert 0 < diff <= tol.logits_atol, f"{kind}: max |Δ logit| {diff}"   # > 0: the int8 kernels really ran
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= tol.min_token_agreement, f"{kind}: top-1 agreement {agreement}"


def test_gpt2_conv1d_layers_are_quantized_too(tiny_gpt2_dir):
    fp32 = TorchBackend.from_source(str(tiny_gpt2_dir))
    int8 = TorchBackend.from_source(str(tiny_gpt2_dir), dtype="int8")
    conv1d = sum(1 for m in fp32.model.modules() if type(m).__name__ == "Conv1D")
    assert conv1d > 0
    assert sum(1 for m in int8.model.modules() if type(m).__name__ == "Conv1D") == 0
    assert quantized_linears(int8.model) == conv1d + 1  # + lm_head


def test_int8_on_cuda_is_one_clear_error(tiny_llama_dir):
    with pytest.raises(UsageError, match="dtype int8 .* runs on CPU only"):
        TorchBackend.from_source(str(tiny_llama_dir), device="cuda", dtype="int8")


def test_model_without_linear_layers_is_refused():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.LayerNorm(4))
    with pytest.raises(UsageError, match="dtype int8: Sequential has no Linear layers"):
        quantize_int8(model)


def test_missing_quantize_dynamic_is_one_clear_error(monkeypatch):
    import torch.ao.quantization as tq

    monkeypatch.delattr(tq, "quantize_dynamic")
    with pytest.raises(UsageError, match="no torch.ao.quantization.quantize_dynamic"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_a_quantization_failure_inside_torch_is_one_clear_error(monkeypatch):
    """torch.ao's own errors (an engine without a kernel, an unsupported module) become one UsageError naming
    the model type and torch's first line, not a traceback from inside torch."""
    import torch.ao.quantization as tq

    def fails(*_, **__):
        raise RuntimeError("Didn't find engine for operation quantized::linear_prepack NoQEngine\nmore detail")
    monkeypatch.setattr(tq, "quantize_dynamic", fails)
    with pytest.raises(UsageError, match=r"^dtype int8: torch dynamic quantization failed on Sequential: "
                                         r"Didn't find engine for operation quantized::linear_prepack NoQEngine$"):
        quantize_int8(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_cli_generate_with_int8(tiny_llama_dir):
    args = ["generate", "--model", str(tiny_llama_dir), "--json", "--num-beams", "2", "--max-new-tokens", "4"]
    out = CliRunner().invoke(cli, [*args, "--dtype", "int8", "hello"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout.splitlines()[0])
    assert line["prompt"] == "hello" and 1 <= len(line["outputs"][0]["token_ids"]) <= 4
    bad = CliRunner().invoke(cli, [*args, "--dtype", "int8", "--device", "cuda", "hello"])
    assert bad.exit_code == 2
    assert len(bad.output.strip().splitlines()) == 1 and "runs on CPU only" in bad.output


def test_weights_get_one_scale_per_output_channel():
    """The module docstring's "one scale per output channel": a row of small weights next to a row of
    large ones keeps its precision (one scale for the whole tensor would round the small row to zero)."""
    layer = torch.nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1e-3, -2e-3, 3e-3, -4e-3], [10.0, -20.0, 30.0, -40.0]]))
    model = quantize_int8(torch.nn.Sequential(layer))
    weight = model[0].weight()
    assert weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
    small = weight.dequantize()[0]
    torch.testing.assert_close(small, torch.tensor([1e-3, -2e-3, 3e-3, -4e-3]), atol=4e-3 / 127, rtol=0)
