"""Artifacts: atomic write, manifest contents, and loading that refuses anything changed or missing."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from deploylm import __version__
from deploylm.artifact import (FORMAT_VERSION, Artifact, io_signature, load_artifact, source_fields,
                               summary, weights_sha256, write_artifact)
from deploylm.errors import ArtifactError, UsageError, WriteFailed
from deploylm.models.source import Source
from deploylm.profiles import load_profile


def tiny_graph(path: Path, input_name: str = "input_ids") -> None:
    """input_ids int64 [batch, sequence] -> logits float [batch, sequence, 4] (an embedding lookup)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "embed")
    node = helper.make_node("Gather", ["embed", input_name], ["logits"])
    graph = helper.make_graph(
        [node], "tiny",
        [helper.make_tensor_value_info(input_name, TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 4])],
        [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


def build(folder: Path) -> None:
    tiny_graph(folder / "model.onnx")
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')


FIELDS = {"source": {"kind": "hf", "path": "/models/tiny", "weights_sha256": "ab" * 32},
          "profile": load_profile("fp32").to_dict(),
          "parity": {"reference": "torch", "passed": True, "backends": {"onnx": {
              "max_abs_logit": 2e-5, "token_agreement": 1.0, "first_divergence": None, "beams_identical": True}}}}


@pytest.fixture()
def artifact(tmp_path) -> Path:
    return write_artifact(tmp_path / "export" / "tiny-fp32", build, FIELDS)


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_write_creates_a_complete_manifest(artifact):
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION and manifest["deploylm_version"] == __version__
    assert manifest["created"].endswith("+00:00")
    assert set(manifest["files"]) == {"model.onnx", "config.json", "tokenizer/tokenizer.json"}
    entry = manifest["files"]["config.json"]
    assert entry["bytes"] == len('{"model_type": "gpt2"}') and len(entry["sha256"]) == 64
    assert manifest["io"] == {"model.onnx": {
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]}],
        "outputs": [{"name": "logits", "dtype": "float", "shape": ["batch", "sequence", 4]}]}}
    assert manifest["toolchain"]["torch"] and manifest["toolchain"]["onnxruntime"]
    assert manifest["profile"]["name"] == "fp32" and manifest["source"]["kind"] == "hf"
    assert leftovers(artifact.parent) == []


def test_load_verifies_and_exposes_the_profile(artifact):
    loaded = load_artifact(artifact)
    assert isinstance(loaded, Artifact) and loaded.graphs == [artifact / "model.onnx"]
    assert loaded.profile == load_profile("fp32")


def test_existing_folder_is_refused_without_force(artifact):
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(UsageError, match="already exists: pass --force"):
        write_artifact(artifact, build, FIELDS)
    assert (artifact / "manifest.json").read_text() == before


def test_an_empty_folder_is_filled_without_force_but_never_the_current_one(tmp_path, monkeypatch):
    empty = tmp_path / "made-by-the-user"
    empty.mkdir()
    write_artifact(empty, build, FIELDS)
    assert (empty / "manifest.json").is_file() and leftovers(tmp_path) == []
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(UsageError, match="--out '.' is the current folder or holds it"):
        write_artifact(Path("."), build, FIELDS)
    assert list(here.iterdir()) == []


def test_force_replaces_and_leaves_nothing_behind(artifact):
    def build_other(folder):
        build(folder)
        (folder / "extra.txt").write_text("new")

    write_artifact(artifact, build_other, FIELDS, force=True)
    assert "extra.txt" in load_artifact(artifact).files
    assert leftovers(artifact.parent) == []


def test_force_through_a_symlink_replaces_the_linked_artifact_and_leaves_nothing_behind(artifact):
    """`--out current --force` where current -> tiny-fp32: the link keeps pointing at the new artifact; no
    `.current.tmp-*` link is left beside it (rmtree cannot delete a symlink, and it was ignored)."""
    link = artifact.parent / "current"
    link.symlink_to(artifact.name)

    def build_other(folder):
        build(folder)
        (folder / "extra.txt").write_text("new")

    write_artifact(link, build_other, FIELDS, force=True)
    assert link.is_symlink() and link.resolve() == artifact.resolve()
    assert "extra.txt" in load_artifact(artifact).files
    assert leftovers(artifact.parent) == []


