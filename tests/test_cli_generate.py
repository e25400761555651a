"""`deploylm generate`: output formats, prompt sources, and every bad input as one line with exit 2."""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

from deploylm.cli import cli
from deploylm.errors import UsageError
from deploylm.generator import load


def run(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, ["generate", *args], input=input)


def test_help_lists_the_decoding_flags():
    out = run("--help")
    assert out.exit_code == 0
    for flag in ("--num-beams", "--max-new-tokens", "--min-new-tokens", "--length-penalty", "--repetition-penalty",
                 "--no-repeat-ngram-size", "--early-stopping", "--num-return-sequences", "--do-sample",
                 "--temperature", "--top-k", "--top-p", "--seed", "--max-time", "--dtype", "--device", "--json",
                 "--input"):
        assert flag in out.output


def test_json_lines_match_the_library(tiny_llama_dir):
    out = run("--model", str(tiny_llama_dir), "--json", "--num-beams", "3", "--num-return-sequences", "2",
              "--max-new-tokens", "5", "hello", "the quick brown fox")
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    expected = load(tiny_llama_dir).generate(["hello", "the quick brown fox"], num_beams=3,
                                             num_return_sequences=2, max_new_tokens=5)
    assert [line["prompt"] for line in lines] == ["hello", "the quick brown fox"]
    for line, result in zip(lines, expected):
        assert set(line) == {"prompt", "outputs"}
        assert [(o["text"], o["token_ids"], o["score"]) for o in line["outputs"]] == [
            (s.text, list(s.token_ids), s.score) for s in result.sequences]


def test_prompts_from_a_file_and_stdin_in_batches(tiny_t5_dir, tmp_path):
    prompts = ["hello", "", "the quick brown fox", "one two three"]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(prompts) + "\n")
    from_file = run("--model", str(tiny_t5_dir), "--input", str(path), "--json", "--batch-size", "2",
                    "--max-new-tokens", "3", "--num-beams", "2")
    from_stdin = run("--model", str(tiny_t5_dir), "--input", "-", "--json", "--max-new-tokens", "3",
                     "--num-beams", "2", input="\n".join(prompts))
    assert from_file.exit_code == 0 and from_stdin.exit_code == 0, from_file.output + from_stdin.output
    assert [json.loads(line)["prompt"] for line in from_file.stdout.splitlines()] == ["hello", "the quick brown fox", "one two three"]
    assert from_file.stdout == from_stdin.stdout


def test_input_lines_from_a_pipe_without_bom_split_at_newlines_only():
    import os
    import threading

    from deploylm.commands.generate import read_prompts

    read, write = os.pipe()                            # `--input <(...)`: a /dev/fd path, not a regular file
    writer = threading.Thread(target=lambda: (os.write(write, "\ufeffone\r\ntwo\x0cthree\u2028four\n\n".encode()),
                                              os.close(write)))
    writer.start()
    try:
        assert read_prompts(f"/dev/fd/{read}") == ["one", "two\x0cthree\u2028four"]
    finally:
        writer.join()
        os.close(read)


def test_json_output_is_strict_json():
    from deploylm.commands.generate import format_result
    from deploylm.generator import Result, Sequence

    line = format_result(Result("p", [Sequence("x", (5, 2), float("-inf"))]), as_json=True)
    assert json.loads(line)["outputs"][0]["score"] is None and "Infinity" not in line


def test_plain_output_is_the_text(tiny_llama_dir):
    out = run("--model", str(tiny_llama_dir), "--max-new-tokens", "4", "--num-beams", "2", "hello")
    [result] = load(tiny_llama_dir).generate("hello", max_new_tokens=4, num_beams=2)
    assert out.exit_code == 0 and out.stdout == result.sequences[0].text + "\n"


