"""Where export's calibration and held-out text come from for a deploylm checkpoint: the task or the
--data file it was trained on (metrics.json), never English text the model never saw when its own
data is at hand; and the quality line says which it was."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.export.calibration import HELD_OUT_TEXT, describe, perplexity_texts, text_sets
from deploylm.models.source import Source
from deploylm.training.stories import stories
from deploylm.training.text import text_splits


def _checkpoint(seed_lm_dir, tmp_path, record):
    folder = shutil.copytree(seed_lm_dir, tmp_path / "lm")
    (folder / "metrics.json").write_text(json.dumps(record))
    return Source("checkpoint", folder)


def test_a_stories_model_is_judged_on_held_out_stories(seed_lm_dir, tmp_path):
    source = _checkpoint(seed_lm_dir, tmp_path, {"task": "stories", "arch": "decoder", "seed": 3})
    calib, held = text_sets(source, None, 8, seq2seq=False)
    splits = text_splits("task stories", stories(3), 3)        # what `train --task stories --seed 3` used
    assert calib.origin == held.origin == "task:stories" and len(calib.inputs) == 8
    assert set(calib.inputs) <= set(splits.train) and held.scored and set(held.scored) <= set(splits.test)
    assert perplexity_texts(held) == (held.scored, None)
    assert all(doc.startswith(prompt) for prompt, doc in zip(held.inputs, held.scored)) and held.inputs
    assert describe(held.origin) == "the test split of task stories"


def test_a_data_model_is_judged_on_its_own_test_split(seed_lm_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("\n\n".join(f"paragraph {i}: the otter number {i} swims past the mill." for i in range(60)))
    source = _checkpoint(seed_lm_dir, tmp_path, {"task": None, "data": str(data), "arch": "decoder", "seed": 0})
    calib, held = text_sets(source, None, 4, seq2seq=False)
    assert held.origin == f"data:{data}" and all("otter" in doc for doc in held.scored)
    assert all("otter" in doc for doc in calib.inputs)
    data.unlink()                                   # moved since training: the built-in text, said so
    calib, held = text_sets(source, None, 4, seq2seq=False)
    assert held.origin == "builtin" and perplexity_texts(held) == (HELD_OUT_TEXT, None)


def test_a_seq2seq_data_model_is_judged_on_its_pairs(seed_seq2seq_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"source": f"{i}", "target": f"n{i}"}) + "\n" for i in range(80)))
    folder = shutil.copytree(seed_seq2seq_dir, tmp_path / "s2s")
    (folder / "metrics.json").write_text(json.dumps({"data": str(data), "arch": "seq2seq"}))
    calib, held = text_sets(Source("checkpoint", folder), None, 4, seq2seq=True)
    assert held.origin == f"data:{data}" and held.targets == tuple(f"n{s}" for s in held.inputs)
    assert calib.targets == tuple(f"n{s}" for s in calib.inputs)



@pytest.mark.parametrize("count", [20, 9])
def test_a_distilled_hugging_face_student_is_judged_on_the_tail_of_its_lines_or_on_built_in_text(tmp_path, count):
    """distill.json with arch "lines": the last tenth of --data's non-blank lines is held out, the rest is
    calibration material; a file of fewer than 10 lines has no tenth to hold out, and the built-in text is used
    (said so by its origin) instead of an empty held-out set."""
    data = tmp_path / "lines.txt"
    lines = [f"line {i}: a heron stands in the reeds." for i in range(count)]
    data.write_text("\n\n".join(lines) + "\n")                       # blank lines are not lines
    student = tmp_path / "student"
    student.mkdir()
    (student / "distill.json").write_text(json.dumps({"data": str(data), "arch": "lines"}))
    calib, held = text_sets(Source("hf", student), None, 4, seq2seq=False)
    if count >= 10:
        assert held.origin == f"data:{data}" and held.scored == tuple(lines[-(count // 10):])
        assert set(calib.inputs) <= set(lines[:-(count // 10)]) and calib.inputs
    else:
        assert held.origin == calib.origin == "builtin" and perplexity_texts(held) == (HELD_OUT_TEXT, None)


@pytest.mark.slow
def test_export_of_a_stories_model_quantizes_and_names_its_held_out_text(seed_lm_dir, tmp_path):
    source = _checkpoint(seed_lm_dir, tmp_path, {"task": "stories", "arch": "decoder", "seed": 0})
    out = tmp_path / "art"
    result = CliRunner().invoke(cli, ["export", "--model", str(source.path), "--profile", "int8", "--out", str(out),
                                      "--allow-quality-loss"])    # a random model: the budget is not the point
    assert result.exit_code == 0, result.output
    assert "quality (held out: the test split of task stories): perplexity" in result.output
    assert json.loads((out / "manifest.json").read_text())["quality"]["held_out"] == "task:stories"


def test_percentile_calibration_on_prompts_of_different_lengths(tiny_llama_dir, tmp_path):
    """The percentile calibrator stacks every batch's activations: prompts of different lengths (and a
    last batch of fewer rows) used to crash it with numpy's "inhomogeneous shape" traceback."""
    import dataclasses

    from deploylm.export.pipeline import export_model
    from deploylm.profiles import load_profile

    base = load_profile("int8-static")
    profile = dataclasses.replace(base, name="int8-pct", quantization=dataclasses.replace(
        base.quantization, calibration_method="percentile", calibration_samples=8))
    lines = tmp_path / "calib.txt"
    lines.write_text("\ufeffhello\nthe quick brown fox jumps over the lazy dog\na b\none two three four five six\n"
                     "seven\n")                                          # 5 samples: batches of 4 and 1
    report = export_model(tiny_llama_dir, profile, tmp_path / "pct", calibration=lines, allow_quality_loss=True)
    assert (tmp_path / "pct" / "model.onnx").is_file() and report is not None