def test_force_never_replaces_a_file_a_folder_of_other_things_or_the_current_folder(tmp_path, artifact, monkeypatch):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(UsageError, match=r"--out '.*notes.txt' is a file: expected a folder for the artifact"):
        write_artifact(notes, build, FIELDS, force=True)
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("code")
    with pytest.raises(UsageError, match=r"--force: '.*project' is not an exported artifact \(no manifest.json\)"):
        write_artifact(project, build, FIELDS, force=True)
    monkeypatch.chdir(artifact)
    with pytest.raises(UsageError, match="--out '.' is the current folder or holds it"):
        write_artifact(Path("."), build, FIELDS, force=True)
    with pytest.raises(UsageError, match="is the current folder or holds it"):
        write_artifact(artifact.parent, build, FIELDS, force=True)
    assert notes.read_text() == "mine" and (project / "main.py").read_text() == "code"
    assert leftovers(tmp_path) == [] and leftovers(project) == [] and leftovers(artifact.parent) == []
    load_artifact(artifact)
    empty = tmp_path / "empty"
    empty.mkdir()
    write_artifact(empty, build, FIELDS, force=True)        # an empty folder is fine, as without --force
    load_artifact(empty)


def test_failed_build_leaves_no_artifact_and_keeps_the_old_one(tmp_path, artifact):
    def crash(folder):
        build(folder)
        raise RuntimeError("export blew up")

    with pytest.raises(RuntimeError):
        write_artifact(tmp_path / "new", crash, FIELDS)
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []
    with pytest.raises(RuntimeError):
        write_artifact(artifact, crash, FIELDS, force=True)
    load_artifact(artifact)                                  # the old one is intact
    assert leftovers(artifact.parent) == []


@pytest.mark.parametrize("failure", [
    lambda folder: OSError(28, "No space left on device"),               # onnx.save writing model.onnx
    lambda folder: __import__("shutil").Error([(str(folder / "model.onnx"), str(folder / "copy"),
                                               f"[Errno 28] No space left on device: '{folder / 'model.onnx'}'")]),
])
def test_a_full_disk_is_one_error_line_and_keeps_the_old_artifact(tmp_path, artifact, failure):
    def build_full(folder):
        build(folder)
        raise failure(folder)

    for target, kept in ((tmp_path / "new", "nothing was written"), (artifact, "the artifact already there is kept")):
        with pytest.raises(WriteFailed, match=rf"could not write the artifact .*: No space left on device; {kept}; "
                                              r"free space or choose another --out") as failed:
            write_artifact(target, build_full, FIELDS, force=True)
        assert failed.value.exit_code == 1                   # the machine's fault, not a usage error (2)
        assert leftovers(target.parent) == []
    assert not (tmp_path / "new").exists()
    load_artifact(artifact)


def test_crash_during_swap_restores_the_old_artifact(artifact, monkeypatch):
    """The two-rename path (no atomic exchange on this system): a failure after the old folder was
    moved aside puts it back."""
    from deploylm import fsutil

    real_replace, calls = os.replace, []

    def flaky(src, dst):
        if Path(dst) == artifact and not calls:              # the swap's second rename: tmp -> final
            calls.append(src)
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    monkeypatch.setattr(fsutil.os, "replace", flaky)
    with pytest.raises(OSError):
        write_artifact(artifact, build, FIELDS, force=True)
    monkeypatch.undo()
    assert calls and ".tmp-" in str(calls[0])                # the failure did happen in the swap
    load_artifact(artifact)
    assert leftovers(artifact.parent) == []


def test_one_changed_byte_is_refused(artifact):
    graph = artifact / "model.onnx"
    data = bytearray(graph.read_bytes())
    data[-5] ^= 0x01
    graph.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model.onnx: sha256 does not match.*deploylm export --model "
                                            r"/models/tiny --profile fp32 --out .* --force"):
        load_artifact(artifact)
    load_artifact(artifact, verify=False)                    # manifest alone still reads


