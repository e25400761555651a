"""Profiles: built-ins validate and round-trip; malformed files fail naming the file, key and allowed values."""
from __future__ import annotations

import json
import textwrap

import pytest

from deploylm.errors import UsageError
from deploylm.profiles import (Profile, ProfileError, builtin_dir, builtin_names, builtin_profiles,
                               load_profile)

BUILTINS = ["bf16", "fp16", "fp32", "int4", "int8", "int8-dynamic", "int8-rowwise", "int8-static", "trt-fp16",
            "trt-int8"]

BASE = """
name = "mine"
description = "a test profile"
precision = "int8"
backends = ["onnx"]
[parity]
logits_atol = 1.0
logprob_atol = 1.0
min_token_agreement = 0.9
"""


def write(tmp_path, text: str, name: str = "mine.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_builtins_are_the_documented_set_and_validate():
    assert builtin_names() == BUILTINS
    profiles = builtin_profiles()
    assert [p.name for p in profiles] == BUILTINS           # name matches the file stem
    for p in profiles:
        assert p.description and p.backends
        assert p.generation == {"num_beams": 4, "max_new_tokens": 64}
        assert p.parity.logits_atol > 0 and 0 <= p.parity.min_token_agreement <= 1
        # [quality] is measured on ONNX Runtime graphs: TensorRT-only profiles have [parity] alone
        assert (p.quality.max_perplexity_increase is not None) == ("onnx" in p.backends)
    assert (builtin_dir() / "fp32.toml").is_file()


def test_fp32_is_the_strict_reference():
    fp32 = load_profile("fp32")
    assert (fp32.precision, fp32.quantization, fp32.precision_fallback) == ("fp32", None, None)
    assert fp32.parity.logits_atol == 1e-4 and fp32.parity.min_token_agreement == 1.0
    assert fp32.parity.identical_beams


def test_quantized_builtins_resolve_method_defaults():
    int8, static, int4 = load_profile("int8"), load_profile("int8-static"), load_profile("int4")
    assert int8.quantization.method == "weight-only" and int8.quantization.calibration_samples is None
    assert int8.quantization.symmetric and int8.quantization.embedding and int8.quantization.algorithm == "rtn"
    dynamic = load_profile("int8-dynamic").quantization
    assert dynamic.method == "dynamic" and dynamic.weight_type == "quint8" and dynamic.block_size is None
    assert static.quantization.method == "static" and static.quantization.calibration_method == "minmax"
    assert int4.quantization.method == "weight-only" and int4.quantization.block_size == 32
    assert int4.quantization.weight_type is None
    trt = load_profile("trt-fp16")
    assert trt.tensorrt.shapes["batch"] == (1, 4, 32) and trt.tensorrt.workspace_gb == 4.0
    assert load_profile("int8").tensorrt is None


@pytest.mark.parametrize("name", BUILTINS)
def test_to_dict_roundtrips_through_json(name):
    profile = load_profile(name)
    data = json.loads(json.dumps(profile.to_dict()))
    assert Profile.from_dict(data) == profile
    assert "origin" not in data


def test_user_file_loads_by_path_with_defaults(tmp_path):
    profile = load_profile(write(tmp_path, BASE))
    assert profile.name == "mine" and profile.quantization.method == "dynamic"
    assert profile.quantization.weight_type == "quint8" and profile.generation == {}
    assert profile.precision_fallback.ops == () and not profile.precision_fallback.auto
    assert profile.origin.endswith("mine.toml")


def test_unknown_builtin_lists_the_choices():
    with pytest.raises(ProfileError, match="unknown profile 'int3'.*fp32.*int8-static") as err:
        load_profile("int3")
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.toml")
    (tmp_path / "dir.toml").mkdir()
    with pytest.raises(ProfileError, match=r"'.*dir.toml' is a folder: expected a .toml file"):
        load_profile(tmp_path / "dir.toml")


BAD = [
    ("unknown top-level key", 'colour = "red"', r"unknown key colour: allowed keys are name, description"),
    ("unknown table key", None, r"unknown key parity.logit_atol: allowed keys are logits_atol"),
    ("bad precision", None, r"precision = 'fp8' is not allowed: expected one of fp32, fp16, bf16, int8, int4"),
    ("bad backend", None, r"backends = \['cuda'\] is not allowed: expected a list of torch, onnx, trt"),
    ("negative atol", None, r"parity.logits_atol = -1.0 is out of range: expected a number > 0.0"),
    ("agreement > 1", None, r"parity.min_token_agreement = 1.5 is out of range: expected a number >= 0.0 and <= 1.0"),
    ("wrong type", None, r"parity.logprob_atol = 'big' is not a number: expected a number"),
    ("integer as text", "[quantization]\nmethod = \"weight-only\"\nblock_size = \"64\"",
     r"quantization.block_size = '64' is not an integer: expected an integer >= 16"),
    ("name with a newline", None, r"name = 'abc\\n' is not valid: expected a string matching"),
    ("two-line description", None, r"description = 'one\\ntwo' is not valid"),
    ("nan atol", None, r"parity.logits_atol = nan is out of range: expected a number > 0.0"),
    ("nan agreement", None, r"parity.min_token_agreement = nan is out of range: expected a number >= 0.0 and <= 1.0"),
    ("infinite budget", "[quality]\nmax_perplexity_increase = inf",
     r"quality.max_perplexity_increase = inf is out of range: expected a number >= 0.0 and <= 10.0"),
    ("negative KL budget", "[quality]\nmax_mean_kl = -0.1",
     r"quality.max_mean_kl = -0.1 is out of range: expected a number >= 0.0 and <= 100.0"),
    ("top-1 budget > 1", "[quality]\nmin_top1_agreement = 1.5",
     r"quality.min_top1_agreement = 1.5 is out of range: expected a number >= 0.0 and <= 1.0"),
    ("bad method", "[quantization]\nmethod = \"awq\"", r"quantization.method = 'awq' is not allowed: expected one of dynamic, static, weight-only"),
    ("hqq at 8 bits", "[quantization]\nmethod = \"weight-only\"\nalgorithm = \"hqq\"",
     r"quantization.algorithm = 'hqq' does not apply to precision 'int8': expected 'rtn'"),
    ("key for another method", "[quantization]\nmethod = \"dynamic\"\ncalibration_samples = 8",
     r"quantization.calibration_samples does not apply to method 'dynamic': expected only weight_type"),
    ("bad weight type", "[quantization]\nweight_type = \"int8\"", r"quantization.weight_type = 'int8' is not allowed: expected one of quint8, qint8"),
    ("bad generation key", "[generation]\nbeams = 4", r"unknown key generation.beams: allowed keys are num_beams"),
    ("bad generation value", "[generation]\nnum_beams = 0", r"\[generation\] decoding option num_beams=0 is invalid"),
    ("tensorrt without trt", "[tensorrt]\nworkspace_gb = 2", r"\[tensorrt\] applies only when backends include 'trt'"),
    ("bad toml", "[parity", r"not valid TOML"),
    ("bad name", None, r"name = 'My Profile' is not valid: expected a string matching"),
]


def _mutate(case: str) -> str:
    edits = {
        "unknown table key": ("logits_atol = 1.0", "logits_atol = 1.0\nlogit_atol = 1.0"),
        "bad precision": ('precision = "int8"', 'precision = "fp8"'),
        "bad backend": ('backends = ["onnx"]', 'backends = ["cuda"]'),
        "negative atol": ("logits_atol = 1.0", "logits_atol = -1.0"),
        "agreement > 1": ("min_token_agreement = 0.9", "min_token_agreement = 1.5"),
        "wrong type": ("logprob_atol = 1.0", 'logprob_atol = "big"'),
        "nan atol": ("logits_atol = 1.0", "logits_atol = nan"),
        "nan agreement": ("min_token_agreement = 0.9", "min_token_agreement = nan"),
        "bad name": ('name = "mine"', 'name = "My Profile"'),
        "name with a newline": ('name = "mine"', 'name = "abc\\n"'),
        "two-line description": ('description = "a test profile"', 'description = "one\\ntwo"'),
    }
    old, new = edits[case]
    return BASE.replace(old, new)


@pytest.mark.parametrize("case,extra,message", BAD, ids=[c[0] for c in BAD])
def test_malformed_profiles_name_file_key_and_allowed(tmp_path, case, extra, message):
    if extra is None:
        text = _mutate(case)
    elif extra.startswith("[") or "\n" in extra:
        text = BASE + "\n" + extra + "\n"
    else:
        text = extra + "\n" + BASE
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(err.value).startswith(str(path)), err.value
    assert "\n" not in str(err.value)


def test_quantization_is_an_error_for_float_precisions(tmp_path):
    text = BASE.replace('precision = "int8"', 'precision = "fp16"') + '[quantization]\nmethod = "dynamic"\n'
    with pytest.raises(ProfileError, match=r"\[quantization\] does not apply to precision 'fp16'"):
        load_profile(write(tmp_path, text))


def test_missing_parity_table_is_an_error(tmp_path):
    text = 'name = "x"\nprecision = "fp32"\n'
    with pytest.raises(ProfileError, match=r"missing table \[parity\]"):
        load_profile(write(tmp_path, text))


def test_missing_required_parity_key(tmp_path):
    with pytest.raises(ProfileError, match="missing key parity.min_token_agreement"):
        load_profile(write(tmp_path, BASE.replace("min_token_agreement = 0.9", "")))


@pytest.mark.parametrize("line, message", [
    ('name = "mine"', r"missing key name: expected a string matching \[a-z0-9\]"),
    ('precision = "int8"', r"missing key precision: expected one of fp32, fp16, bf16, int8, int4"),
    ("logits_atol = 1.0", r"missing key parity.logits_atol: expected a number > 0.0"),
    ("min_token_agreement = 0.9", r"missing key parity.min_token_agreement: expected a number >= 0.0 and <= 1.0"),
])
def test_a_missing_key_says_what_is_expected(tmp_path, line, message):
    path = write(tmp_path, BASE.replace(line, ""))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(err.value).startswith(f"{path}: missing key")


@pytest.mark.parametrize("shapes,message", [
    ("{ batch = [4, 1, 16] }", r"tensorrt.shapes.batch = \[4, 1, 16\] is not valid: expected \[min, opt, max\]"),
    ("{ sequence = [1, 2] }", r"tensorrt.shapes.sequence"),
    ("{ beams = [1, 2, 3] }", r"unknown key tensorrt.shapes.beams: allowed keys are batch, sequence, past"),
])
def test_tensorrt_shapes_are_checked(tmp_path, shapes, message):
    text = BASE.replace('backends = ["onnx"]', 'backends = ["trt"]') + f"[tensorrt]\nshapes = {shapes}\n"
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, text))


