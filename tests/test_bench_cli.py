"""`deploylm bench` on the command line: help, bad input (one line, exit 2), a tiny end-to-end run,
and (slow) an exported ONNX artifact benchmarked in worker processes next to torch and transformers."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from deploylm.bench import STANDARD_PROMPTS, BenchConfig, run_bench
from deploylm.cli import cli


def run(*args: str):
    return CliRunner().invoke(cli, ["bench", *args])


def test_help_lists_every_flag():
    out = run("--help")
    assert out.exit_code == 0
    for flag in ("--model", "--backends", "--prompts", "--batch-size", "--num-beams", "--max-new-tokens", "--rounds",
                 "--warmup", "--threads", "--spin", "--reference", "--no-reference", "--in-process", "--json", "--plot"):
        assert flag in out.output


@pytest.mark.parametrize("args, message", [
    (("--model", "m", "--backends", "torch,tpu"), "unknown backend 'tpu'"),
    (("--model", "m", "--prompts", "no/such/file.txt"), "--prompts 'no/such/file.txt': cannot read it"),
    (("--model", "m", "--batch-size", "0"), "--batch-size 0: expected an integer >= 1"),
    (("--model", "m", "--batch-size", "eight"), "--batch-size 'eight': expected an integer"),
    (("--model", "m", "--rounds", "0"), "--rounds 0"),
    (("--model", "m", "--backends", ","), "--backends ',': expected a comma-separated list of backends"),
    (("--model", "m", "--backends", ""), "--backends '': expected a comma-separated list of backends"),
    (("--model", "m", "--plot", "out.jpg"), "ending in .png"),
    (("--model", "m", "--json", "no/such/dir/out.json"), "--json"),
    (("--model", "m", "--json", "/proc/bench.json"), "--json '/proc/bench.json': cannot write in '/proc'"),
    (("--model", "m", "--json", "/"), "--json '/' is a folder: expected the name of a file to write"),
    (("--model", "m", "--plot", "/proc/bench.png"), "--plot '/proc/bench.png': cannot write in '/proc'"),
    (("--model", "m", "--json", ""), "--json '': expected the name of a file to write"),   # was ignored: a whole
    (("--model", "m", "--plot", ""), "--plot '': expected the name of a file to write"),   # run, no file, exit 0
    (("--model", "m", "--prompts", ""), "--prompts '': expected a UTF-8 text file"),      # not the standard prompts
    ((), "no model given"),
    (("--model", "no/such/model"), "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message):
    out = run(*args)
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith("error: ") and message in out.stderr and out.stderr.count("\n") == 1


def test_tiny_run_prints_the_table_and_writes_json(tiny_gpt2_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\n\nhello world\n")
    out = run("--model", str(tiny_gpt2_dir), "--prompts", str(prompts), "--batch-size", "2", "--max-new-tokens", "3",
              "--rounds", "1", "--warmup", "0", "--in-process", "--json", str(tmp_path / "b.json"))
    assert out.exit_code == 0, out.output
    assert "tiny-gpt2" in out.stdout and "transformers (" in out.stdout and "exactly 3 new tokens" in out.stdout
    assert "round 1/1" in out.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert [r["backend"] for r in data["rows"]] == ["torch", "transformers"]
    assert data["workload"]["prompt_texts"] == ["the quick brown fox", "hello world"]
    assert data["rows"][0]["same_as_reference"] == 2


def test_json_dash_writes_the_report_to_stdout_alone(tiny_gpt2_dir, tmp_path, monkeypatch):
    """`--json -` wrote a file named "-" in the current folder; as `generate --input -` reads stdin, it is stdout,
    which then holds one JSON document (the table goes to stderr)."""
    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello world\n")
    out = run("--model", str(tiny_gpt2_dir), "--prompts", str(prompts), "--batch-size", "1", "--max-new-tokens", "2",
              "--rounds", "1", "--warmup", "0", "--in-process", "--no-reference", "--json", "-")
    assert out.exit_code == 0, out.output
    assert [r["backend"] for r in json.loads(out.stdout)["rows"]] == ["torch"]
    assert "exactly 2 new tokens" in out.stderr and not (tmp_path / "-").exists()
    assert "workload: 1 prompt in 1 call(s) of batch 1," in out.stderr          # not "1 prompts"


@pytest.mark.slow
def test_onnx_artifact_in_worker_processes(tiny_gpt2_dir, tmp_path):
    """Export the tiny GPT-2, then bench torch, onnx and transformers each in its own process."""
    from deploylm.export.pipeline import export_model

    artifact = tmp_path / "tiny-gpt2-fp32"
    export_model(tiny_gpt2_dir, "fp32", artifact)
    config = BenchConfig(models=(str(tiny_gpt2_dir), str(artifact)), prompts=("the quick brown fox", "hello world"),
                         batch_size=2, max_new_tokens=4, rounds=1, warmup=1, spin="both")
    report = run_bench(config)
    torch_row, onnx_row, spin_row, ref = report.rows
    assert (torch_row.backend, onnx_row.backend, spin_row.backend, ref.backend) == ("torch", "onnx", "onnx", "transformers")
    assert onnx_row.reference == ref.label and onnx_row.profile == "fp32"
    assert (onnx_row.spin, spin_row.spin, torch_row.spin) == (False, True, False)
    assert spin_row.label == "tiny-gpt2-fp32 [onnx, spin]" and spin_row.token_ids == onnx_row.token_ids
    assert report.workload["spin"] == "both"
    assert report.rss_scope == "row" and report.process_peak_rss_mib is None
    for row in report.rows:
        assert row.peak_rss_mib >= row.rss_after_load_mib > 0
        assert row.same_as_reference == 2 and row.same_as_first == 2
        assert [len(t) for t in row.token_ids] == [4, 4]


@pytest.mark.slow
def test_standard_prompts_are_10_to_55_smollm2_tokens(smollm2_gguf):
    from deploylm.models.source import resolve_source
    from deploylm.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_source(smollm2_gguf))
    lengths = [len(tokenizer(p)["input_ids"]) for p in STANDARD_PROMPTS]
    assert len(lengths) == 8 and all(10 <= n <= 55 for n in lengths), lengths


@pytest.mark.slow
def test_a_worker_error_reaches_the_caller_as_itself(tiny_gpt2_dir, tmp_path):
    """A model that fails to load in its worker process: the same one-line UsageError, exit 2."""
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_gpt2_dir, broken)
    (broken / "model.safetensors").unlink()
    out = run("--model", str(broken), "--no-reference", "--rounds", "1", "--max-new-tokens", "2")
    assert out.exit_code == 2, out.output
    assert out.stderr.splitlines()[-1].startswith("error: ") and "has no weights" in out.stderr


def test_every_flag_reaches_the_run(tiny_gpt2_dir, tmp_path):
    """2 prompts in one call of batch 3 (a prompt repeated), 2 beams, 2 tokens, 2 rounds, no warm-up, 1 thread,
    no reference, in this process: the JSON's workload, rows and notes say so."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick brown fox\nhello world\n")
    out = run("--model", str(tiny_gpt2_dir), "--prompts", str(prompts), "--batch-size", "3", "--num-beams", "2",
              "--max-new-tokens", "2", "--rounds", "2", "--warmup", "0", "--threads", "1", "--no-reference",
              "--in-process", "--json", str(tmp_path / "b.json"))
    assert out.exit_code == 0, out.output
    data = json.loads((tmp_path / "b.json").read_text())
    workload = data["workload"]
    assert (workload["prompts"], workload["batch_size"], workload["calls_per_round"], workload["requests_per_round"]) \
        == (2, 3, 1, 3)
    assert (workload["rounds"], workload["warmup"], workload["threads"], workload["spin"]) == (2, 0, 1, "off")
    options = workload["options"]
    assert (options["num_beams"], options["max_new_tokens"], options["min_new_tokens"]) == (2, 2, 2)
    assert data["machine"]["threads"] == 1
    assert [r["backend"] for r in data["rows"]] == ["torch"] and data["rows"][0]["reference"] is None
    assert data["rss_scope"] == "process" and data["process_peak_rss_mib"] > 0
    (row,) = data["rows"]
    assert len(row["rounds"]) == 2 and [len(t) for t in row["rounds"][0]["token_ids"]] == [2, 2, 2]
    assert any("only 2 round(s)" in n for n in data["notes"])
    assert "2 prompts in 1 call(s) of batch 3, num_beams=2, exactly 2 new tokens, 0 warm-up + 2 interleaved" in out.stdout