@pytest.mark.parametrize("damage,message", [
    (lambda a: (a / "tokenizer" / "tokenizer.json").unlink(), r"tokenizer/tokenizer.json: listed in the manifest but missing"),
    (lambda a: (a / "config.json").write_text("{}"), r"config.json: 2 bytes, the manifest says 22"),
    (lambda a: (a / "manifest.json").write_text("{not json"), r"manifest.json: not valid JSON"),
    (lambda a: (a / "manifest.json").unlink(), r"is not an artifact: manifest.json is missing"),
    (lambda a: _edit(a, lambda m: m.pop("io")), r"manifest.json: missing field\(s\) io"),
    (lambda a: _edit(a, lambda m: m.update(format_version=FORMAT_VERSION + 1)),
     r"format_version 2 is not supported .* upgrade deploylm or re-export it"),
    (lambda a: _edit(a, lambda m: m.update(format_version=0)),   # older: no "upgrade deploylm" (it would not help)
     r"format_version 0 is not supported \(this deploylm reads 1\); re-export it"),
    (lambda a: _edit(a, lambda m: m["io"]["model.onnx"]["inputs"][0].update(name="ids")),
     r"model.onnx: graph inputs/outputs differ from the manifest \(input 'ids' is missing\)"),
    (lambda a: _edit(a, lambda m: m.update(source="hello")), r"manifest.json: 'source' must be object\(s\)"),
    (lambda a: _edit(a, lambda m: m.update(profile=None)), r"manifest.json: 'profile' must be object\(s\)"),
    (lambda a: _edit(a, lambda m: m["profile"].pop("precision")),
     r"manifest.json: 'profile' must name the profile and its precision"),
    # wrong JSON types in a hand-edited manifest: the manifest is named, never a file it lists
    (lambda a: _edit(a, lambda m: m["files"]["config.json"].update(bytes="22")),
     r"manifest.json: 'files' entry for config.json must be an object with sha256 \(a string\) and bytes"),
    (lambda a: _edit(a, lambda m: m["files"].update({"config.json": "abc"})), r"manifest.json: 'files' entry for config.json"),
    (lambda a: _edit(a, lambda m: m["files"]["config.json"].update(bytes=True)),   # a bool is no size
     r"manifest.json: 'files' entry for config.json must be an object with sha256 \(a string\) and bytes"),
    (lambda a: _edit(a, lambda m: m["io"].update({"model.onnx": "x"})),
     r"manifest.json: 'io' entry for model.onnx must be an object with lists of inputs and outputs"),
    (lambda a: _edit(a, lambda m: m["io"]["model.onnx"].update(inputs="input_ids")), r"manifest.json: 'io' entry for model.onnx"),
    (lambda a: _edit(a, lambda m: m.update(generation="beam")), r"manifest.json: 'generation' must be object\(s\)"),
    (lambda a: _edit(a, lambda m: m.update(parity="passed")), r"manifest.json: 'parity' must be object\(s\)"),
    (lambda a: _edit(a, lambda m: m.update(toolchain=["torch"])), r"manifest.json: 'toolchain' must be object\(s\)"),
    # a listed file outside the folder (its real checksum would verify): never read as part of the artifact
    (lambda a: _edit(a, lambda m: m["files"].update({"../../etc/hostname": {"sha256": "0" * 64, "bytes": 3}})),
     r"manifest.json: 'files' entry '../../etc/hostname' is not a path inside the artifact folder"),
    (lambda a: _edit(a, lambda m: m["files"].update({"/etc/hostname": {"sha256": "0" * 64, "bytes": 3}})),
     r"manifest.json: 'files' entry '/etc/hostname' is not a path inside the artifact folder"),
    (lambda a: _edit(a, lambda m: m["files"].update({"..\\..\\x": {"sha256": "0" * 64, "bytes": 3}})),
     r"manifest.json: 'files' entry '\.\.\\\\\.\.\\\\x' is not a path inside the artifact folder"),   # Windows
    # a profile export could not have written: info and generate refused it too, not only parity
    (lambda a: _edit(a, lambda m: m["profile"].update(precision="fp9")), r"manifest.json \('profile'\).*precision"),
    (lambda a: _edit(a, lambda m: m["profile"].update(parity={"logits_atol": -5})),
     r"manifest.json \('profile'\).*logits_atol"),
    # the model's own config files edited and their checksums updated to match: named, not a JSON traceback
    (lambda a: _rewrite(a, "config.json", "{"), r"config.json: not valid JSON"),
    (lambda a: _rewrite(a, "config.json", "[]"), r"config.json: expected the model's configuration as a JSON object"),
    (lambda a: _rewrite(a, "config.json", None), r"config.json: missing: an artifact carries its model's config.json"),
    (lambda a: _rewrite(a, "generation_config.json", '{"eos_token_id": "x"}'),
     r"generation_config.json: eos_token_id is \"x\": expected a token id"),
    # a graph in io whose file is there but unlisted (so unchecked), out of reach of the top-level stray check
    (lambda a: _unlisted_graph(a), r"manifest.json: io lists sub/model.onnx, which is not among its files"),
    (lambda a: _edit(a, lambda m: m["io"]["model.onnx"]["outputs"].pop()),
     r"model.onnx: graph inputs/outputs differ from the manifest \(output '[^']+' is not in the manifest\)"),
])
def test_damaged_artifacts_are_refused_with_the_file_named(artifact, damage, message):
    damage(artifact)
    with pytest.raises(ArtifactError, match=message) as err:
        load_artifact(artifact)
    assert "re-export it" in str(err.value) and "\n" not in str(err.value)