def test_int4_block_size_must_be_a_power_of_two(tmp_path):
    text = BASE.replace('precision = "int8"', 'precision = "int4"') + "[quantization]\nblock_size = 48\n"
    with pytest.raises(ProfileError, match="quantization.block_size = 48 is not a power of two"):
        load_profile(write(tmp_path, text))


def test_precision_fallback_not_for_fp32(tmp_path):
    text = BASE.replace('precision = "int8"', 'precision = "fp32"') + "[precision_fallback]\nauto = true\n"
    with pytest.raises(ProfileError, match=r"\[precision_fallback\] does not apply to precision 'fp32'"):
        load_profile(write(tmp_path, text))


def test_the_example_in_docs_loads(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).parents[1] / "docs" / "profiles.md").read_text()
    example = doc.split("```toml\n")[1].split("```")[0]
    profile = load_profile(write(tmp_path, example, "example.toml"))
    assert profile.quantization.reduce_range and profile.generation["max_new_tokens"] == 32


def test_docs_explain_every_key():
    from pathlib import Path

    from deploylm.profiles import METHOD_KEYS, TOP_KEYS, Parity, QualityBudget
    from deploylm.decoding.options import option_names

    doc = (Path(__file__).parents[1] / "docs" / "profiles.md").read_text()
    keys = [*TOP_KEYS, *(k for m in METHOD_KEYS.values() for k in m), *Parity.__dataclass_fields__,
            *QualityBudget.__dataclass_fields__, "ops", "nodes", "auto", "workspace_gb", "shapes",
            *option_names()]
    assert [k for k in keys if f"`{k}`" not in doc and f"`[{k}]`" not in doc] == []


