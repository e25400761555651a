"""A profile's `kv_layout` decides the decoder-only graph's KV layout: the export holds it, the artifact runs it with
the same tokens as PyTorch, and a layout the model cannot take is refused before any graph is exported."""
from __future__ import annotations

import textwrap

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.export import io_spec
from deploylm.profiles import builtin_dir


def _profile(tmp_path, layout: str):
    """The fp32 built-in with `kv_layout` set."""
    text = (builtin_dir() / "fp32.toml").read_text()
    text = text.replace('name = "fp32"', f'name = "fp32-{layout}"')
    text = text.replace('backends = ["onnx"]', f'backends = ["onnx"]\nkv_layout = "{layout}"')
    path = tmp_path / f"fp32-{layout}.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("layout", [io_spec.KV_APPEND, io_spec.KV_CONCAT])
def test_the_profiles_layout_is_exported_and_decodes_as_torch(tiny_llama_dir, tmp_path, layout):
    import deploylm
    from deploylm.artifact import load_artifact

    out = tmp_path / "artifact"
    result = CliRunner().invoke(cli, ["export", "--model", str(tiny_llama_dir), "--profile",
                                      str(_profile(tmp_path, layout)), "--out", str(out)])
    assert result.exit_code == 0, result.output
    artifact = load_artifact(out)
    graph = artifact.io["model.onnx"]
    names = [i["name"] for i in graph["inputs"]], [o["name"] for o in graph["outputs"]]
    assert io_spec.kv_layout(names[1], names[0]) == layout            # and not the default shared-prompt one
    assert artifact.manifest["profile"]["kv_layout"] == layout
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0 and f"kv layout  {layout} (model.onnx; docs/formats.md)" in info.output, info.output
    onnx = artifact.manifest["parity"]["backends"]["onnx"]           # export's own check against torch
    assert artifact.manifest["parity"]["passed"] and onnx["greedy_identical"] and onnx["beams_identical"]
    prompts = ["the cat sat on", "a b c"]
    torch_out = deploylm.load(tiny_llama_dir, backend="torch").generate(prompts, num_beams=3, max_new_tokens=6)
    assert deploylm.load(out).generate(prompts, num_beams=3, max_new_tokens=6) == torch_out


def test_a_layout_the_model_cannot_take_is_refused_before_export(seed_lm_dir, tmp_path):
    out = tmp_path / "artifact"
    result = CliRunner().invoke(cli, ["export", "--model", str(seed_lm_dir), "--profile",
                                      str(_profile(tmp_path, io_spec.KV_SHARED)), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "kv_layout = 'shared-prompt': a deploylm model takes only the 'concat' KV layout" in result.output
    assert 'set kv_layout = "auto" or "concat" in the profile' in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_info_names_each_cached_graphs_layout():
    from deploylm.artifact import kv_layouts

    def names(*items: str) -> list[dict[str, str]]:
        return [{"name": n} for n in items]

    io = {"model.onnx": {"inputs": names("input_ids", "past_key_values.0.key", "prompt_key_values.0.key"),
                         "outputs": names("logits", "new_key_values.0.key")},
          "encoder_model.onnx": {"inputs": names("input_ids"), "outputs": names("last_hidden_state")},
          "decoder_model.onnx": {"inputs": names("input_ids", "past_key_values.0.decoder.key"),
                                 "outputs": names("logits", "present.0.decoder.key")}}
    assert kv_layouts(io) == {"model.onnx": io_spec.KV_SHARED, "decoder_model.onnx": io_spec.KV_CONCAT}


@pytest.mark.parametrize("model, named", [("t5", "an encoder-decoder model"), ("mistral", "a MistralForCausalLM")])
def test_with_layout_names_each_kind_of_model_that_takes_only_concat(tmp_path, tiny_t5_dir, model, named):
    """Encoder-decoders, and causal LMs with sliding-window layers (Mistral with a window), take only the concat
    layout; asking either for another names the model and the way out. Concat itself is always allowed."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from deploylm.errors import UsageError
    from deploylm.export.hf_graphs import with_layout
    from deploylm.export.onnx_export import plan_graphs
    from tests.test_hf_parity import build_layout

    if model == "t5":
        plan = plan_graphs(AutoModelForSeq2SeqLM.from_pretrained(tiny_t5_dir).eval())
    else:
        plan = plan_graphs(AutoModelForCausalLM.from_pretrained(build_layout("mistral", tmp_path / "mistral")).eval())
    for layout in (io_spec.KV_SHARED, io_spec.KV_APPEND):
        with pytest.raises(UsageError, match=rf"kv_layout = '{layout}': {named} takes only the 'concat' KV layout .*"
                                             r'set kv_layout = "auto" or "concat" in the profile'):
            with_layout(plan, layout)
    assert with_layout(plan, io_spec.KV_CONCAT) is plan


def test_auto_layout_is_concat_for_tensorrt_and_static_int8_and_the_models_own_otherwise(tmp_path):
    """kv_layout = "auto": TensorRT engines and static int8 (docs/formats.md) get the concat layout, the other
    profiles the model's own (None: shared-prompt for a Hugging Face causal LM); a set kv_layout is kept."""
    from deploylm.export.pipeline import kv_layout
    from deploylm.profiles import load_profile

    for name in ("trt-fp16", "trt-int8", "int8-static"):
        assert kv_layout(load_profile(name)) == io_spec.KV_CONCAT, name
    for name in ("fp32", "fp16", "bf16", "int8", "int8-dynamic", "int4"):
        assert kv_layout(load_profile(name)) is None, name
    assert kv_layout(load_profile(_profile(tmp_path, io_spec.KV_APPEND))) == io_spec.KV_APPEND


def test_a_model_with_some_sliding_window_layers_takes_only_concat():
    """A causal LM whose layers are only partly sliding-window (Qwen2 with max_window_layers: layer 0 full, layer 1
    sliding) is exported in the concat layout like an all-sliding one (docs/formats.md), and refuses the others."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache, Qwen2Config
    from transformers.cache_utils import DynamicLayer

    from deploylm.errors import UsageError
    from deploylm.export.hf_graphs import with_layout
    from deploylm.export.onnx_export import plan_graphs

    config = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    kinds = [type(layer) is DynamicLayer for layer in DynamicCache(config=model.config).layers]
    assert kinds == [True, False]                                      # one plain layer, one sliding one
    plan = plan_graphs(model)
    assert plan.dims.kv_layout == io_spec.KV_CONCAT and plan.graphs[0][1].layout == io_spec.KV_CONCAT
    with pytest.raises(UsageError, match="a Qwen2ForCausalLM takes only the 'concat' KV layout"):
        with_layout(plan, io_spec.KV_SHARED)