def test_a_bom_is_no_calibration_sample(tmp_path):
    from deploylm.export.calibration import read_lines

    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffhello\r\nworld\r\n".encode())
    assert read_lines(bom) == ["hello", "world"]


def test_an_encoder_decoders_decoder_is_calibrated_on_the_pairs_targets(tmp_path):
    """--calibration pairs.jsonl for an encoder-decoder: the decoder side is each pair's target (it was
    the source again, e.g. '366' where the model writes 'three hundred sixty-six')."""
    import json
    from types import SimpleNamespace

    from deploylm.export.calibration import text_sets

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"source": s, "target": t}) + "\n"
                             for s, t in [("366", "three hundred sixty-six"), ("12", "twelve")]))
    source = SimpleNamespace(kind="hf", path=tmp_path)
    calib, _ = text_sets(source, pairs, 8, seq2seq=True)
    assert calib.inputs == ("366", "12") and calib.targets == ("three hundred sixty-six", "twelve")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": "hello"}) + "\n")
    calib, _ = text_sets(source, prompts, 8, seq2seq=True)
    assert calib.targets == ("hello",)                                       # no targets: the text itself
    assert text_sets(source, pairs, 8, seq2seq=False)[0].targets is None


def test_an_encoder_decoders_decoder_is_calibrated_after_its_own_start_token(seed_seq2seq_dir, tmp_path):
    """The decoder's calibration feeds begin with the model's decoder_start_token_id (as every decoded row
    does), not with token 0: for a deploylm checkpoint 0 is the pad token, for BART/mBART the BOS."""
    from deploylm.export.calibration import graph_feeds
    from deploylm.export.pipeline import export_model

    ck = shutil.copytree(seed_seq2seq_dir, tmp_path / "ck")
    gen = json.loads((ck / "generation_config.json").read_text())
    gen["decoder_start_token_id"] = 7                    # generation_config first, as the backends read it
    (ck / "generation_config.json").write_text(json.dumps(gen))
    out = tmp_path / "fp32"
    export_model(ck, "fp32", out)
    feeds = graph_feeds(out, [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]])
    ids = feeds["decoder_model.onnx"][0]["input_ids"]
    assert ids[:, 0].tolist() == [7, 7]
    assert ids[:, 1:].tolist() == [[9, 10, 0], [11, 12, 13]]