TRT_INT8 = BASE.replace('backends = ["onnx"]', 'backends = ["trt"]')


@pytest.mark.parametrize("extra,message", [
    ('[quantization]\ncalibration_method = "percentile"',
     r"quantization.calibration_method does not apply to TensorRT engines \(TensorRT calibrates them itself\): "
     r"expected only method, calibration_samples"),
    ('[quantization]\nweight_type = "qint8"', r"quantization.weight_type does not apply to TensorRT engines"),
    ('[quantization]\nmethod = "dynamic"', r"quantization.method = 'dynamic' does not apply to TensorRT engines: "
                                           r"expected 'static'"),
])
def test_trt_int8_takes_only_the_keys_tensorrt_uses(tmp_path, extra, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, TRT_INT8 + extra + "\n"))


@pytest.mark.parametrize("backends", ['["trt"]', '["torch"]', '["onnx", "trt"]', '["onnx", "torch"]'])
def test_int4_runs_on_onnx_only(tmp_path, backends):
    """No other backend runs int4: a torch-only int4 export wrote fp32 graphs and said "torch applies int4
    itself"; a trt one failed only when TensorRT refused the precision after the graphs were exported."""
    text = BASE.replace('precision = "int8"', 'precision = "int4"').replace('backends = ["onnx"]', f"backends = {backends}")
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=r"backends = \[.*\] is not allowed with precision 'int4': expected \['onnx'\]") as err:
        load_profile(path)
    assert str(err.value).startswith(str(path))
    stored = {**load_profile("int4").to_dict(), "backends": json.loads(backends)}   # a manifest exported before
    assert Profile.from_dict(stored).backends == tuple(json.loads(backends))         # the rule still loads