def _one_line_error(out, *needles: str) -> None:
    assert out.exit_code == 2, out.output
    assert out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("flags, needle", [
    (["--num-beams", "0"], "decoding option --num-beams 0 is invalid: use --num-beams >= 1"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "--num-return-sequences 3 is invalid: beam search returns at most --num-beams 2 sequences; raise --num-beams or lower --num-return-sequences"),
    (["--top-p", "0"], "--top-p 0.0 is invalid: use 0 < --top-p <= 1"),
    (["--top-p", "1.5"], "--top-p 1.5"),
    (["--repetition-penalty", "-1"], "--repetition-penalty -1.0"),
    (["--no-repeat-ngram-size", "-2"], "--no-repeat-ngram-size -2"),
    (["--max-new-tokens", "2", "--min-new-tokens", "5"], "--max-new-tokens 2 is invalid: must be >= --min-new-tokens 5"),
    (["--early-stopping", "sometimes"], "--early-stopping 'sometimes'"),
    (["--num-beams", "four"], "--num-beams 'four': expected an integer"),
    (["--temperature", "0"], "--temperature 0.0 is invalid: use a temperature >= 1e-06 with --do-sample; without it "
                             "(greedy or beam search) leave temperature out"),
    (["--do-sample", "--temperature", "0"], "--temperature 0.0 is invalid: use a temperature >= 1e-06 (for greedy "
                                            "decoding leave --do-sample off)"),
    (["--max-time", "0"], "--max-time 0.0"),
    (["--max-time", "soon"], "--max-time 'soon': expected a number"),
])
def test_invalid_options_exit_2_with_one_line(tiny_llama_dir, flags, needle):
    _one_line_error(run("--model", str(tiny_llama_dir), *flags, "hello"), needle)


def test_option_errors_name_the_flags_on_the_command_line_and_the_keywords_in_python(tiny_llama_dir):
    """The shared validation names keywords (the Python API's); each command that takes them as flags names
    the flag the user typed instead."""
    out = run("--model", str(tiny_llama_dir), "--num-beams", "2", "--num-return-sequences", "5", "hello")
    _one_line_error(out, "--num-return-sequences 5", "--num-beams 2")
    assert "num_return_sequences" not in out.stderr and "num_beams" not in out.stderr
    parity = CliRunner().invoke(cli, ["parity", "--model", str(tiny_llama_dir), "--num-beams", "0"])
    assert parity.exit_code == 2 and parity.stderr.strip() == (
        "error: decoding option --num-beams 0 is invalid: use --num-beams >= 1 (1 = greedy or plain sampling)")
    with pytest.raises(UsageError, match=r"^decoding option num_return_sequences=5 is invalid: beam search returns "
                                         r"at most num_beams=2 sequences; raise num_beams or lower num_return_sequences$"):
        load(tiny_llama_dir).generate("hello", num_beams=2, num_return_sequences=5)


def test_min_new_tokens_alone_is_checked_against_the_models_own_max_new_tokens(tiny_llama_dir, tmp_path):
    """--min-new-tokens without --max-new-tokens was checked against deploylm's default 64 before the model
    loaded: a model whose generation_config allows 100 was refused ("--max-new-tokens 64 is invalid", a flag
    the user never gave), where the Python API decodes it. Over the model's own default, the error names
    --min-new-tokens and asks for --max-new-tokens (docs/decoding.md)."""
    model = tmp_path / "long-default"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 100}))
    out = run("--model", str(model), "--num-beams", "1", "--min-new-tokens", "70", "--json", "hello")
    assert out.exit_code == 0, out.output
    expected = load(model).generate("hello", num_beams=1, min_new_tokens=70)[0].sequences[0].token_ids
    assert json.loads(out.stdout)["outputs"][0]["token_ids"] == list(expected)
    assert len(expected) >= 70
    _one_line_error(run("--model", str(tiny_llama_dir), "--min-new-tokens", "70", "hello"),
                    "error: decoding option --min-new-tokens 70 is invalid: above the default --max-new-tokens 64",
                    "give --max-new-tokens too")


