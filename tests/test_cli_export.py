"""`deploylm export` on the command line: help, refusals with exit 2 and nothing written, a real export."""
from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.export.pipeline import default_out_dir
from deploylm.models.source import resolve_source


def _run(*args: str):
    return CliRunner().invoke(cli, ["export", *args])


def test_help_lists_the_options():
    result = _run("--help")
    assert result.exit_code == 0
    for option in ("--model", "--profile", "--out", "--force"):
        assert option in result.output


def test_existing_output_folder_needs_force(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")                 # an (older) artifact: --force replaces it
    result = _run("--model", str(tiny_gpt2_dir), "--out", str(out))
    assert result.exit_code == 2
    assert "already exists: pass --force to replace it" in result.output
    assert [p.name for p in out.iterdir()] == ["manifest.json"] and (out / "manifest.json").read_text() == "{}"


def test_an_existing_folder_of_other_things_is_refused_without_suggesting_force(tiny_gpt2_dir, tmp_path):
    """--force never replaces a folder that is not an artifact: the error must not send the user there."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _run("--model", str(tiny_gpt2_dir), "--out", str(out))
    assert result.exit_code == 2
    assert "already exists and is not an exported artifact (no manifest.json): choose another --out" in result.output
    assert "pass --force" not in result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_force_refuses_what_is_not_an_artifact(tiny_gpt2_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target, message in ((out, "is not an exported artifact (no manifest.json): refusing to replace it"),
                            (notes, "is a file: expected a folder for the artifact"),
                            (".", "--out '.' is the current folder or holds it")):
        if target == ".":
            monkeypatch.chdir(out)
        result = _run("--model", str(tiny_gpt2_dir), "--out", str(target), "--force")
        assert result.exit_code == 2 and result.output.startswith("error: ") and message in result.output, result.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and notes.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out"]


def test_an_unwritable_output_is_refused_before_the_export(tiny_gpt2_dir, monkeypatch):
    from deploylm.export import pipeline

    monkeypatch.setattr(pipeline, "_load_model", lambda source: pytest.fail("loaded the model before checking --out"))
    result = _run("--model", str(tiny_gpt2_dir), "--out", "/proc/deploylm-export")
    assert result.exit_code == 2 and "--out '/proc/deploylm-export': cannot write in '/proc'" in result.output, result.output


def test_bad_profile_exits_2_and_writes_nothing(tiny_gpt2_dir, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nprecision = "fp64"\n')
    for profile in ("no-such-profile", str(bad)):
        result = _run("--model", str(tiny_gpt2_dir), "--profile", profile, "--out", str(tmp_path / "out"))
        assert result.exit_code == 2, result.output
        assert result.output.startswith("error: ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_missing_model_exits_2(tmp_path):
    assert _run("--out", str(tmp_path / "o")).exit_code == 2
    assert _run("--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")).exit_code == 2
    assert not (tmp_path / "o").exists()


def test_default_output_folder(tiny_gpt2_dir, tmp_path):
    gguf = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    assert default_out_dir(resolve_source(tiny_gpt2_dir), "fp32").as_posix() == f"export/{tiny_gpt2_dir.name}-fp32"
    assert default_out_dir(resolve_source(gguf), "fp32").as_posix() == "export/SmolLM2-135M-Instruct.Q4_1-fp32"


def test_default_output_folder_of_the_current_or_parent_folder_is_named_after_it(tiny_gpt2_dir, tmp_path, monkeypatch):
    """`export --model .` wrote export/-fp32 (and `--model ..` export/..-fp32)."""
    import shutil

    model = shutil.copytree(tiny_gpt2_dir, tmp_path / "my-model")
    (model / "sub").mkdir()
    monkeypatch.chdir(model)
    assert default_out_dir(resolve_source("."), "fp32").as_posix() == "export/my-model-fp32"
    monkeypatch.chdir(model / "sub")
    assert default_out_dir(resolve_source(".."), "fp32").as_posix() == "export/my-model-fp32"


def test_export_writes_a_loadable_artifact(tiny_llama_dir, tmp_path):
    from deploylm.artifact import load_artifact

    out = tmp_path / "llama-fp32"
    result = _run("--model", str(tiny_llama_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "validation: graphs match PyTorch" in result.output and "PASSED" in result.output
    # what export's parity covered, so that `deploylm parity` at the profile's 64 tokens is no surprise
    assert "reference torch: PASSED (4 prompts, 16 new tokens, 4 beams)" in result.output, result.output
    artifact = load_artifact(out)
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json", "parity.json"} <= set(artifact.files)
    assert artifact.manifest["profile"]["name"] == "fp32" and artifact.manifest["parity"]["passed"]
    assert artifact.manifest["source"]["weights_sha256"]
    # how the graphs were made (docs/formats.md): 2 layers, q/k/v and gate/up packed in each
    assert artifact.manifest["export"] == {"kind": "decoder-only", "family": "hf", "opset": 18, "cross_rows": None,
                                           "packed_matmuls": {"model.onnx": 4}}
    assert [i["name"] for i in artifact.io["model.onnx"]["inputs"]][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_parity_refuses_a_reference_that_changed_since_export(tiny_llama_dir, tmp_path):
    """The torch reference of an artifact is the model at its recorded path: when those weights changed,
    parity refuses it (it would measure another model) and says how to go on; --reference names the
    model where it is now, and must be that model."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = shutil.copytree(tiny_llama_dir, tmp_path / "llama")
    out = tmp_path / "llama-fp32"
    assert _run("--model", str(source), "--out", str(out)).exit_code == 0
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--max-new-tokens", "4"])
    assert parity.exit_code == 0 and "changed since" not in parity.output, parity.output
    weights = load_file(source / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 3
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--max-new-tokens", "4"])
    assert parity.exit_code == 2, parity.output
    assert (f"the model at {source} changed since artifact {out} was exported" in parity.output
            and "--reference SRC" in parity.output
            and f"deploylm export --model {source} --profile fp32 --out {out} --force" in parity.output)
    moved = shutil.copytree(tiny_llama_dir, tmp_path / "moved")          # the original weights, elsewhere
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--max-new-tokens", "4", "--reference", str(moved)])
    assert parity.exit_code == 0 and "PASSED" in parity.output, parity.output
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--reference", str(source)])
    assert parity.exit_code == 2 and "is not the model artifact" in parity.output, parity.output
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--reference", str(tmp_path / "nowhere")])
    assert parity.exit_code == 2 and parity.output.startswith("error: --reference: "), parity.output
    shutil.rmtree(source)
    parity = CliRunner().invoke(cli, ["parity", "--model", str(out), "--max-new-tokens", "4"])
    assert parity.exit_code == 2 and "which is gone: pass --reference SRC" in parity.output, parity.output
    parity = CliRunner().invoke(cli, ["parity", "--model", str(tiny_llama_dir), "--reference", str(moved)])
    assert parity.exit_code == 2 and "--reference" in parity.output and "applies to an artifact" in parity.output


def _no_graphs(monkeypatch):
    """Export stages that write a placeholder graph in no time (for the checks that follow them)."""
    from deploylm.export import pipeline

    monkeypatch.setattr(pipeline, "_export_graphs", lambda plan, folder: (folder / "model.onnx").write_bytes(b"graph"))
    monkeypatch.setattr(pipeline, "_pack_graphs", lambda plan, folder: {})
    return pipeline


def test_a_full_disk_exits_1_as_in_every_command_not_2_the_status_of_bad_input(tiny_gpt2_dir, tmp_path, monkeypatch):
    """A full disk is the machine's fault: export exited 2 (click's and deploylm's status for bad usage), train and
    distill 1; now all exit 1 (docs/reliability.md, "Exit statuses")."""
    import errno

    from deploylm.export import pipeline

    def full(plan, folder):
        (folder / "model.onnx").write_bytes(b"gra")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline, "_export_graphs", full)
    out = tmp_path / "art" / "out"
    result = _run("--model", str(tiny_gpt2_dir), "--out", str(out))
    assert result.exit_code == 1, result.output
    assert result.stderr == (f"error: could not write the artifact {out}: No space left on device; nothing was "
                             "written; free space or choose another --out\n")
    assert not out.exists()


@pytest.mark.parametrize("profile", ["fp32", "int8"])
def test_graphs_that_do_not_match_pytorch_fail_the_export_and_leave_nothing(tiny_gpt2_dir, tmp_path, monkeypatch, profile):
    """Validation compares the fp32 graphs at the fp32 profile's tolerance whatever the profile (its own
    tolerance is for converted graphs); a mismatch exits 1 before the precision step and parity."""
    from deploylm.export import precision_step
    from deploylm.export.validate import ValidationFailure, ValidationReport
    from deploylm.profiles import load_profile

    pipeline = _no_graphs(monkeypatch)
    seen = []
    failure = ValidationFailure("model.onnx", "values", "decode step: logits differs from PyTorch by 1.00e-02")
    monkeypatch.setattr(pipeline, "validate_graphs", lambda plan, folder, atol: seen.append(atol) or ValidationReport(atol, (failure,)))
    monkeypatch.setattr(precision_step, "apply_precision", lambda *a, **k: pytest.fail("converted unvalidated graphs"))
    monkeypatch.setattr(pipeline, "_parity", lambda *a: pytest.fail("checked parity of unvalidated graphs"))
    result = _run("--model", str(tiny_gpt2_dir), "--profile", profile, "--out", str(tmp_path / "art" / "out"))
    assert result.exit_code == 1, result.output
    assert ("error: exported graphs do not match PyTorch: model.onnx: values: decode step: logits differs from "
            "PyTorch by 1.00e-02") in result.output
    assert seen == [load_profile("fp32").parity.logits_atol]
    assert list((tmp_path / "art").iterdir()) == []


@pytest.mark.parametrize("generation, checked", [("max_new_tokens = 64\nmin_new_tokens = 20", (16, None)),
                                                 ("max_new_tokens = 8\nmin_new_tokens = 4", (8, None))])
def test_an_export_outside_its_parity_tolerances_exits_1_and_leaves_nothing(tiny_gpt2_dir, tmp_path, monkeypatch,
                                                                             generation, checked):
    from types import SimpleNamespace

    from deploylm import parity
    from deploylm.backends.onnx_backend import OnnxBackend
    from deploylm.export.validate import ValidationReport

    pipeline = _no_graphs(monkeypatch)
    monkeypatch.setattr(pipeline, "validate_graphs", lambda plan, folder, atol: ValidationReport(atol, ()))
    monkeypatch.setattr(OnnxBackend, "from_folder", classmethod(lambda cls, folder, **kw: object()))
    failing = SimpleNamespace(passed=False, failures=lambda: ["onnx: top-1 agreement 0.500 < 0.99", "onnx: beams differ"],
                              to_dict=lambda: {"passed": False})
    monkeypatch.setattr(parity, "compare_backends", lambda ref, cands, batch, options, *a, **k: seen.append(options) or failing)
    seen = []
    # the profile's decoding defaults, at most PARITY_MAX_NEW_TOKENS (16) new tokens, and no minimum of the profile's
    # (None, not 0: min_new_tokens=0 turns a model's min_length off too, and the check decodes as users do)
    profile = tmp_path / "long.toml"
    fp32 = (Path(__file__).parents[1] / "deploylm" / "builtin_profiles" / "fp32.toml").read_text()
    profile.write_text(fp32.replace('name = "fp32"', 'name = "long"').replace("num_beams = 4", "num_beams = 3")
                       .replace("max_new_tokens = 64", generation))
    result = _run("--model", str(tiny_gpt2_dir), "--profile", str(profile), "--out", str(tmp_path / "art" / "out"))
    assert result.exit_code == 1, result.output
    assert ("error: onnx does not match torch within the profile's [parity] tolerances: "
            "onnx: top-1 agreement 0.500 < 0.99; onnx: beams differ") in result.output
    assert list((tmp_path / "art").iterdir()) == []
    ((options),) = seen
    assert (options.max_new_tokens, options.min_new_tokens, options.num_beams) == (*checked, 3)
    from deploylm.backends.base import ModelInfo, SpecialTokens
    from deploylm.decoding.processors import MinLength, build_processors

    with_min_length = ModelInfo(False, 16, SpecialTokens((1,), 0), generation={"min_length": 6})
    assert any(isinstance(p, MinLength) for p in build_processors(options, with_min_length, 2))   # still applied


def test_a_quantized_export_of_a_model_whose_tokenizer_has_no_pad_token(tiny_llama_dir, tmp_path):
    """Most Llama, Mistral and GPT-2 tokenizers have no pad token: the quality step padded its prompts with the raw
    tokenizer ("Asking to pad but the tokenizer does not have a padding token", a traceback) where every other
    command pads with the model's pad id."""
    import shutil

    from transformers import AutoTokenizer

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    result = _run("--model", str(model), "--profile", "int8", "--out", str(tmp_path / "llama-int8"))
    assert result.exit_code == 0, result.output
    assert "quality (held out:" in result.output, result.output


def test_export_says_which_of_the_models_own_defaults_the_profile_replaces(tiny_llama_dir, tmp_path):
    """The artifact carries the model's generation_config.json, yet decodes with the profile's [generation]
    (documented precedence): a checkpoint capped at 30 new tokens gave an artifact that decodes 64. Export now
    says so, for each value the profile replaces."""
    import json
    import shutil

    model = Path(shutil.copytree(tiny_llama_dir, tmp_path / "llama"))
    config = model / "generation_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "max_new_tokens": 30, "num_beams": 4}))
    result = _run("--model", str(model), "--out", str(tmp_path / "llama-fp32"))
    assert result.exit_code == 0, result.output
    assert ("note: the profile's [generation] max_new_tokens = 64 replaces the model's own 30 "
            "(generation_config.json) as the artifact's default") in result.output, result.output
    assert "[generation] num_beams" not in result.output        # the same value replaces nothing


def test_force_refuses_an_artifact_folder_holding_an_input(tiny_gpt2_dir, tmp_path, monkeypatch):
    """--force replaces the whole old artifact: a --calibration file (or the --model itself) kept in it would be
    deleted with it, after the export had read it."""
    import shutil

    from deploylm.export import pipeline

    monkeypatch.setattr(pipeline, "_load_model", lambda source: pytest.fail("loaded the model before checking --out"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    (out / "calibration.txt").write_text("one sample\nanother sample\n")
    shutil.copytree(tiny_gpt2_dir, out / "model")
    for flag, path, extra in (("--calibration", out / "calibration.txt", ["--model", str(tiny_gpt2_dir)]),
                              ("--model", out / "model", [])):
        result = _run(*extra, flag, str(path), "--profile", "int8-static", "--out", str(out), "--force")
        assert result.exit_code == 2 and result.output.startswith("error: "), result.output
        assert f"{flag} {str(path)!r} is inside --out {str(out)!r}, which --force replaces" in result.output, result.output
    assert sorted(p.name for p in out.iterdir()) == ["calibration.txt", "manifest.json", "model"]


def test_a_second_export_into_the_same_out_is_refused_while_the_first_runs(tiny_gpt2_dir, tmp_path, monkeypatch):
    """Train and distill hold a writer lock on --out; export did not: two exports into one new --out both passed
    the check, ran to their end, and the second failed only when it swapped its folder in."""
    from deploylm.export import pipeline
    from deploylm.fsutil import exclusive_writer

    monkeypatch.setattr(pipeline, "_load_model", lambda source: pytest.fail("loaded the model while --out was locked"))
    out = tmp_path / "artifact"
    with exclusive_writer(out):                          # the first export, still running
        result = _run("--model", str(tiny_gpt2_dir), "--out", str(out))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"error: --out {str(out.resolve())!r} is being written by another deploylm "
                                     "command (it holds .artifact.lock): wait for it to finish, or choose another "
                                     "folder"), result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_an_empty_out_is_named_as_given(tiny_gpt2_dir):
    """--out '' (an unset variable) was reported as --out '.', a name the user never typed."""
    result = _run("--model", str(tiny_gpt2_dir), "--out", "")
    assert result.exit_code == 2
    assert result.output.strip() == "error: --out '': expected a folder name (leave --out out for export/<model>-<profile>)"


def test_the_command_passes_its_flags_and_the_fp32_default_and_needs_a_model(monkeypatch, tmp_path):
    """No --profile is fp32 (as --help says); the other flags reach export_model as given; no --model is one line."""
    from types import SimpleNamespace

    import deploylm.export.pipeline

    seen = []
    monkeypatch.setattr(deploylm.export.pipeline, "export_model", lambda *args, **kwargs: (
        seen.append((args, kwargs)), SimpleNamespace(lines=lambda: ["done"]))[1])
    assert CliRunner().invoke(cli, ["export", "--model", "m"]).output == "done\n"
    cal = str(tmp_path / "cal.txt")
    CliRunner().invoke(cli, ["export", "--model", "m", "--profile", "int8", "--out", "o", "--force", "--calibration",
                             cal, "--allow-quality-loss"])
    assert seen == [(("m", "fp32", None), {"force": False, "calibration": None, "allow_quality_loss": False}),
                    (("m", "int8", "o"), {"force": True, "calibration": cal, "allow_quality_loss": True})]
    result = CliRunner().invoke(cli, ["export", "--profile", "fp32"])
    assert (result.exit_code, result.output) == (2, "error: --model SRC is required: a checkpoint, Hugging Face "
                                                    "folder or .gguf file\n")