def _unreadable(monkeypatch, name: str) -> None:
    """Reading `name` fails as for a chmod 000 file (the tests run as root, for whom chmod changes nothing)."""
    real_open, real_read = open, Path.read_text

    def guarded_open(file, *args, **kwargs):
        if Path(file).name == name:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_read(self, *args, **kwargs):
        if self.name == name:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(Path, "read_text", guarded_read)


@pytest.mark.parametrize("name", ["manifest.json", "tokenizer.json", "model.onnx"])
def test_an_unreadable_file_is_one_error_naming_it(artifact, monkeypatch, name):
    _unreadable(monkeypatch, name)
    with pytest.raises(ArtifactError, match=rf"{name}: cannot read it \(Permission denied\): check the permissions"):
        load_artifact(artifact)


def test_a_folder_that_cannot_be_searched_is_one_error_naming_it(artifact, monkeypatch):
    from deploylm.models.source import resolve_source

    real = Path.is_file

    def denied(self):
        if self.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)      # what stat() of a file in a chmod 000 folder does
    with pytest.raises(UsageError, match=r"model '.*tiny-fp32': cannot read .*manifest.json \(Permission denied\)"):
        resolve_source(str(artifact))


@pytest.mark.parametrize("name", ["decoder_model.onnx", "encoder_model.onnx"])
def test_a_graph_the_manifest_does_not_list_is_refused(artifact, name):
    """The onnx backend opens model.onnx / encoder_model.onnx / decoder_model.onnx by name: a stray one would run
    unchecked (a decoder_model.onnx beside model.onnx made it treat the artifact as an encoder-decoder)."""
    import shutil

    shutil.copy(artifact / "model.onnx", artifact / name)
    with pytest.raises(ArtifactError, match=rf"{name}: a graph the manifest does not list .*remove it or re-export it"):
        load_artifact(artifact)


def test_replaced_graph_with_other_io_is_refused(artifact):
    """A graph swapped for one with other inputs (checksums updated too) still fails the IO check."""
    tiny_graph(artifact / "model.onnx", input_name="tokens")
    _edit(artifact, lambda m: m["files"].update(
        {"model.onnx": json.loads(json.dumps(_entry(artifact / "model.onnx")))}))
    with pytest.raises(ArtifactError, match="input 'input_ids' is missing"):
        load_artifact(artifact)