def test_a_models_own_min_new_tokens_above_its_max_new_tokens_is_not_blamed_on_a_flag(tiny_llama_dir, tmp_path):
    """A generation_config with min_new_tokens=3 above its max_new_tokens=2 and a call that gives neither: the error
    read "decoding option --max-new-tokens 2 is invalid", a flag the user never gave. It names the model's
    defaults; a call that gives --max-new-tokens decodes (its min_new_tokens lowered, docs/decoding.md)."""
    model = tmp_path / "min-above-max"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "max_new_tokens": 2, "min_new_tokens": 3}))
    out = run("--model", str(model), "--num-beams", "1", "hello")
    _one_line_error(out, "the model's default min_new_tokens=3 is above the default max_new_tokens=2",
                    "give max_new_tokens")
    assert "--max-new-tokens 2" not in out.stderr
    assert run("--model", str(model), "--num-beams", "1", "--max-new-tokens", "2", "hello").exit_code == 0


def test_min_new_tokens_0_turns_the_models_min_length_off(tiny_llama_dir, tmp_path):
    """A generation_config min_length kept EOS away even from a call that gave --min-new-tokens 0 (0 was taken as
    "not given"). As transformers' min_new_tokens, a given one, 0 too, replaces the model's min_length."""
    plain = load(tiny_llama_dir).generate("hello", num_beams=1, max_new_tokens=8)[0].sequences[0].token_ids
    stop = plain[1]          # made the model's end token: greedy decoding wants it second
    model = tmp_path / "min-length"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": stop, "min_length": 64}))
    flags = ("--model", str(model), "--num-beams", "1", "--max-new-tokens", "8", "--json", "hello")
    kept, off = (run(*flags, *extra) for extra in ((), ("--min-new-tokens", "0")))
    assert kept.exit_code == 0 and off.exit_code == 0, kept.output + off.output
    assert len(json.loads(kept.stdout)["outputs"][0]["token_ids"]) == 8          # EOS banned: min_length is 64
    assert json.loads(off.stdout)["outputs"][0]["token_ids"] == list(plain[:plain.index(stop) + 1])
    gen = load(model)
    assert gen.generate("hello", num_beams=1, max_new_tokens=8, min_new_tokens=0)[0].sequences[0].token_ids == tuple(
        plain[:plain.index(stop) + 1])


@pytest.mark.parametrize("flag, value", [("--num-beam-groups", "2"), ("--diversity-penalty", "0.5")])
def test_group_beam_search_refusal_names_the_flags_on_the_command_line(tiny_llama_dir, flag, value):
    """The refusal shares its wording with the Python API (num_beam_groups, num_beams): on the command line it
    names --num-beam-groups, --num-beams and --do-sample."""
    out = run("--model", str(tiny_llama_dir), flag, value, "hello")
    _one_line_error(out, f"error: {flag}: group beam search (--num-beam-groups > 1, --diversity-penalty) is not "
                         "supported", "use plain beam search (--num-beams) or sampling (--do-sample) instead")
    for keyword in ("num_beam_groups", "diversity_penalty", "num_beams", "do_sample"):
        assert keyword not in out.stderr
    with pytest.raises(UsageError, match=r"\(num_beams\) or sampling \(do_sample\)"):
        load(tiny_llama_dir).generate("hello", num_beam_groups=2)


def test_a_gguf_model_draws_no_progress_bar_on_stderr(tmp_path):
    """transformers' GGUF loader draws its "Converting and de-quantizing" bar with tqdm directly: generate and
    parity keep stderr for warnings and errors, as with other models."""
    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = str(write_tiny_llama_gguf(tmp_path / "tiny.gguf"))
    out = run("--model", path, "--max-new-tokens", "2", "--num-beams", "1", "hello")
    assert out.exit_code == 0 and out.stdout.strip() and out.stderr == "", out.stderr
    parity = CliRunner().invoke(cli, ["parity", "--model", path, "--backends", "torch,onnx", "--max-new-tokens", "4"])
    assert parity.exit_code == 0, parity.output
    assert parity.stderr.splitlines() == [f"exporting {path} with profile fp32 into a temporary folder first "
                                          "(deploylm export keeps one) ..."], parity.stderr