def test_trt_int8_is_static_calibration_and_not_shared_with_onnx(tmp_path):
    plain = load_profile(write(tmp_path, TRT_INT8)).quantization
    assert plain.method == "static" and plain.calibration_samples == 64 and plain.weight_type is None
    builtin = load_profile("trt-int8").quantization
    assert (builtin.method, builtin.calibration_samples, builtin.calibration_method) == ("static", 128, None)
    both = BASE.replace('backends = ["onnx"]', 'backends = ["onnx", "trt"]')
    with pytest.raises(ProfileError, match=r"precision 'int8' with backends \['onnx', 'trt'\]: ONNX Runtime's int8 "
                                           r"graphs use asymmetric uint8 activations"):
        load_profile(write(tmp_path, both, "both.toml"))


def test_an_older_trt_int8_manifest_profile_still_loads():
    stored = load_profile("trt-int8").to_dict()
    stored["quantization"].update(weight_type="qint8", per_channel=True, reduce_range=False,
                                  calibration_method="percentile")     # as earlier versions wrote it
    assert Profile.from_dict(stored).quantization == load_profile("trt-int8").quantization


TRT_FP16_FILE = (builtin_dir() / "trt-fp16.toml").read_text()


def test_a_quality_budget_needs_onnx_graphs_to_measure_it(tmp_path):
    """[quality] is measured on ONNX Runtime graphs at export: in a TensorRT-only profile it was a budget
    that nothing ever checked (the built-in trt profiles had one). A file saying so is refused; a stored
    manifest profile with one still loads."""
    text = load_profile("trt-fp16")
    trt_only = (TRT_FP16_FILE + "\n[quality]\nmax_perplexity_increase = 0.01\n")
    path = write(tmp_path, trt_only, "trt-q.toml")
    with pytest.raises(ProfileError, match=r"\[quality\] applies to ONNX Runtime graphs .* backends = \['trt'\] has no "
                                           r"onnx: expected no \[quality\] table"):
        load_profile(path)
    assert load_profile(write(tmp_path, TRT_FP16_FILE, "trt.toml")).quality.max_perplexity_increase is None
    stored = {**text.to_dict(), "quality": {"max_perplexity_increase": 0.01}}       # an artifact exported before
    assert Profile.from_dict(stored).quality.max_perplexity_increase == 0.01