def _graph_of(path: Path, inputs: list[str], output: str = "logits", symbolic_vocab: bool = False,
              copies: tuple[str, ...] = ()) -> None:
    """input_ids plus `inputs` (float [batch, 2, past, 4], unused) -> `output` [batch, sequence, 4];
    symbolic_vocab: [batch, sequence, past] instead (the rows of past_key_values.0.key[0, 0] as the vocabulary);
    `copies`: more outputs, each a copy of the first of `inputs`."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "embed")
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["hidden" if symbolic_vocab else output])]
    if symbolic_vocab:
        zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "zero")
        nodes = [helper.make_node("Constant", [], ["zero"], value=zero), *nodes,
                 helper.make_node("Gather", [inputs[0], "zero"], ["k0"], axis=0),          # [2, past, 4]
                 helper.make_node("Gather", ["k0", "zero"], ["k00"], axis=0),              # [past, 4]
                 helper.make_node("Transpose", ["k00"], ["kt"]),                           # [4, past]
                 helper.make_node("MatMul", ["hidden", "kt"], [output])]                  # [batch, sequence, past]
    nodes += [helper.make_node("Identity", [inputs[0]], [name]) for name in copies]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, "past", 4]) for name in inputs],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", "sequence", "past" if symbolic_vocab else 4])]
        + [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 2, "past", 4]) for name in copies],
        [table])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))


@pytest.mark.parametrize("graph, message", [
    (lambda path: tiny_graph(path), r"graph inputs do not follow the IO spec \(no past_key_values\.0\.value\)"),
    (lambda path: _graph_of(path, ["past_key_values.0.key", "past_key_values.0.value"]),
     r"graph outputs follow no KV layout of the IO spec \(no present\.0\.value\)"),
    (lambda path: _graph_of(path, ["past_key_values.0.key", "past_key_values.0.value", "prompt_key_values.0.key"],
                            copies=("new_key_values.0.key", "new_key_values.0.value")),
     r"graph inputs do not follow the IO spec's shared-prompt layout \(no prompt_key_values\.0\.value\)"),
    (lambda path: _graph_of(path, ["past_key_values.0.key", "past_key_values.0.value"], output="scores"),
     r"the graph has no logits output, which the IO spec requires"),
    (lambda path: _graph_of(path, ["past_key_values.0.key", "past_key_values.0.value"], symbolic_vocab=True),
     r"the graph's logits output has no fixed vocabulary size \(last dimension 'past'\), which the IO spec "
     r"requires"),
])
def test_graphs_the_onnx_backend_cannot_run_name_the_command_that_rebuilds_the_artifact(tmp_path, graph, message):
    """An intact artifact (checksums and IO match its manifest) whose graphs do not follow this deploylm's IO spec
    (another version wrote it, or a hand-made one): one ArtifactError with the full re-export command."""
    from deploylm.backends.onnx_backend import OnnxBackend

    def build_with(folder: Path) -> None:
        build(folder)
        graph(folder / "model.onnx")

    artifact = write_artifact(tmp_path / "export" / "tiny-fp32", build_with, FIELDS)
    folder = re.escape(str(artifact))
    with pytest.raises(ArtifactError, match=rf"^{folder}: {message}; re-export it: deploylm export --model "
                                            rf"/models/tiny --profile fp32 --out {folder} --force$"):
        OnnxBackend.from_source(str(artifact))


def test_io_signature_of_a_broken_file(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ArtifactError, match="not a readable ONNX graph"):
        io_signature(bad)


def test_weights_sha256_and_source_fields(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert weights_sha256(folder) is None
    (folder / "model.safetensors").write_bytes(b"weights")
    first = weights_sha256(folder)
    (folder / "model.safetensors").write_bytes(b"weightz")
    assert len(first) == 64 and weights_sha256(folder) != first
    fields = source_fields(Source("hf", folder))
    assert fields["kind"] == "hf" and fields["weights_sha256"] == weights_sha256(folder)


def test_weights_sha256_covers_each_weight_file_by_its_path_and_nothing_else(tmp_path):
    """The digest names each weight file: a renamed (or moved) shard is another model; files that are
    no weights (config, tokenizer) leave it alone."""
    folder = tmp_path / "hf"
    (folder / "sub").mkdir(parents=True)
    (folder / "model-1.safetensors").write_bytes(b"one")
    (folder / "sub" / "model-2.bin").write_bytes(b"two")
    first = weights_sha256(folder)
    (folder / "config.json").write_text('{"changed": true}')
    (folder / "tokenizer.json").write_text("{}")
    assert weights_sha256(folder) == first
    (folder / "model-1.safetensors").rename(folder / "model-0.safetensors")
    assert weights_sha256(folder) != first
    (folder / "model-0.safetensors").rename(folder / "model-1.safetensors")
    assert weights_sha256(folder) == first


def test_io_signature_leaves_out_initializers_listed_as_inputs(tmp_path):
    """Older ONNX exports list every weight among the graph inputs too: they are no inputs to feed."""
    import onnx
    from onnx import helper

    tiny_graph(tmp_path / "model.onnx")
    model = onnx.load(str(tmp_path / "model.onnx"))
    model.graph.input.append(helper.make_tensor_value_info("embed", onnx.TensorProto.FLOAT, [10, 4]))
    onnx.save(model, str(tmp_path / "old.onnx"))
    sig = io_signature(tmp_path / "old.onnx")
    assert [v["name"] for v in sig["inputs"]] == ["input_ids"] and sig == io_signature(tmp_path / "model.onnx")


def test_summary_shows_profile_io_sizes_and_parity(artifact):
    text = summary(load_artifact(artifact))
    for expected in ("format     1", "profile    fp32", "hf /models/tiny", "model.onnx", "input_ids",
                     "int64", "[batch, sequence]", "files      3 checksummed in manifest.json", "reference torch: PASSED",
                     "first divergence none"):
        assert expected in text, expected


def _entry(path: Path) -> dict:
    from deploylm.artifact import sha256_file

    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def _rewrite(artifact: Path, name: str, text: str | None) -> None:
    """Replace (or with None remove) a listed file and make the manifest's checksum agree, as a hand edit
    that knows about the manifest would."""
    import hashlib

    def change(manifest):
        if text is None:
            manifest["files"].pop(name)
        else:
            manifest["files"][name] = {"sha256": hashlib.sha256(text.encode()).hexdigest(), "bytes": len(text.encode())}

    if text is None:
        (artifact / name).unlink()
    else:
        (artifact / name).write_text(text)
    _edit(artifact, change)


def _unlisted_graph(artifact: Path) -> None:
    (artifact / "sub").mkdir()
    (artifact / "sub" / "model.onnx").write_bytes((artifact / "model.onnx").read_bytes())
    _edit(artifact, lambda m: m["io"].update({"sub/model.onnx": m["io"]["model.onnx"]}))


def _edit(artifact: Path, change) -> None:
    manifest = json.loads((artifact / "manifest.json").read_text())
    change(manifest)
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def build_external(folder: Path) -> None:
    """Like `build`, with the graph's weights in model.onnx.data next to it (ONNX external data)."""
    import onnx

    build(folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)