def test_parity_of_a_model_that_is_no_artifact_checks_a_temporary_export_against_it(tiny_llama_dir, tmp_path,
                                                                                     monkeypatch):
    """DESIGN §2: `parity --model SRC` takes any SRC. A Hugging Face folder is exported (profile fp32) into a
    temporary folder, checked against the folder itself, and nothing of the export is left behind."""
    import json
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    parity = CliRunner().invoke(cli, ["parity", "--model", str(tiny_llama_dir), "--max-new-tokens", "4", "--json"])
    assert parity.exit_code == 0, parity.output
    report = json.loads(parity.stdout)
    [onnx] = report["backends"]
    assert report["reference"] == "torch" and report["passed"] and onnx["backend"] == "onnx", report
    assert onnx["beams_identical"] and onnx["max_abs_logit"] < 1e-4, onnx
    assert list(scratch.iterdir()) == []
    bad = CliRunner().invoke(cli, ["parity", "--model", str(tiny_llama_dir), "--num-beams", "0"])
    assert bad.exit_code == 2 and "--num-beams 0" in bad.stderr and "exporting" not in bad.stderr   # before any export


def test_usage_errors_exit_2_with_one_line(tiny_llama_dir, tmp_path, monkeypatch):
    model = str(tiny_llama_dir)
    _one_line_error(run("hello"), "--model SRC is required")
    _one_line_error(run("--model", model), "no prompts given")
    _one_line_error(run("--model", model, "--input", "-", input="\n \n"), "--input '-' has no line with text")
    _one_line_error(run("--model", model, "--backend", "tensorflow", "hi"), "unknown backend 'tensorflow'", "torch, onnx, trt")
    _one_line_error(run("--model", str(tmp_path / "nowhere"), "hi"), "does not exist")
    _one_line_error(run("--model", model, "--input", str(tmp_path / "none.txt")), "--input", "does not exist")
    _one_line_error(run("--model", model, "--input", str(tmp_path)), "--input", "is a folder: expected a text file")
    _one_line_error(run("--model", model, "--dtype", "float64", "hi"), "dtype 'float64'")
    _one_line_error(run("--model", model, "--device", "tpu", "hi"), "device 'tpu'")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    _one_line_error(run("--model", model, "--device", "cuda", "hi"), "CUDA is not available")


def test_folder_without_weights_or_tokenizer(tiny_gpt2_dir, tmp_path):
    no_weights, no_tokenizer = tmp_path / "no-weights", tmp_path / "no-tokenizer"
    shutil.copytree(tiny_gpt2_dir, no_weights)
    (no_weights / "model.safetensors").unlink()
    shutil.copytree(tiny_gpt2_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    _one_line_error(run("--model", str(no_weights), "hi"), str(no_weights), "no weights", "model.safetensors")
    _one_line_error(run("--model", str(no_tokenizer), "hi"), str(no_tokenizer), "no tokenizer")


def test_artifact_with_torch_backend_says_use_onnx(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    _one_line_error(run("--model", str(tmp_path), "--backend", "torch", "hi"), "use the onnx (or trt) backend: --backend onnx")


def test_threads_set_pytorchs_cpu_threads_for_the_torch_backend(tiny_llama_dir, monkeypatch):
    """--threads reaches the torch backend (PyTorch's threads, process-wide), like the onnx backend's pool;
    a count below 1 and a backend without CPU threads are refused."""
    import torch

    before = torch.get_num_threads()
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n: calls.append(n))
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama_dir), "--threads", "1",
                                      "--max-new-tokens", "2", "hello"])
    assert result.exit_code == 0 and calls == [1], result.output
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama_dir), "--threads", "0", "hello"])
    assert result.exit_code == 2 and "--threads" in result.output
    result = CliRunner().invoke(cli, ["generate", "--model", str(tiny_llama_dir), "--backend", "trt", "--threads", "2",
                                      "hello"])
    assert result.exit_code == 2 and "--threads applies to the torch and onnx backends" in result.output
    from deploylm.errors import UsageError

    with pytest.raises(UsageError, match=r"threads=0: expected a whole number"):
        load(tiny_llama_dir, backend="torch", threads=0)
    assert torch.get_num_threads() == before


