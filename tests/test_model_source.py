"""What a SRC path is (deploylm.models.source.resolve_source): a .gguf file (any case of the suffix), an
artifact (manifest.json first), a deploylm checkpoint (config.json model_type deploylm-*), any other
folder with config.json a Hugging Face folder; everything else one UsageError naming SRC."""
from __future__ import annotations

import json

import pytest

from deploylm.errors import UsageError
from deploylm.models.source import resolve_source


def _folder(path, config=None, files=()):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))
    for name in files:
        (path / name).write_bytes(b"")
    return path


@pytest.mark.parametrize("name", ["model.gguf", "MODEL.GGUF", "m.Q4_1.Gguf"])
def test_a_gguf_file_is_a_gguf_source_whatever_the_case_of_its_suffix(tmp_path, name):
    (tmp_path / name).write_bytes(b"GGUF")
    source = resolve_source(tmp_path / name)
    assert (source.kind, source.name) == ("gguf", name.rsplit(".", 1)[0])


@pytest.mark.parametrize("model_type, kind", [("deploylm-lm", "checkpoint"), ("deploylm-seq2seq", "checkpoint"),
                                              ("llama", "hf"), (None, "hf")])
def test_a_folder_is_a_checkpoint_or_a_hugging_face_folder_by_its_model_type(tmp_path, model_type, kind):
    folder = _folder(tmp_path / "m", {} if model_type is None else {"model_type": model_type})
    assert resolve_source(str(folder)).kind == kind


def test_a_folder_with_a_manifest_is_an_artifact_whatever_its_config(tmp_path):
    folder = _folder(tmp_path / "a", {"model_type": "deploylm-lm"}, ["manifest.json", "model.onnx"])
    assert resolve_source(folder).kind == "artifact"


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_a_hugging_face_folder_that_also_holds_onnx_graphs_is_a_hugging_face_folder(tmp_path, weights):
    folder = _folder(tmp_path / "hf", {"model_type": "llama"}, [weights, "model.onnx"])
    assert resolve_source(folder).kind == "hf"


def test_graphs_without_weights_or_manifest_are_refused_as_an_incomplete_artifact(tmp_path):
    folder = _folder(tmp_path / "half", {"model_type": "llama"}, ["model.onnx"])
    with pytest.raises(UsageError, match=r"holds exported graphs \(model.onnx\) but no manifest.json"):
        resolve_source(folder)


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, r"does not exist"),
    (lambda p: p.write_text("x"), r"model file '.*' is not a .gguf file"),
    (lambda p: _folder(p), r"has no config.json"),
    (lambda p: (_folder(p), (p / "config.json").write_text("{")), r"config.json: not valid JSON"),
    (lambda p: _folder(p, ["llama"]), r"config.json: expected a JSON object of model settings, got list"),
])
def test_anything_else_is_one_usage_error(tmp_path, setup, message):
    path = tmp_path / "src"
    setup(path)
    with pytest.raises(UsageError, match=message):
        resolve_source(path)
    with pytest.raises(UsageError, match=r"expected the path"):
        resolve_source("  ")


def test_a_config_json_that_is_not_utf8_is_named_as_not_valid_json(tmp_path):
    folder = _folder(tmp_path / "m")
    (folder / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    with pytest.raises(UsageError, match=r"config.json: not valid JSON"):
        resolve_source(folder)


def test_a_config_json_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    """The tests run as root, for whom chmod 000 changes nothing: reading config.json fails as it would."""
    from pathlib import Path

    folder = _folder(tmp_path / "m", {"model_type": "llama"})
    read = Path.read_text

    def denied(self, *args, **kwargs):
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(UsageError, match=r"cannot read .*config.json \(Permission denied\): check its permissions"):
        resolve_source(folder)


def test_a_path_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve_source("~/m.gguf")
    assert (source.kind, source.path) == ("gguf", tmp_path / "m.gguf")


def test_tensorrt_engines_without_a_manifest_are_refused_as_an_incomplete_artifact(tmp_path):
    folder = _folder(tmp_path / "half", {"model_type": "llama"}, ["decoder.engine", "encoder.engine"])
    with pytest.raises(UsageError, match=r"holds exported graphs \(decoder.engine, encoder.engine\) but no manifest"):
        resolve_source(folder)


def test_each_kind_is_named_in_words_in_the_refusals(tmp_path):
    """Source.a_kind is what refusals say a SRC is ("--teacher ... is an exported artifact: expected ...")."""
    from deploylm.models.hf import load_hf_model

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    found = {kind: resolve_source(path).a_kind for kind, path in [
        ("checkpoint", _folder(tmp_path / "ck", {"model_type": "deploylm-lm"})),
        ("hf", _folder(tmp_path / "hf", {"model_type": "llama"})),
        ("artifact", _folder(tmp_path / "a", {}, ["manifest.json"])),
        ("gguf", tmp_path / "m.gguf")]}
    assert found == {"checkpoint": "a deploylm checkpoint", "hf": "a Hugging Face folder",
                     "artifact": "an exported artifact", "gguf": "a .gguf file"}
    with pytest.raises(UsageError, match=r"'.*ck' is a deploylm checkpoint, not a Hugging Face folder or .gguf file"):
        load_hf_model(resolve_source(tmp_path / "ck"), dtype=None, device=None)