@pytest.mark.parametrize("old, new, message", [
    ("logits_atol = 1.0", "logits_atol = 0.0", r"parity.logits_atol = 0.0 is out of range: expected a number > 0.0"),
    ("logprob_atol = 1.0", "logprob_atol = 0", r"parity.logprob_atol = 0 is out of range: expected a number > 0.0"),
    ("logits_atol = 1.0", "logits_atol = true", r"parity.logits_atol = True is not a number"),
    ("min_token_agreement = 0.9", "min_token_agreement = 0.9\nidentical_beams = 1",
     r"parity.identical_beams = 1 is not a boolean: expected true or false"),
    ("min_token_agreement = 0.9", "min_token_agreement = 0.9\nfirst_divergence_min_step = -1",
     r"parity.first_divergence_min_step = -1 is out of range: expected an integer >= 0"),
    ("min_token_agreement = 0.9", "min_token_agreement = 0.9\nfirst_divergence_min_step = true",
     r"parity.first_divergence_min_step = True is not an integer"),
    ("min_token_agreement = 0.9", "min_token_agreement = 0.9\nfirst_divergence_min_step = 2.0",
     r"parity.first_divergence_min_step = 2.0 is not an integer"),
    ('backends = ["onnx"]', "backends = []", r"backends is empty: expected a list of torch, onnx, trt"),
    ('description = "a test profile"', 'description = "one\\rtwo"', r"description = 'one\\rtwo' is not valid"),
])
def test_boundaries_and_types_are_refused(tmp_path, old, new, message):
    """Open lower bounds (a tolerance of 0 would fail every fp32 backend on rounding), booleans are no
    numbers and numbers no booleans, and an empty backends list means nothing to run."""
    path = write(tmp_path, BASE.replace(old, new))
    with pytest.raises(ProfileError, match=message) as err:
        load_profile(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_boundary_values_that_are_allowed(tmp_path):
    text = BASE.replace("min_token_agreement = 0.9", "min_token_agreement = 1\nfirst_divergence_min_step = 0")
    parity = load_profile(write(tmp_path, text)).parity
    assert parity.min_token_agreement == 1.0 and parity.first_divergence_min_step == 0
    text = BASE.replace("min_token_agreement = 0.9", "min_token_agreement = 0")
    assert load_profile(write(tmp_path, text)).parity.min_token_agreement == 0.0


@pytest.mark.parametrize("table, message", [
    ("shapes = { batch = [0, 4, 16] }", r"tensorrt.shapes.batch = \[0, 4, 16\] is not valid: expected \[min, opt, max\] "
                                        r"integers with 1 <= min"),
    ("shapes = { sequence = [1.0, 64, 512] }", r"tensorrt.shapes.sequence = \[1.0, 64, 512\] is not valid"),
    ("shapes = { past = [true, 64, 512] }", r"tensorrt.shapes.past = \[True, 64, 512\] is not valid"),
    ("workspace_gb = 0", r"tensorrt.workspace_gb = 0 is out of range: expected a number > 0.0 and <= 1024.0"),
])
def test_tensorrt_values_are_checked(tmp_path, table, message):
    text = BASE.replace('backends = ["onnx"]', 'backends = ["trt"]').replace('precision = "int8"', 'precision = "fp16"')
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, text + f"[tensorrt]\n{table}\n"))


def test_tensorrt_past_may_start_at_zero_and_defaults_fill_the_rest(tmp_path):
    text = BASE.replace('backends = ["onnx"]', 'backends = ["trt"]').replace('precision = "int8"', 'precision = "fp16"')
    trt = load_profile(write(tmp_path, text + "[tensorrt]\nshapes = { past = [0, 8, 32] }\n")).tensorrt
    assert trt.shapes == {"batch": (1, 4, 16), "sequence": (1, 64, 512), "past": (0, 8, 32)} and trt.workspace_gb == 4.0


FP32_MINE = BASE.replace('precision = "int8"', 'precision = "fp32"')


@pytest.mark.parametrize("layout", ["auto", "shared-prompt", "append", "concat"])
def test_kv_layout_is_read_stored_and_read_back(tmp_path, layout):
    profile = load_profile(write(tmp_path, FP32_MINE.replace('backends = ["onnx"]', f'backends = ["onnx"]\nkv_layout = "{layout}"')))
    assert profile.kv_layout == layout
    assert Profile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile


def test_kv_layout_defaults_to_auto_also_in_older_manifests():
    assert {p.kv_layout for p in builtin_profiles()} == {"auto"}
    older = load_profile("fp32").to_dict()
    del older["kv_layout"]                                   # manifests written before the key existed
    assert Profile.from_dict(older).kv_layout == "auto"


@pytest.mark.parametrize("text, message", [
    (FP32_MINE.replace('backends = ["onnx"]', 'backends = ["onnx"]\nkv_layout = "paged"'),
     r"mine.toml: kv_layout = 'paged' is not allowed: expected one of auto, shared-prompt, append, concat"),
    (TRT_INT8.replace('backends = ["trt"]', 'backends = ["trt"]\nkv_layout = "append"'),
     r"mine.toml: kv_layout does not apply: TensorRT engines and static int8 need the concat layout: "
     r"expected \"auto\" or \"concat\""),
    (BASE.replace('backends = ["onnx"]', 'backends = ["onnx"]\nkv_layout = "shared-prompt"\n[quantization]\nmethod = "static"'),
     r"kv_layout does not apply: TensorRT engines and static int8 need the concat layout"),
])
def test_kv_layouts_a_profile_cannot_have_are_refused(tmp_path, text, message):
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, text))


def test_the_auto_search_needs_onnx_among_the_backends(tmp_path):
    """A trt-only profile with [precision_fallback] auto = true loaded, and the search never ran (it works on
    ONNX Runtime's quantized graphs): refused when the file loads, naming the key."""
    text = ('name = "trt-auto"\nprecision = "fp16"\nbackends = ["trt"]\n[precision_fallback]\nauto = true\n'
            '[parity]\nlogits_atol = 2.0\nlogprob_atol = 4.0\nmin_token_agreement = 0.5\n')
    with pytest.raises(ProfileError, match=r"precision_fallback.auto does not apply: .* backends = \['trt'\] has no "
                                           r"onnx: expected auto = false, or 'onnx' among the backends"):
        load_profile(write(tmp_path, text))
    load_profile(write(tmp_path, text.replace('["trt"]', '["onnx", "trt"]')))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('backends = ["onnx"]', 'backends = ["onnx", "onnx"]'),
     r"backends = \['onnx', 'onnx'\] names a backend twice"),
    (lambda t: t.replace('precision = "int8"', 'precision = "int4"')
     + '[quantization]\nmethod = "weight-only"\nalgorithm = "hqq"\nsymmetric = true\n',
     r"quantization.symmetric = true does not apply to algorithm = 'hqq'"),
    (lambda t: t.replace('precision = "int8"', 'precision = "int4"')
     + '[quantization]\nmethod = "weight-only"\nalgorithm = "q4_1"\nsymmetric = true\n',
     r"quantization.symmetric = true does not apply to algorithm = 'q4_1'"),
])
def test_values_that_would_be_ignored_are_refused(tmp_path, edit, message):
    """A key that does not apply is an error (docs/profiles.md): symmetric is rtn's alone (hqq and q4_1 ignored
    it and stored it in the manifest), and a backend named twice was stored as it was."""
    with pytest.raises(ProfileError, match=message):
        load_profile(write(tmp_path, edit(BASE)))
    load_profile(write(tmp_path, edit(BASE).replace('"onnx", "onnx"', '"onnx"').replace("symmetric = true", "")))


def test_the_next_token_budgets_load_and_survive_the_manifest(tmp_path):
    """[quality] max_mean_kl and min_top1_agreement (teacher-forced, steadier than beam agreement) are read, kept in
    the resolved profile a manifest stores, and read back; the built-in profiles set neither."""
    from deploylm.profiles import Profile

    path = write(tmp_path, BASE + "[quality]\nmax_mean_kl = 0.02\nmin_top1_agreement = 0.9\n")
    profile = load_profile(path)
    assert (profile.quality.max_mean_kl, profile.quality.min_top1_agreement) == (0.02, 0.9)
    assert Profile.from_dict(profile.to_dict()).quality == profile.quality
    assert all(p.quality.max_mean_kl is None and p.quality.min_top1_agreement is None for p in builtin_profiles())
