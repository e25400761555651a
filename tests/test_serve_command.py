"""`deploylm serve`: a thin command; its flags reach ServeConfig and bad input is one error line."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from deploylm.cli import cli


def test_serve_help_lists_the_limits():
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0
    for flag in ("--model", "--backend", "--host", "--port", "--max-batch-size", "--max-wait-ms", "--max-queue",
                 "--max-prompt-tokens", "--max-new-tokens", "--max-body-bytes", "--drain-timeout", "--spin"):
        assert flag in result.output


def test_serve_passes_flags_to_the_server(monkeypatch, tiny_gpt2_dir):
    seen = {}
    monkeypatch.setattr("deploylm.serving.serve", lambda gen, config, **kw: seen.update(gen=gen, config=config, **kw))
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--backend", "torch", "--port", "9001",
                                      "--max-batch-size", "3", "--max-wait-ms", "2.5", "--max-queue", "7",
                                      "--max-prompt-tokens", "50", "--max-new-tokens", "20", "--drain-timeout", "4"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.max_batch_size, config.max_wait_ms, config.max_queue) == (3, 2.5, 7)
    assert (config.max_prompt_tokens, config.max_new_tokens, config.drain_timeout_s) == (50, 20, 4.0)
    assert config.model_name == tiny_gpt2_dir.name and config.model_summary["backend"] == "torch"
    assert seen["port"] == 9001 and seen["host"] == "127.0.0.1"
    assert seen["gen"].generate("hello", max_new_tokens=2)[0].sequences


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_a_taken_port_or_an_unknown_host_before_loading(monkeypatch, tmp_path):
    import socket

    import deploylm

    monkeypatch.setattr(deploylm, "load", lambda *a, **k: pytest.fail("loaded the model before checking the address"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--port", str(port)])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output == f"error: --port {port}: already in use on 127.0.0.1: stop what listens there or choose another --port\n"
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--host", "no-such-host.invalid"])
    assert result.exit_code == 2 and result.output.startswith("error: --host 'no-such-host.invalid': not an address"), result.output


def test_serve_bad_model_is_one_error_line(tmp_path):
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path / "missing"), "--port", str(free_port())])
    assert result.exit_code == 2
    assert result.output.startswith("error: model") and "does not exist" in result.output


def test_serve_spin_is_for_the_onnx_backend(tiny_gpt2_dir):
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--spin", "--port", str(free_port())])
    assert result.exit_code == 2
    assert result.output.startswith("error: --spin applies to the onnx backend") and result.output.count("\n") == 1


def test_serve_without_starlette_refuses_before_loading(monkeypatch, tmp_path):
    import builtins

    import deploylm

    real_import = builtins.__import__

    def no_starlette(name, *args, **kwargs):
        if name.split(".")[0] in ("starlette", "uvicorn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(deploylm, "load", lambda *a, **k: pytest.fail("loaded the model before checking the extra"))
    monkeypatch.setattr(builtins, "__import__", no_starlette)
    result = CliRunner().invoke(cli, ["serve", "--model", str(tmp_path), "--port", str(free_port())])
    assert result.exit_code == 2 and result.output == ("error: serving needs starlette and uvicorn: "
                                                       "pip install 'deploylm[serve]'\n"), result.output


def test_serve_prints_an_ipv6_host_in_brackets(monkeypatch, tiny_gpt2_dir):
    monkeypatch.setattr("deploylm.serving.serve", lambda gen, config, **kw: None)
    monkeypatch.setattr("deploylm.serving.server.check_address", lambda host, port: None)
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--backend", "torch", "--host", "::1",
                                      "--port", "8192"])
    assert result.exit_code == 0 and "on http://[::1]:8192" in result.output, result.output


def test_the_model_summary_shows_no_path_of_the_serving_machine(tiny_gpt2_dir):
    import json

    from deploylm import load
    from deploylm.serving.server import _without_paths, describe_model

    summary = describe_model(str(tiny_gpt2_dir), load(tiny_gpt2_dir, backend="torch"))
    assert summary["source"] == {"kind": "hf", "name": tiny_gpt2_dir.name}
    assert str(tiny_gpt2_dir.parent) not in json.dumps(summary)
    assert _without_paths({"kind": "hf", "path": "/srv/models/llama", "sha256": "ab"}) == {
        "kind": "hf", "path": "llama", "sha256": "ab"}


@pytest.mark.parametrize("flag, value", [("--max-wait-ms", "nan"), ("--max-wait-ms", "inf"), ("--drain-timeout", "nan")])
def test_serve_refuses_a_wait_that_never_ends_before_loading(monkeypatch, flag, value):
    """FloatRange(0) lets nan through: --max-wait-ms nan served, and every request hung until its client gave up."""
    import deploylm
    from deploylm.errors import UsageError
    from deploylm.serving import ServeConfig

    monkeypatch.setattr(deploylm, "load", lambda *a, **k: pytest.fail("loaded the model before checking the flags"))
    result = CliRunner().invoke(cli, ["serve", "--model", "x", flag, value])
    assert result.exit_code == 2 and flag in result.output and "finite" in result.output, result.output
    name = "max_wait_ms" if flag == "--max-wait-ms" else "drain_timeout_s"
    with pytest.raises(UsageError, match="finite numbers >= 0"):
        ServeConfig(**{name: float(value)})


def test_serve_loads_a_model_without_progress_bars_on_stderr(monkeypatch, tmp_path):
    """The server's stderr is its log: transformers' loading bars (a GGUF's too) stay out of it."""
    from transformers.utils import logging

    from tests.helpers.tiny_gguf import write_tiny_llama_gguf

    path = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    monkeypatch.setattr("deploylm.serving.serve", lambda gen, config, **kw: None)
    monkeypatch.setattr("deploylm.serving.server.check_address", lambda host, port: None)
    logging.enable_progress_bar()      # as in a fresh process
    result = CliRunner().invoke(cli, ["serve", "--model", str(path), "--port", "8192"])
    assert result.exit_code == 0 and result.stderr.splitlines() == [f"serving {path} (torch) on http://127.0.0.1:8192"], \
        result.stderr


def test_serve_passes_the_other_limits_the_log_level_and_threads(monkeypatch, tiny_gpt2_dir):
    """--max-beams, --max-streams, --max-body-bytes reach ServeConfig, --log-level reaches the server, --threads
    the backend (the flags the first test leaves out); the `serving ... on` line goes to stderr, stdout stays empty."""
    import deploylm

    seen, real_load = {}, deploylm.load

    def load(src, **kwargs):
        seen["load"] = kwargs
        return real_load(src, **kwargs)

    monkeypatch.setattr(deploylm, "load", load)
    monkeypatch.setattr("deploylm.serving.serve", lambda gen, config, **kw: seen.update(config=config, **kw))
    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_gpt2_dir), "--backend", "torch", "--port", "9001",
                                      "--max-beams", "3", "--max-streams", "2", "--max-body-bytes", "1000",
                                      "--log-level", "warning", "--threads", "1"])
    assert result.exit_code == 0, result.output
    config = seen["config"]
    assert (config.max_beams, config.max_streams, config.max_body_bytes) == (3, 2, 1000)
    assert seen["log_level"] == "warning" and seen["load"]["threads"] == 1
    assert result.stdout == "" and result.stderr.startswith(f"serving {tiny_gpt2_dir} (torch) on http://127.0.0.1:9001")