@pytest.fixture()
def external(tmp_path) -> Path:
    return write_artifact(tmp_path / "export" / "tiny-ext-fp32", build_external, FIELDS)


def test_external_data_is_listed_checksummed_and_loads(external):
    from deploylm.artifact import external_data_files

    manifest = json.loads((external / "manifest.json").read_text())
    assert external_data_files(external / "model.onnx") == ["model.onnx.data"]
    data = external / "model.onnx.data"
    assert manifest["files"]["model.onnx.data"]["bytes"] == data.stat().st_size == 160
    assert list(manifest["io"]) == ["model.onnx"]                 # the data file is no graph
    assert load_artifact(external).graphs == [external / "model.onnx"]
    import onnxruntime as ort                                     # the graph reads its weights from it
    import numpy as np
    out = ort.InferenceSession(str(external / "model.onnx")).run(None, {"input_ids": np.array([[2, 9]])})[0]
    assert out.tolist() == [[[8, 9, 10, 11], [36, 37, 38, 39]]]


def test_changed_external_data_is_refused(external):
    data = external / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[7] ^= 0x01
    data.write_bytes(bytes(raw))
    with pytest.raises(ArtifactError, match=r"model.onnx.data: sha256 does not match.*--force"):
        load_artifact(external)


def test_missing_external_data_is_refused(external):
    (external / "model.onnx.data").unlink()
    with pytest.raises(ArtifactError, match=r"model.onnx.data: listed in the manifest but missing"):
        load_artifact(external)


def test_external_data_the_manifest_does_not_list_is_refused(external):
    """A graph must not read weights that were never checksummed (manifest edited, or a hand-made folder)."""
    _edit(external, lambda m: m["files"].pop("model.onnx.data"))
    with pytest.raises(ArtifactError, match=r"model.onnx: reads weights from model.onnx.data, which the "
                                            r"manifest does not list"):
        load_artifact(external)


def test_export_whose_graph_reads_a_missing_data_file_writes_nothing(tmp_path):
    def broken(folder: Path) -> None:
        build_external(folder)
        (folder / "model.onnx.data").unlink()

    with pytest.raises(ArtifactError, match="reads weights from model.onnx.data, which is not a file"):
        write_artifact(tmp_path / "export" / "broken", broken, FIELDS)
    assert not (tmp_path / "export" / "broken").exists() and leftovers(tmp_path / "export") == []