def test_max_time_reaches_the_decoder(tiny_llama_dir, monkeypatch):
    from deploylm.generator import Generator

    seen = {}
    real = Generator.generate

    def spy(self, prompts, **options):
        seen.update(options)
        return real(self, prompts, **options)

    monkeypatch.setattr(Generator, "generate", spy)
    out = run("--model", str(tiny_llama_dir), "--max-time", "30", "--max-new-tokens", "3", "hello")
    assert out.exit_code == 0, out.output
    assert seen["max_time"] == 30.0


@pytest.mark.parametrize("flags, named", [
    (["--seed", "3"], "--seed applies"),
    (["--temperature", "0.5", "--top-k", "5"], "--temperature, --top-k apply"),
    (["--num-beams", "1", "--top-p", "0.5"], "--top-p applies"),
])
def test_sampling_flags_without_do_sample_are_a_usage_error(tiny_llama_dir, flags, named):
    # they would change nothing: the search is deterministic without --do-sample
    out = run("--model", str(tiny_llama_dir), "--max-new-tokens", "2", *flags, "hello")
    assert out.exit_code == 2 and named in out.output and "add --do-sample" in out.output, out.output
    out = run("--model", str(tiny_llama_dir), "--max-new-tokens", "2", "--do-sample", *flags, "hello")
    assert out.exit_code == 0, out.output


@pytest.mark.parametrize("argv", [["generate", "--model", "{long}", "hello"],
                                  ["info", "{long}"],
                                  ["export", "--model", "{long}", "--profile", "fp32"]])
def test_a_path_over_the_systems_name_limit_is_one_error_line(argv):
    """Path.exists() raises ENAMETOOLONG (it only answers False for a missing file): that was a traceback."""
    long = "x" * 300
    result = CliRunner().invoke(cli, [a.format(long=long) for a in argv])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"error: {long}: File name too long: expected a usable path", result.stderr


def test_an_error_while_decoding_a_later_batch_names_the_prompt_counted_over_all(tiny_llama_dir, monkeypatch):
    """What only the decode finds (sampling with every token banned, for one prompt's text) comes after the
    pre-check: it too names the user's prompt (the 3rd is "prompt 3"), not its place in its batch."""
    from deploylm.errors import UsageError
    from deploylm.generator import Generator

    real = Generator.generate

    def generate(self, prompts, **options):
        if "c" in prompts:   # as draws.py words it, counting within the batch it was given
            raise UsageError(f"nothing left to sample at generated token 2 of prompt {prompts.index('c') + 1}: "
                             "the options ban every token")
        return real(self, prompts, **options)

    monkeypatch.setattr(Generator, "generate", generate)
    out = run("--model", str(tiny_llama_dir), "--num-beams", "1", "--max-new-tokens", "2", "--batch-size", "2",
              "a", "b", "c", "d")
    assert out.exit_code == 2, out.output
    assert out.stderr.strip() == ("error: nothing left to sample at generated token 2 of prompt 3: the options ban "
                                  "every token"), out.stderr


def test_errors_name_the_prompt_counted_over_all_batches(tiny_llama_dir):
    """--batch-size decodes the prompts in slices; an error names the user's prompt (the 3rd is "prompt 3"),
    not its place in its slice ("prompt 1"), and comes before any slice's output (a file of results is
    never half written)."""
    model, fast = str(tiny_llama_dir), ["--num-beams", "1", "--max-new-tokens", "2", "--batch-size", "2"]
    out = run("--model", model, *fast, "a", "b", "   ")
    assert out.exit_code == 2 and out.stderr.strip() == "error: prompt 3 is only whitespace: expected some text"
    assert out.stdout == ""
    out = run("--model", model, *fast, "a", "b", "c", "one two three " * 100)
    assert out.exit_code == 2 and out.stderr.strip().startswith("error: prompt 4 has "), out.stderr
    assert out.stdout == ""
    out = run("--model", model, *fast, "a", "b", "c")
    assert out.exit_code == 0 and len(out.stdout.splitlines()) == 3
    from deploylm.errors import UsageError, counted_over_all

    drawn = UsageError("nothing left to sample at generated token 3 of prompt 2: the options ban every token")
    assert str(counted_over_all(drawn, 8)) == "nothing left to sample at generated token 3 of prompt 10: the " \
                                              "options ban every token"
    quoted = UsageError("prompt 'see prompt 2': the model's tokenizer cannot encode it")   # the user's text stays
    assert str(counted_over_all(quoted, 8)) == str(quoted)