def test_an_option_a_row_refuses_is_named_by_benchs_flag(tiny_gpt2_dir):
    """A row refusing --max-new-tokens (over the model's window) names the flag, as generate does: the row's label
    was put in front as a plain UsageError, so the CLI printed the Python keyword max_new_tokens=500."""
    out = run("--model", str(tiny_gpt2_dir), "--max-new-tokens", "500", "--num-beams", "1", "--batch-size", "1",
              "--rounds", "1", "--warmup", "0", "--no-reference", "--in-process")
    assert out.exit_code == 2, out.output
    assert out.stderr.splitlines()[-1] == (f"error: {tiny_gpt2_dir.name} [torch]: --max-new-tokens 500 leaves no room "
                                           "for a prompt in the model's window of 128: lower --max-new-tokens to at "
                                           "most 128")


def test_spin_reaches_the_run_which_refuses_it_without_onnx_rows(tiny_gpt2_dir):
    out = run("--model", str(tiny_gpt2_dir), "--spin", "on", "--no-reference", "--in-process", "--rounds", "1",
              "--warmup", "0", "--max-new-tokens", "2")
    assert out.exit_code == 2 and out.stderr.strip() == (
        "error: --spin on applies to onnx rows (ONNX Runtime's threads), and none of the models runs on onnx "
        "(artifacts do): add an artifact, or drop --spin"), out.output
