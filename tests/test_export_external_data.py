"""Large graphs keep their weights in `<graph>.data` (issue 7: ONNX Runtime then opens them without a
protobuf copy of every weight); the artifact checksums that file, and converted profiles drop it."""
from __future__ import annotations

from pathlib import Path

import pytest

from deploylm.artifact import external_data_files, load_artifact


def _graph(path: Path, external: bool, offset: float = 0.0, rows: int = 10) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array(np.arange(4 * rows, dtype=np.float32).reshape(rows, 4) + offset, "embed")
    graph = helper.make_graph([helper.make_node("Gather", ["embed", "input_ids"], ["logits"])], "g",
                              [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 4])], [table])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if external:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))


def test_converted_graphs_replace_the_fp32_data_file(tmp_path):
    """A converted graph written inline (under the size threshold): the fp32 graph's model.onnx.data must not
    stay in the artifact."""
    from deploylm.export.precision_step import _replace_graphs

    tmp, chosen = tmp_path / "tmp", tmp_path / "chosen"
    tmp.mkdir(), chosen.mkdir()
    _graph(tmp / "model.onnx", external=True)
    _graph(chosen / "model.onnx", external=False)
    _replace_graphs(chosen, tmp, ["model.onnx"])
    assert sorted(p.name for p in tmp.iterdir()) == ["model.onnx"] and external_data_files(tmp / "model.onnx") == []


def test_converted_graphs_bring_their_own_data_file(tmp_path):
    from deploylm.export.precision_step import _replace_graphs

    tmp, chosen = tmp_path / "tmp", tmp_path / "chosen"
    tmp.mkdir(), chosen.mkdir()
    _graph(tmp / "model.onnx", external=True)
    _graph(chosen / "model.onnx", external=True, offset=0.5)
    assert (tmp / "model.onnx.data").read_bytes() != (chosen / "model.onnx.data").read_bytes()
    _replace_graphs(chosen, tmp, ["model.onnx"])
    assert (tmp / "model.onnx.data").read_bytes() == (chosen / "model.onnx.data").read_bytes()


def test_saving_a_graph_over_its_own_data_file_rewrites_it(tmp_path):
    """save_graph in place (as pack_matmuls does): the data file holds the weights once, not the old bytes
    followed by the new ones (onnx appends to a data file that exists)."""
    import onnx

    from deploylm.export.onnx_export import save_graph

    path = tmp_path / "model.onnx"
    _graph(path, external=True, rows=100)                   # 1600 bytes: over save_graph's 1 KiB threshold
    for _ in range(2):
        save_graph(onnx.load(str(path)), path, location="model.onnx.data")
        assert (tmp_path / "model.onnx.data").stat().st_size == 100 * 4 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]


@pytest.fixture(scope="module")
def external_export(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama exported with every weight as external data (threshold lowered to 0)."""
    from deploylm.export import onnx_export
    from deploylm.export.pipeline import export_model

    out = tmp_path_factory.mktemp("ext") / "llama-fp32"
    saved = onnx_export.EXTERNAL_DATA_BYTES
    onnx_export.EXTERNAL_DATA_BYTES = 0
    try:
        export_model(tiny_llama_dir, "fp32", out)
    finally:
        onnx_export.EXTERNAL_DATA_BYTES = saved
    return out


def test_export_writes_checksummed_external_data_that_loads_and_generates(external_export, tiny_llama_dir):
    import deploylm

    artifact = load_artifact(external_export)
    assert external_data_files(external_export / "model.onnx") == ["model.onnx.data"]
    assert artifact.files["model.onnx.data"]["bytes"] == (external_export / "model.onnx.data").stat().st_size > 0
    assert list(artifact.io) == ["model.onnx"] and artifact.manifest["parity"]["passed"]
    prompts = ["the quick brown fox", "hello world"]
    ours = deploylm.load(external_export, backend="onnx").generate(prompts, num_beams=2, max_new_tokens=6)
    ref = deploylm.load(tiny_llama_dir, backend="torch").generate(prompts, num_beams=2, max_new_tokens=6)
    assert [r.sequences[0].token_ids for r in ours] == [r.sequences[0].token_ids for r in ref]



@pytest.mark.parametrize("profile", ["int8", "int8-static", "fp16"])
def test_converted_and_quantized_graphs_over_the_threshold_keep_external_data(profile, tiny_llama_dir, tmp_path, monkeypatch):
    """Every profile writes large graphs as export does (a 3 GB int8 graph would not fit protobuf's 2 GiB)."""
    import deploylm
    from deploylm.export import onnx_export
    from deploylm.export.pipeline import export_model

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)
    out = tmp_path / profile
    report = export_model(tiny_llama_dir, profile, out)
    layout_notes = [line for line in report.details if "concat KV layout" in line]
    assert len(layout_notes) == (profile == "int8-static")   # its speed ratio is not against the shipped fp32 layout
    artifact = load_artifact(out)
    assert external_data_files(out / "model.onnx") == ["model.onnx.data"]
    assert artifact.files["model.onnx.data"]["bytes"] == (out / "model.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in out.iterdir() if p.name.endswith((".onnx", ".data"))) == ["model.onnx", "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_mode & 0o777 == (out / "model.onnx").stat().st_mode & 0o777
    result = deploylm.load(out, backend="onnx").generate(["the quick brown fox"], num_beams=2, max_new_tokens=4)
    assert len(result[0].sequences[0].token_ids) >= 1