@pytest.mark.parametrize("argv", [["train", "--task", "reverse", "--steps", "1", "--out", "{loop}/run"],
                                  ["train", "--task", "reverse", "--steps", "1", "--out", "{loop}"]])
def test_a_symlink_loop_in_an_output_path_is_one_error_line(argv, tmp_path):
    """Path.resolve() before Python 3.13 raises RuntimeError("Symlink loop from ...") for a loop, not OSError
    ELOOP: `train --out loop/run` was that traceback (exit 1) where a name too long is one line and exit 2."""
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    result = CliRunner().invoke(cli, [a.format(loop=loop) for a in argv])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {loop}") and lines[0].endswith(
        ": Too many levels of symbolic links: expected a usable path"), result.stderr


@pytest.mark.parametrize("flags, line", [
    (["--encoder-repetition-penalty", "-1"], "error: decoding option --encoder-repetition-penalty -1.0 is invalid: use a "
                                             "penalty > 0 (1.0 = off, > 1 favours tokens of the prompt)"),
    (["--encoder-no-repeat-ngram-size", "-1"], "error: decoding option --encoder-no-repeat-ngram-size -1 is invalid: use "
                                               "0 (off) or an n-gram size >= 1"),
])
def test_a_flag_whose_keyword_ends_in_another_flags_keyword_is_named_whole(flags, line):
    """encoder_repetition_penalty ends in repetition_penalty: written as flags, it is --encoder-repetition-penalty,
    not encoder_--repetition-penalty (checked before any model loads)."""
    result = CliRunner().invoke(cli, ["generate", *flags, "hello"])
    assert (result.exit_code, result.stderr.strip()) == (2, line), result.output


def test_flags_left_out_are_not_given_so_the_models_defaults_apply():
    """Every decoding flag, --do-sample too, defaults to "not given": a --do-sample that defaulted to False would
    turn off the sampling of a model whose generation_config samples. And --num-return-sequences alone is
    checked against the beams it needs, not against the library's default of 4 beams, before the model (whose
    own num_beams may be 8) is open: no error until --model is found missing."""
    from deploylm.commands.generate import command
    from deploylm.commands._options import given_options

    ctx = command.make_context("generate", ["hello"])
    assert given_options(dict(ctx.params)) == {}
    result = CliRunner().invoke(cli, ["generate", "--num-return-sequences", "6", "hello"])
    assert result.stderr.strip() == "error: --model SRC is required: a checkpoint, Hugging Face folder, .gguf file or artifact"


@pytest.mark.parametrize("flags, line", [
    (["--truncation", "middle"], "error: --truncation 'middle': expected one of left, right, sliding-window (or leave "
                                 "it out, to refuse over-long prompts)"),
    (["--window-overlap", "-1"], "error: --window-overlap -1: expected an integer >= 0"),
])
def test_input_options_are_checked_before_anything_else(flags, line):
    """--truncation/--window-overlap are checked with the decoding flags, before the model (here: before
    --model is even found missing), not after it loaded."""
    result = CliRunner().invoke(cli, ["generate", *flags, "hello"])
    assert (result.exit_code, result.stderr.strip()) == (2, line), result.output