def test_calibration_feeds_are_padded_with_the_models_pad_token(seed_seq2seq_dir, tmp_path):
    """Padded positions are masked, but their activations still reach the calibration ranges: they are
    filled with the pad token the backend pads with at run time, not with token 0."""
    from deploylm.export.calibration import graph_feeds
    from deploylm.export.pipeline import export_model

    ck = shutil.copytree(seed_seq2seq_dir, tmp_path / "ck")
    gen = json.loads((ck / "generation_config.json").read_text())
    (ck / "generation_config.json").write_text(json.dumps({**gen, "pad_token_id": 3}))
    out = tmp_path / "fp32"
    export_model(ck, "fp32", out)
    feeds = graph_feeds(out, [[5, 6, 7], [8]], [[9, 10], [11, 12, 13]])
    assert feeds["encoder_model.onnx"][0]["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert feeds["decoder_model.onnx"][0]["input_ids"][:, 1:].tolist() == [[9, 10, 3], [11, 12, 13]]


def test_a_calibration_file_gives_at_most_the_samples_asked_and_pairs_only_when_every_record_has_a_target(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("\n".join(json.dumps(r) for r in [{"source": "a b", "target": "1 2"}, {"source": "c", "target": "3"},
                                                        {"source": "d e", "target": "4 5"}]) + "\n")
    hf = Source("hf", tmp_path)
    calib, held = text_sets(hf, pairs, 2, seq2seq=True)
    assert calib.inputs == ("a b", "c") and calib.targets == ("1 2", "3") and calib.origin == f"file:{pairs}"
    assert held.origin == "builtin"
    assert text_sets(hf, pairs, 2, seq2seq=False)[0].targets is None
    pairs.write_text('{"source": "a b", "target": "1 2"}\n{"source": "c"}\n')     # one without a target
    calib, _ = text_sets(hf, pairs, 8, seq2seq=True)
    assert calib.inputs == ("a b", "c") and calib.targets == ("a b", "c")          # the sources feed the decoder


@pytest.mark.parametrize("samples", [1, 5, 70])
def test_the_builtin_calibration_text_gives_exactly_the_samples_asked(tmp_path, samples):
    calib, _ = text_sets(Source("hf", tmp_path), None, samples, seq2seq=False)
    assert len(calib.inputs) == samples and calib.origin == "builtin" and all(calib.inputs)


class _Session:
    """An onnxruntime session stand-in for a decoder-only graph without K/V: logits favour token (id + 1)."""

    def get_inputs(self):
        return []

    def get_outputs(self):
        from types import SimpleNamespace

        return [SimpleNamespace(name="logits")]

    def run(self, _, feeds):
        import numpy as np

        ids = feeds["input_ids"]
        logits = np.zeros((*ids.shape, 16), np.float32)
        np.put_along_axis(logits, (ids + 1)[..., None], 1.0, axis=-1)
        return [logits]


def test_causal_calibration_feeds_are_left_padded_with_positions_and_one_step_after():
    """Prefill: left padding with the pad token, mask, positions counting real tokens from 0; the decode
    step after it: the model's own next token at the next position, the mask one column wider."""
    from deploylm.export.calibration import _causal_feeds, _causal_step_feeds

    prefill = _causal_feeds(_Session(), [[5, 6, 7], [8]], pad=9)
    assert prefill["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert prefill["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert prefill["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0]]
    step = _causal_step_feeds(_Session(), prefill)
    assert step["input_ids"].tolist() == [[8], [9]]
    assert step["position_ids"].tolist() == [[3], [1]]
    assert step["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_calibration_token_ids_are_cut_and_empty_texts_dropped():
    from deploylm.export.calibration import token_ids

    tok = lambda text: {"input_ids": [int(w) for w in text.split()]}   # noqa: E731
    assert token_ids(tok, ("1 2 3 4", "", "5"), max_len=3) == [[1, 2, 3], [5]]


def test_a_shared_prompt_graphs_decode_feed_splits_the_prefill_between_prompt_and_past(tiny_gpt2_dir, tmp_path):
    """The decode-step feed of a shared-prompt graph gives the first half of the prefill's positions as the
    prompt K/V and the rest as the past, so both attention branches see real K/V (static ranges, precision
    fallback); the step's logits are the model's own for the prompts followed by the fed token."""
    import onnxruntime as ort
    import torch
    from transformers import AutoModelForCausalLM

    from deploylm.export import io_spec
    from deploylm.export.calibration import graph_feeds
    from deploylm.export.pipeline import export_model

    out = tmp_path / "fp32"
    export_model(tiny_gpt2_dir, "fp32", out)
    prefill, step = graph_feeds(out, [[5, 6, 7, 8, 9], [10, 11]])["model.onnx"][:2]
    n = sum(1 for k in step if k.startswith("past_key_values.")) // 2              # layers
    assert [step[name].shape[2] for name in io_spec.prompt_names(n)] == [2] * 2 * n
    assert [step[name].shape[2] for name in io_spec.past_names(n)] == [3] * 2 * n
    assert all(prefill[name].shape[2] == 0 for name in io_spec.prompt_names(n) + io_spec.past_names(n))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], step)[0][:, 0]                                     # [2, V]
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    ids = torch.from_numpy(np.concatenate([prefill["input_ids"], step["input_ids"]], 1))
    mask = torch.from_numpy(step["attention_mask"])
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[:, -1]
    assert float(np.abs(logits - want.numpy()).max()) <= 1e-4