def test_a_sigterm_mid_export_removes_the_temporary_folder(tmp_path):
    """`kill` (SIGTERM) during the build: the CLI's handler turns it into SystemExit (status 143), so the
    temporary folder is removed as for Ctrl-C, and nothing is left at --out."""
    import subprocess
    import sys

    out = tmp_path / "export" / "art"
    script = tmp_path / "killed.py"
    script.write_text(
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from deploylm.artifact import write_artifact\n"
        "from deploylm.cli import exit_on_sigterm\n"
        "exit_on_sigterm()\n"
        "def build(folder):\n"
        "    (folder / 'model.onnx').write_bytes(b'half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    raise AssertionError('SIGTERM did not stop the build')\n"
        "write_artifact(Path(sys.argv[1]), build, {})\n")
    run = subprocess.run([sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 143, run.stderr[-2000:]
    assert not out.exists() and leftovers(out.parent) == []


def test_a_killed_exports_temporary_folder_is_removed_by_the_next_export(tmp_path):
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    out = tmp_path / "export" / "tiny-fp32"
    out.parent.mkdir(parents=True)
    stale = out.parent / f".tiny-fp32.tmp-{gone.pid}"             # SIGKILL left it; its process is gone
    (stale / "half").mkdir(parents=True)
    live = out.parent / f".tiny-fp32.tmp-{os.getppid()}"           # another export still at work
    live.mkdir()
    other = out.parent / ".tiny-fp32.tmp-notes"                     # not a pid: never touched
    other.mkdir()
    write_artifact(out, build, FIELDS)
    assert load_artifact(out) and not stale.exists() and live.is_dir() and other.is_dir()


def test_an_older_parity_summary_prints_as_before():
    from deploylm.artifact import format_parity

    assert format_parity({"reference": "torch", "passed": True, "backends": {}}) == ["  reference torch: PASSED"]


def test_a_config_json_of_no_model_is_refused_by_the_onnx_backend_naming_the_files(artifact):
    """A JSON object that is no model's configuration (no model_type): transformers' ValueError from deep inside
    the load became one line naming the artifact's config files and the command that rebuilds it."""
    from deploylm.backends.onnx_backend import OnnxBackend

    _rewrite(artifact, "config.json", "{}")
    with pytest.raises(ArtifactError, match=r"config.json / generation_config.json do not describe the model .*"
                                            r"Unrecognized model.*; re-export it") as err:
        OnnxBackend.from_source(str(artifact))
    assert "\n" not in str(err.value)


def test_summary_of_a_profile_without_a_description_has_no_dangling_colon(artifact):
    from deploylm.artifact import summary

    _edit(artifact, lambda m: m["profile"].update(description=""))
    line = next(l for l in summary(load_artifact(artifact)).splitlines() if l.startswith("profile"))
    assert line == "profile    fp32 (fp32; backends onnx)", line


def test_format_size_switches_unit_at_1024():
    from deploylm.artifact import format_size

    assert [format_size(n) for n in (0, 1023, 1024, 1536, 1 << 20, 3 << 30, 5000 << 30)] == [
        "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "1.0 MiB", "3.0 GiB", "5000.0 GiB"]


def test_a_parity_summary_that_does_not_say_passed_is_not_shown_as_passed():
    from deploylm.artifact import format_parity

    assert format_parity({"reference": "torch", "passed": True})[0] == "  reference torch: PASSED"
    assert format_parity({"reference": "torch", "passed": None})[0] == "  reference torch: FAILED"
    assert format_parity({"reference": "torch"})[0] == "  reference torch: FAILED"


def test_a_first_divergence_at_step_0_is_shown_as_step_0():
    from deploylm.artifact import format_parity

    rows = {"onnx": {"max_abs_logit": 0.5, "token_agreement": 0.9, "first_divergence": 0, "beams_identical": False},
            "trt": {"max_abs_logit": 0.0, "token_agreement": 1.0, "first_divergence": None, "beams_identical": True}}
    lines = format_parity({"reference": "torch", "passed": False, "backends": rows})
    assert "first divergence step 0" in lines[1] and "first divergence none" in lines[2], lines