@pytest.mark.parametrize("size", ["0", "-1"])
def test_a_batch_size_below_1_is_one_line_before_the_model_loads(size, tmp_path):
    """--batch-size 0 or below is refused before the model loads (its batches would be range()'s ValueError)."""
    result = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "not-read"), "--batch-size", size, "hello"])
    assert (result.exit_code, result.stderr.strip()) == (2, f"error: --batch-size {size}: expected an integer >= 1")


@pytest.mark.parametrize("flags, line", [
    (["--backend", "onnx", "--dtype", "float16"], "error: --dtype float16 applies to the torch backend only: an "
                                                  "artifact's precision comes from its export profile"),
    (["--backend", "trt", "--threads", "2"], "error: --threads applies to the torch and onnx backends (CPU threads), "
                                             "not to trt"),
    (["--backend", "trt", "--spin"], "error: --spin applies to the onnx backend (ONNX Runtime's threads), not to trt"),
])
def test_torch_and_cpu_flags_on_another_backend_are_refused_before_the_model_loads(flags, line, tmp_path):
    result = CliRunner().invoke(cli, ["generate", "--model", str(tmp_path / "not-read"), *flags, "hello"])
    assert (result.exit_code, result.stderr.strip()) == (2, line), result.output


def test_formatted_results_keep_the_text_as_it_is_and_number_several_outputs_from_1():
    """--json writes non-ASCII text as itself (UTF-8), not \\u escapes; several outputs print as [1] ..., [2] ..."""
    from deploylm.commands.generate import format_result
    from deploylm.generator import Result, Sequence

    result = Result("café", [Sequence("naïve 日本", (5, 2), -1.5), Sequence("b", (7,), -2.0)])
    line = format_result(result, as_json=True)
    assert '"prompt": "café"' in line and '"text": "naïve 日本"' in line
    assert format_result(result, as_json=False) == "[1] naïve 日本\n[2] b"
    assert format_result(Result("p", [Sequence("only", (5,), -1.0)]), as_json=False) == "only"


def test_the_default_backend_is_onnx_for_an_artifact_and_torch_otherwise(tmp_path, tiny_gpt2_dir):
    from deploylm.commands.generate import backend_name, read_prompts

    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    assert (backend_name(str(artifact), None), backend_name(str(tiny_gpt2_dir), None)) == ("onnx", "torch")
    assert backend_name(str(artifact), "trt") == "trt"
    prompts = tmp_path / "p.txt"                       # and --input skips lines of only whitespace, as blank ones
    prompts.write_text("one\n  \n\t\n\ntwo \n")
    assert read_prompts(str(prompts)) == ["one", "two "]


def test_prompt_arguments_come_before_input_lines_in_batches_of_batch_size(tmp_path, monkeypatch):
    """PROMPT arguments first, then --input's lines, in that order, in calls of --batch-size prompts."""
    from types import SimpleNamespace

    import deploylm.generator
    from deploylm.generator import Result, Sequence

    calls = []

    class Fake:
        def check(self, texts, **options):
            pass

        def options(self, **options):
            return SimpleNamespace(do_sample=False)

        def generate(self, texts, **options):
            calls.append(list(texts))
            return [Result(t, [Sequence(t.upper(), (1,), -1.0)]) for t in texts]

    monkeypatch.setattr(deploylm.generator, "load", lambda *a, **k: Fake())
    lines = tmp_path / "p.txt"
    lines.write_text("c\nd\n")
    out = run("--model", "m", "--backend", "torch", "--batch-size", "3", "a", "b", "--input", str(lines))
    assert out.exit_code == 0 and out.stdout == "A\nB\nC\nD\n" and calls == [["a", "b", "c"], ["d"]], out.output


def test_decoding_flags_are_checked_before_the_model_and_torch_defaults_to_float32_on_cpu():
    from deploylm.commands.generate import command

    result = CliRunner().invoke(cli, ["generate", "--num-beams", "0", "hello"])      # before --model is missing
    assert result.stderr.strip().startswith("error: decoding option --num-beams 0 is invalid"), result.output
    params = command.make_context("generate", ["hello"]).params
    assert (params["device"], params["dtype"], params["batch_size"]) == ("cpu", "float32", 8)   # as --help says
