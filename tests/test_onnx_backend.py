"""The ONNX Runtime backend against the torch backend: per-step logits, cache vs recompute, tokens.

Artifacts are made by the real pipeline (deploylm.export.pipeline.export_model, fp32 profile) from
the tiny random GPT-2 / Llama / T5 fixtures. Tolerances come from the fp32 profile only.
"""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from deploylm.backends.base import EncodedBatch
from deploylm.backends.onnx_backend import OnnxBackend, create_session
from deploylm.backends.ort_kv import APPEND_GROW
from deploylm.backends.torch_backend import TorchBackend
from deploylm.decoding.options import DecodingOptions
from deploylm.decoding.search import generate_ids
from deploylm.errors import MissingDependencyError, UsageError
from deploylm.export.pipeline import export_model
from deploylm.profiles import load_profile

PARITY = load_profile("fp32").parity
PROMPTS = ["the quick brown fox", "beam search keeps the best partial sentences"]
KINDS = ["gpt2", "llama", pytest.param("t5", marks=pytest.mark.slow)]


@pytest.fixture(scope="module")
def tiny_bart_dir(tmp_path_factory):
    """A tiny random BART (learned positions, unlike T5) with the T5 fixture's tokenizer."""
    from transformers import AutoModelForSeq2SeqLM, BartConfig, GenerationConfig

    from tests.helpers.tiny_hf import train_tokenizer

    tok = train_tokenizer("t5")
    config = BartConfig(vocab_size=len(tok), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                        decoder_start_token_id=tok.eos_token_id, forced_eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)  # peaked distributions, as the shared fixtures
    model.generation_config = GenerationConfig.from_model_config(config)
    dest = tmp_path_factory.mktemp("tiny-bart")
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def artifact(request, tmp_path_factory):
    """kind -> (source folder, artifact folder), exported once per module."""
    made: dict[str, tuple] = {}

    def get(kind: str):
        if kind not in made:
            src = request.getfixturevalue(f"tiny_{kind}_dir")
            out = tmp_path_factory.mktemp(f"art-{kind}") / "artifact"
            export_model(src, "fp32", out)
            made[kind] = (src, out)
        return made[kind]
    return get


def _backends(artifact, kind):
    src, out = artifact(kind)
    return TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(out))


@pytest.fixture(scope="module")
def llama_in(artifact, tmp_path_factory):
    """layout -> (torch backend, onnx backend) of the llama artifact: "shared-prompt" as exported, "append" with
    its graph re-exported in the append layout (past buffer, no prompt K/V), as artifacts exported before the
    shared-prompt layout hold it (opened without the manifest, whose checksum is the other graph's)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from deploylm.export import io_spec
    from deploylm.export.hf_graphs import HFCausalGraph
    from deploylm.export.onnx_export import export_graph, plan_graphs

    made: dict[str, tuple] = {}

    def get(layout: str):
        if layout not in made:
            src, out = artifact("llama")
            if layout == io_spec.KV_SHARED:
                made[layout] = _backends(artifact, "llama")
            else:
                folder = tmp_path_factory.mktemp("llama-append") / "artifact"
                shutil.copytree(out, folder)
                plan = plan_graphs(AutoModelForCausalLM.from_pretrained(src).eval())
                dims = dataclasses.replace(plan.dims, kv_layout=layout)
                ((_, module),) = plan.graphs
                export_graph(HFCausalGraph(module.model, layout), io_spec.decoder_only_spec(dims), folder, dims.vocab_size)
                made[layout] = TorchBackend.from_source(str(src)), OnnxBackend.from_folder(folder, name="append")
            assert made[layout][1].kv_layout == layout
        return made[layout]
    return get


LAYOUTS = ["shared-prompt", "append"]


def _batch(torch_backend, src) -> EncodedBatch:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(src)
    side = "right" if torch_backend.info.is_encoder_decoder else "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, padding_side=side)
    assert (enc["attention_mask"] == 0).any(), "prompts must need padding"
    return EncodedBatch(enc["input_ids"], enc["attention_mask"])


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    diff = float((a - b).abs().max())
    assert diff <= PARITY.logits_atol, f"max |Δ logit| {diff:.2e} > {PARITY.logits_atol}"
    return diff


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_torch_every_step(artifact, kind):
    ref, onnx = _backends(artifact, kind)
    batch = _batch(ref, artifact(kind)[0])
    (ref_logits, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    _close(ref_logits, got)
    gen = torch.Generator().manual_seed(0)
    for step, idx in enumerate([[0, 0, 1, 1], [1, 0, 3, 2], [0, 1, 2, 3], [1, 1, 2, 3]]):
        idx = torch.tensor(idx)
        ref_state, state = ref.reorder(ref_state, idx), onnx.reorder(state, idx)
        tokens = torch.randint(3, ref.info.vocab_size, (4,), generator=gen)
        (ref_logits, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        assert got.shape == (4, ref.info.vocab_size) and got.dtype == torch.float32
        _close(ref_logits, got)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cache_matches_full_recompute(artifact, kind):
    """Decoding with the KV cache gives the logits of re-running the whole sequence without one."""
    ref, onnx = _backends(artifact, kind)
    batch = _batch(ref, artifact(kind)[0])
    logits, state = onnx.prefill(batch)
    ids, mask = batch.input_ids, batch.attention_mask
    for token in (5, 17, 42):
        tokens = torch.full((2,), token)
        logits, state = onnx.decode(tokens, state)
        ids, mask = torch.cat([ids, tokens[:, None]], 1), torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        full, _ = onnx.prefill(EncodedBatch(ids, mask))
        _close(full, logits)


@pytest.mark.slow
def test_seq2seq_cache_matches_full_recompute(artifact):
    """T5: decoder steps with a past equal one decoder run over the whole target with an empty past."""
    _, out = artifact("t5")
    onnx = OnnxBackend.from_source(str(out))
    batch = _batch(TorchBackend.from_source(str(artifact("t5")[0])), artifact("t5")[0])
    logits, state = onnx.prefill(batch)
    targets = [onnx.info.special.decoder_start_token_id]
    for token in (5, 17, 42):
        logits, state = onnx.decode(torch.full((2,), token), state)
        targets.append(token)
    session = onnx.sessions["decoder_model.onnx"]
    feeds = {"input_ids": torch.tensor([targets] * 2).numpy(), "encoder_attention_mask": state.src_mask.numpy()}
    for arg in session.get_inputs()[2:]:
        source = state.cross if ".encoder." in arg.name else None
        layer, kv = int(arg.name.split(".")[1]), arg.name.endswith(".value")
        feeds[arg.name] = (source[2 * layer + kv].numpy() if source is not None
                           else torch.zeros(2, arg.shape[1], 0, arg.shape[3]).numpy())
    full = session.run(["logits"], feeds)[0][:, -1, :]
    _close(torch.from_numpy(full), logits)


@pytest.mark.parametrize("kind", [*KINDS, pytest.param("bart", marks=pytest.mark.slow)])
def test_greedy_and_beam_tokens_identical(artifact, kind):
    ref, onnx = _backends(artifact, kind)
    batch = _batch(ref, artifact(kind)[0])
    for options in (DecodingOptions(num_beams=1, max_new_tokens=12), DecodingOptions(num_beams=4, max_new_tokens=12)):
        want = [[h.token_ids for h in hyps] for hyps in generate_ids(ref, batch, options)]
        got = [[h.token_ids for h in hyps] for hyps in generate_ids(onnx, batch, options)]
        assert got == want


@pytest.mark.slow
def test_encoder_runs_once_per_input_and_cross_kv_not_regathered(artifact):
    _, out = artifact("t5")
    onnx = OnnxBackend.from_source(str(out))
    batch = _batch(TorchBackend.from_source(str(artifact("t5")[0])), artifact("t5")[0])
    _, state = onnx.prefill(batch)
    state = onnx.reorder(state, torch.tensor([0, 0, 0, 1, 1, 1]))
    cross = state.cross[0]
    _, state = onnx.decode(torch.tensor([5] * 6), state)
    state = onnx.reorder(state, torch.tensor([2, 0, 0, 4, 3, 3]))  # beams move within their input
    assert state.cross[0] is cross
    assert onnx.encoder_calls == 2


def test_same_info_as_torch_backend(artifact):
    for kind in ("gpt2", "llama"):
        ref, onnx = _backends(artifact, kind)
        assert dataclasses.replace(onnx.info, name=ref.info.name) == ref.info  # name: the folder's
        assert onnx.name == "onnx" and onnx.device == torch.device("cpu")


def test_shared_backend_across_threads(artifact):
    ref, onnx = _backends(artifact, "gpt2")
    batch = _batch(ref, artifact("gpt2")[0])
    options = DecodingOptions(num_beams=4, max_new_tokens=8)
    want = [[h.token_ids for h in hyps] for hyps in generate_ids(onnx, batch, options)]
    results: list = [None] * 3

    def work(i: int) -> None:
        results[i] = [[h.token_ids for h in hyps] for hyps in generate_ids(onnx, batch, options)]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 3


def test_refuses_a_source_that_is_not_an_artifact(tiny_gpt2_dir):
    with pytest.raises(UsageError, match="not an exported artifact"):
        OnnxBackend.from_source(str(tiny_gpt2_dir))


def test_cuda_refused_when_onnxruntime_cannot_use_it(artifact):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("onnxruntime here has CUDA: the refusal path cannot be reached")
    with pytest.raises(MissingDependencyError, match="deploylm\\[gpu\\]"):
        OnnxBackend.from_source(str(artifact("gpt2")[1]), device="cuda")


def test_session_settings(artifact):
    graph = artifact("gpt2")[1] / "model.onnx"
    session = create_session(graph, threads=1, opt_level="extended")
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    assert session.get_session_options().inter_op_num_threads == 1
    with pytest.raises(UsageError, match="opt_level"):
        create_session(graph, opt_level="max")


def test_spin_is_bounded_and_changes_no_value(artifact):
    """spin=True: ORT's threads spin SPIN_US between kernels and stop when a run returns; tokens and
    scores are the same bits as with sleeping threads, through the library and the CLI."""
    from click.testing import CliRunner

    import deploylm
    from deploylm.backends.onnx_backend import SPIN_US
    from deploylm.bench import BenchConfig
    from deploylm.benchmarking.measure import open_local_runner
    from deploylm.benchmarking.workload import plan_rows, workload_of
    from deploylm.cli import cli

    src, out = artifact("llama")
    entries = ("session.intra_op.allow_spinning", "session.intra_op.spin_duration_us", "session.force_spinning_stop")
    sleeping = create_session(out / "model.onnx", threads=2).get_session_options()
    assert sleeping.get_session_config_entry(entries[0]) == "0"
    spinning = create_session(out / "model.onnx", threads=2, spin=True).get_session_options()
    assert [spinning.get_session_config_entry(e) for e in entries] == ["1", str(SPIN_US), "1"]

    plain, spun = deploylm.load(out, threads=2), deploylm.load(out, threads=2, spin=True)
    assert spun.backend.sessions["model.onnx"].get_session_options().get_session_config_entry(entries[0]) == "1"
    for beams in (1, 3):
        a = plain.generate(PROMPTS, num_beams=beams, max_new_tokens=6, min_new_tokens=6)
        b = spun.generate(PROMPTS, num_beams=beams, max_new_tokens=6, min_new_tokens=6)
        assert [(s.token_ids, s.score) for r in a for s in r.sequences] == \
               [(s.token_ids, s.score) for r in b for s in r.sequences]
    with pytest.raises(UsageError, match="spin=True applies to the onnx backend"):
        deploylm.load(src, backend="torch", spin=True)

    config = BenchConfig(models=(str(out),), backends=("onnx",), spin="both", reference=False)
    for spec in plan_rows(config):                   # what a `deploylm bench --spin both` row opens
        runner = open_local_runner(spec, workload_of(config))
        options = runner.generator.backend.sessions["model.onnx"].get_session_options()
        assert options.get_session_config_entry(entries[0]) == ("1" if spec.spin else "0")

    runner = CliRunner()
    args = ["generate", "--model", str(out), "--max-new-tokens", "5", *PROMPTS]
    assert runner.invoke(cli, args + ["--spin"]).stdout == runner.invoke(cli, args).stdout != ""
    refused = runner.invoke(cli, ["generate", "--model", str(src), "--spin", "hi"])
    assert refused.exit_code == 2 and "--spin applies to the onnx backend" in refused.stderr


def test_model_generation_settings_reach_the_onnx_backend(tmp_path):
    """A model's own decoding settings (forced BOS/EOS, bad words, suppressed tokens) are applied on ONNX
    exactly as on torch: same ModelInfo.generation, same beams."""
    import json

    from tests.helpers.tiny_hf import build_tiny_hf

    src = build_tiny_hf("bart", tmp_path / "bart")
    gen_file = src / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen.update(forced_bos_token_id=5, forced_eos_token_id=1, bad_words_ids=[[7], [9, 10]], suppress_tokens=[11])
    gen_file.write_text(json.dumps(gen))
    out = tmp_path / "artifact"
    export_model(src, "fp32", out)
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(out))
    assert onnx.info.generation == ref.info.generation
    assert onnx.info.generation["forced_bos_token_id"] == 5 and onnx.info.max_positions == ref.info.max_positions
    batch = _batch(ref, src)
    options = DecodingOptions(num_beams=4, max_new_tokens=6)
    got, want = generate_ids(onnx, batch, options), generate_ids(ref, batch, options)
    assert [[h.token_ids for h in hyps] for hyps in got] == [[h.token_ids for h in hyps] for hyps in want]
    assert all(hyps[0].token_ids[0] == 5 for hyps in got)  # the forced BOS really applied


def test_hf_causal_artifacts_use_one_kv_buffer_written_in_place(llama_in):
    """Append layout: the graph outputs only the new K/V; the backend keeps one buffer for a
    generation (steps and in-place reorders reuse it until it has to grow)."""
    from deploylm.backends.ort_kv import KVAppend

    ref, onnx = llama_in("append")
    _, state = onnx.prefill(_batch(ref, onnx.path))
    state = onnx.reorder(state, torch.tensor([0, 0, 1, 1]))
    assert isinstance(state.cache, KVAppend)
    pointers = set()
    for step in range(6):
        _, state = onnx.decode(torch.tensor([5, 6, 7, 8]), state)
        state = onnx.reorder(state, torch.tensor([1, 0, 3, 2]))
        pointers.add(tuple(g.data_ptr() for g in state.cache.groups))
        assert state.cache.length == state.attention_mask.shape[1] <= state.cache.capacity
    assert len(pointers) == 1


def test_shared_prompt_artifacts_hold_each_prompt_once_through_a_beam_search(llama_in):
    """Shared-prompt layout (what export writes for Hugging Face causal LMs): the prefill's K/V become the
    prompts' K/V, held once per prompt; turning prompt rows into beams and every beam reorder within a
    prompt leave them where they are (no copy per beam), while the generated positions live in one buffer
    written in place."""
    from deploylm.backends.ort_kv import KVShared

    ref, onnx = llama_in("shared-prompt")
    batch = _batch(ref, onnx.path)
    _, state = onnx.prefill(batch)
    assert isinstance(state.cache, KVShared)
    prompt = [t.data_ptr() for t in state.cache.prompt]
    assert state.cache.prompt[0].shape[:3] == (2, onnx._self_kv[1], batch.input_ids.shape[1])
    state = onnx.reorder(state, torch.tensor([0, 0, 0, 1, 1, 1]))
    generated = set()
    for step, idx in enumerate([[1, 0, 2, 5, 3, 4], [0, 0, 0, 3, 3, 4], [2, 2, 1, 5, 5, 5]] * 2):
        _, state = onnx.decode(torch.tensor([5, 6, 7, 8, 9, 10]) + step, state)
        state = onnx.reorder(state, torch.tensor(idx))
        generated.add(tuple(g.data_ptr() for g in state.cache.generated.groups))
        assert [t.data_ptr() for t in state.cache.prompt] == prompt
        assert state.cache.prompt_length + state.cache.generated.length == state.attention_mask.shape[1]
    assert len(generated) == 1 and state.cache.prompt_gathers == [0]
    options = DecodingOptions(num_beams=4, num_return_sequences=2, max_new_tokens=8)
    gathers = []
    original = KVShared.reorder
    def counted(cache, idx):
        out = original(cache, idx)
        gathers.append(out.prompt_gathers[0])
        return out
    KVShared.reorder = counted
    try:
        got = generate_ids(onnx, batch, options)
    finally:
        KVShared.reorder = original
    assert gathers and set(gathers) == {0}              # beam search never copied a prompt
    assert [[h.token_ids for h in x] for x in got] == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)]


def test_shared_prompt_greedy_folds_the_prompt_into_the_rows_buffer(llama_in):
    """One row per prompt: the first decode step moves the prompts' K/V into the rows' own buffer (the
    graph's prompt products would only cost), and the logits stay torch's."""
    ref, onnx = llama_in("shared-prompt")
    batch = _batch(ref, onnx.path)
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    assert state.cache.prompt_length == batch.input_ids.shape[1]
    for step in range(3):
        tokens = torch.tensor([5, 9]) + step
        (want, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        _close(want, got)
        assert state.cache.prompt_length == 0 and state.cache.generated.length == batch.input_ids.shape[1] + step + 1


def test_shared_prompt_reorders_across_prompts_give_torch_logits(llama_in):
    """A caller may reorder rows across prompts (the Backend protocol allows any rows): the prompts' K/V
    are then gathered into the blocks the rows need (in another prompt order, or one prompt per row, or
    fewer rows), and the logits stay those of torch step after step."""
    ref, onnx = llama_in("shared-prompt")
    batch = _batch(ref, onnx.path)
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    _close(want, got)
    gathers = []
    for step, idx in enumerate([[0, 0, 1, 1], [2, 3, 0, 1], [0, 2, 2, 2], [3, 3, 3, 3], [1, 0, 2, 3], [0, 3]]):
        idx = torch.tensor(idx)
        ref_state, state = ref.reorder(ref_state, idx), onnx.reorder(state, idx)
        gathers.append(state.cache.prompt_gathers[0])
        tokens = torch.arange(len(idx)) + 5 + step
        (want, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        _close(want, got)
    # expanding into beams and permuting rows copy nothing (rows are slots: a permutation moves no K/V, so
    # every physical row keeps its prompt); a block of mixed prompts, rows all from one prompt, and fewer
    # rows each gather the prompt rows once
    assert gathers == [0, 0, 1, 2, 2, 3]


class _CountingBinding:
    """An IO binding that records the names bound on it (the run itself reaches the real one)."""

    def __init__(self, binding, names: list[str]) -> None:
        self.binding, self.names = binding, names

    def bind_input(self, name, *args):
        self.names.append(name)
        self.binding.bind_input(name, *args)

    def bind_output(self, name, *args):
        self.names.append(name)
        self.binding.bind_output(name, *args)

    def __getattr__(self, attr):
        return getattr(self.binding, attr)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_decode_step_binds_again_only_what_moved(llama_in, layout, monkeypatch):
    """The IO binding is kept per thread and graph: a decode step that does not grow the K/V binds only
    the ids, mask, positions and logits again; a growth binds every past again (new shape), and the
    prompts' K/V are bound once, when the prompt rows become beams; the logits are those of a fresh
    binding of every name per run."""
    from deploylm.export import io_spec

    ref, onnx = llama_in(layout)
    batch = _batch(ref, onnx.path)
    kept = OnnxBackend._binding

    def run(policy, names_per_step: list[list[str]]) -> list[torch.Tensor]:
        names: list[str] = []
        monkeypatch.setattr(OnnxBackend, "_binding",
                            lambda self, file: (lambda b, bound: (_CountingBinding(b, names), bound))(*policy(self, file)))
        logits, state = onnx.prefill(batch)
        out = [logits]
        for step in range(APPEND_GROW + 4):
            names.clear()
            state = onnx.reorder(state, torch.tensor([0, 0, 1, 1] if step == 0 else [1, 0, 3, 2] if step % 2 else [0, 0, 2, 2]))
            logits, state = onnx.decode(torch.tensor([5 + step, 9, 4, 11]), state)
            names_per_step.append(list(names))
            out.append(logits)
        return out

    kept_names: list[list[str]] = []
    kept_logits = run(kept, kept_names)
    fresh_logits = run(lambda self, file: (self.sessions[file].io_binding(), {}), [])
    assert all(torch.equal(a, b) for a, b in zip(kept_logits, fresh_logits))
    pasts, prompts = set(io_spec.past_names(onnx.n_layers)), set(io_spec.prompt_names(onnx.n_layers))
    per_step = ({"input_ids", "attention_mask", "position_ids", "logits"}, pasts | set(io_spec.new_kv_names(onnx.n_layers)))
    growths = [i for i, names in enumerate(kept_names) if pasts <= set(names)]
    if layout == io_spec.KV_APPEND:
        # step 0: the prompt rows became beams (new buffers); the buffer (prompt + APPEND_GROW positions) is
        # full after APPEND_GROW steps, so the step after that runs on the grown one
        assert growths == [0, APPEND_GROW + 1]
    else:
        # step 0: beams, on an empty buffer of generated positions, which it grows to 1 + APPEND_GROW
        # positions for step 1; that is full after step APPEND_GROW, so step APPEND_GROW + 2 runs on a grown one
        assert growths == [0, 1, APPEND_GROW + 2]
        assert prompts <= set(kept_names[0]) and not any(prompts & set(names) for names in kept_names[1:])
    for i, names in enumerate(kept_names):
        allowed = per_step[0] | per_step[1] | (prompts if i == 0 else set()) if i in growths else per_step[0]
        assert set(names) <= allowed, (i, names)


def test_concat_layout_graph_still_runs(artifact, tmp_path):
    """A graph of the old (optimum) layout, present = past + new, as artifacts exported before the
    append layout have: the backend detects it from the output names and runs it with its two buffers."""
    import shutil

    from deploylm.backends.ort_kv import KVCache
    from deploylm.export import io_spec
    from deploylm.export.hf_graphs import with_concat_layout
    from deploylm.export.onnx_export import export_graph, plan_graphs
    from transformers import AutoModelForCausalLM

    src, _ = artifact("llama")
    folder = tmp_path / "old"
    shutil.copytree(src, folder)
    plan = with_concat_layout(plan_graphs(AutoModelForCausalLM.from_pretrained(src).eval()))
    ((spec, module),) = plan.graphs
    export_graph(module, spec, folder, plan.dims.vocab_size)
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_folder(folder, name="old")
    assert onnx.kv_layout == io_spec.KV_CONCAT
    batch = _batch(ref, src)
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    assert isinstance(state.cache, KVCache)
    _close(want, got)
    for idx in ([0, 0, 1, 1], [1, 0, 3, 2]):
        idx = torch.tensor(idx)
        ref_state, state = ref.reorder(ref_state, idx), onnx.reorder(state, idx)
        (want, ref_state), (got, state) = ref.decode(torch.tensor([5, 6, 7, 8]), ref_state), onnx.decode(torch.tensor([5, 6, 7, 8]), state)
        _close(want, got)
    options = DecodingOptions(num_beams=4, max_new_tokens=10)
    assert ([[h.token_ids for h in x] for x in generate_ids(onnx, batch, options)]
            == [[h.token_ids for h in x] for x in generate_ids(ref, batch, options)])
    # prompts of very different lengths: the concat layout's KVCache cannot be put together from
    # grouped prefills (KVAppend.from_parts), so it prefills them in one padded run, as torch does
    ragged = _ragged_batch(ref.info.vocab_size)
    (want, _), (got, state) = ref.prefill(ragged), onnx.prefill(ragged)
    assert isinstance(state.cache, KVCache)
    _close(want, got)


def _ragged_batch(vocab: int) -> EncodedBatch:
    """Left-padded prompts of 3-5 and 38-41 tokens: prefill_groups runs them as two prefills."""
    lengths = [40, 3, 41, 4, 3, 40, 5, 38]
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = (torch.arange(max(lengths))[None, :] >= max(lengths) - torch.tensor(lengths)[:, None]).long()
    return EncodedBatch(ids * mask, mask)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_prompts_of_very_different_lengths_prefill_in_groups_with_the_same_results(llama_in, layout, monkeypatch):
    """Grouped prefill (short prompts not padded to the longest) gives the logits of one padded prefill
    and of torch, step after step, and the same greedy and beam tokens."""
    import deploylm.backends.onnx_backend as onnx_backend

    ref, onnx = llama_in(layout)
    prefill_run = "_append_step" if layout == "append" else "_shared_prefill_run"
    batch = _ragged_batch(ref.info.vocab_size)
    runs = []
    grouped = onnx_backend.prefill_groups

    def recorded(lengths):
        runs.append(grouped(lengths))
        return runs[-1]

    def one(lengths):
        return [list(range(len(lengths)))]

    monkeypatch.setattr(onnx_backend, "prefill_groups", recorded)
    widths, step = [], getattr(OnnxBackend, prefill_run)
    monkeypatch.setattr(OnnxBackend, prefill_run, lambda self, ids, *a: (widths.append(ids.shape), step(self, ids, *a))[1])
    (ref_logits, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    assert runs == [[[1, 4, 3, 6], [7, 0, 5, 2]]]
    assert widths == [(4, 5), (4, 41)]                         # each run cut to its own longest prompt
    monkeypatch.setattr(OnnxBackend, prefill_run, step)
    monkeypatch.setattr(onnx_backend, "prefill_groups", one)   # the same backend, one padded prefill: a second generation
    single, single_state = onnx.prefill(batch)
    assert float((got - single).abs().max()) <= 1e-5
    _close(ref_logits, got)
    length = (lambda cache: cache.length) if layout == "append" else (lambda cache: cache.prompt_length)
    assert length(state.cache) == length(single_state.cache) == batch.input_ids.shape[1]
    for idx, token in (([0, 1, 2, 3, 4, 5, 6, 7], 9), ([1, 1, 0, 3, 5, 5, 6, 2], 17), ([7, 6, 5, 4, 3, 2, 1, 0], 4)):
        idx, tokens = torch.tensor(idx), torch.full((8,), token)
        ref_state, state, single_state = ref.reorder(ref_state, idx), onnx.reorder(state, idx), onnx.reorder(single_state, idx)
        (ref_logits, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        single, single_state = onnx.decode(tokens, single_state)
        assert float((got - single).abs().max()) <= 1e-5
        _close(ref_logits, got)
    monkeypatch.setattr(onnx_backend, "prefill_groups", grouped)
    for beams in (1, 4):
        options = DecodingOptions(num_beams=beams, max_new_tokens=6, min_new_tokens=6)
        expected = [[h.token_ids for h in hyps] for hyps in generate_ids(ref, batch, options)]
        assert [[h.token_ids for h in hyps] for hyps in generate_ids(onnx, batch, options)] == expected


def test_seq2seq_reorder_moves_only_the_rows_that_change(artifact):
    """DESIGN §4: a reorder moving at most half the rows gathers those rows into the self-attention K/V in
    place (the same tensors, the other rows untouched), with the values of a full gather; the state it was
    given is superseded and refused afterwards. More changed rows, or another row count, gather anew."""
    _, out = artifact("t5")
    onnx = OnnxBackend.from_source(str(out))
    batch = _batch(TorchBackend.from_source(str(artifact("t5")[0])), artifact("t5")[0])
    _, state = onnx.prefill(batch)
    state = onnx.reorder(state, torch.tensor([0, 0, 0, 1, 1, 1]))               # B -> B x 3: a new gather
    _, state = onnx.decode(torch.tensor([5, 6, 7, 8, 9, 10]), state)
    _, state = onnx.decode(torch.tensor([11] * 6), state)
    before = [t.clone() for t in state.self_past]
    pointers = [t.data_ptr() for t in state.self_past]
    idx = torch.tensor([0, 0, 2, 3, 4, 4])                                          # rows 1 and 5 change
    moved = onnx.reorder(state, idx)
    assert [t.data_ptr() for t in moved.self_past] == pointers                        # in place, no new cache
    for got, old in zip(moved.self_past, before):
        assert torch.equal(got, old.index_select(0, idx))
    with pytest.raises(RuntimeError, match="superseded"):
        onnx.decode(torch.tensor([5] * 6), state)
    logits, moved = onnx.decode(torch.tensor([5] * 6), moved)                        # the new state runs on
    many = onnx.reorder(moved, torch.tensor([1, 0, 3, 2, 5, 4]))                      # every row changes
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(many.self_past, moved.self_past))
    onnx.decode(torch.tensor([5] * 6), moved)                                         # a gather leaves it valid


def test_seq2seq_reorder_across_inputs_regathers_cross_kv_as_torch(artifact):
    """reorder is a gather on the batch axis: rows that take the place of another input's rows read their
    own input's cross K/V (T5 graphs take them per row), again after a second such reorder; the logits stay
    those of torch. Exactly half of the rows changing is still done in place (DESIGN §4: at most half)."""
    src, out = artifact("t5")
    ref, onnx = TorchBackend.from_source(str(src)), OnnxBackend.from_source(str(out))
    batch = _batch(ref, src)
    (want, ref_state), (got, state) = ref.prefill(batch), onnx.prefill(batch)
    _close(want, got)
    assert onnx.encoder_calls == 2                                          # one encoder row per input
    for step, idx in enumerate([[0, 0, 0, 1, 1, 1], [0, 0, 2, 2, 4, 4], [3, 4, 5, 0, 1, 2], [1, 0, 2, 4, 3, 5],
                                [5, 5, 5, 0, 0, 0]]):
        idx = torch.tensor(idx)
        pointers, old = [t.data_ptr() for t in state.self_past], state
        ref_state, state = ref.reorder(ref_state, idx), onnx.reorder(state, idx)
        if step == 1:                                                       # rows 1, 3, 5 of 6 change
            assert [t.data_ptr() for t in state.self_past] == pointers
            with pytest.raises(RuntimeError, match="superseded"):
                onnx.reorder(old, idx)                                      # its rows were rewritten in place
        tokens = torch.tensor([5, 6, 7, 8, 9, 10]) + step
        (want, ref_state), (got, state) = ref.decode(tokens, ref_state), onnx.decode(tokens, state)
        _close(want, got)


def test_beams_wider_than_the_prompt_grow_the_new_positions_scratch(artifact):
    """The scratch ORT writes a step's new K/V into is sized by the prefill (rows x prompt positions); a
    one-token prompt searched with 4 beams needs 4 rows x 1 position at the first decode step, so the
    scratch must grow then: the tokens are torch's (every other test's prompt is longer than its beams)."""
    ref, onnx = _backends(artifact, "llama")
    batch = EncodedBatch(torch.tensor([[7]]), torch.ones(1, 1, dtype=torch.long))
    for beams in (4, 6):
        options = DecodingOptions(num_beams=beams, num_return_sequences=beams, max_new_tokens=5)
        want = [[h.token_ids for h in hyps] for hyps in generate_ids(ref, batch, options)]
        assert [[h.token_ids for h in hyps] for hyps in generate_ids(onnx, batch, options)] == want


def test_two_threads_binding_before_either_runs_get_their_own_logits(artifact):
    """Each thread keeps its own IO binding: two threads that both bind their inputs before either runs
    (forced here, a race otherwise) each get the logits of their own prompts, as alone."""
    _, onnx = _backends(artifact, "llama")
    batches = [EncodedBatch(torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)),
               EncodedBatch(torch.tensor([[9, 10, 11, 12, 13], [14, 15, 16, 17, 18]]), torch.ones(2, 5, dtype=torch.long))]
    alone = [onnx.prefill(b)[0] for b in batches]
    session, both_bound = onnx.sessions["model.onnx"], threading.Barrier(2, timeout=20)

    class BothBindFirst:
        def __getattr__(self, attr):
            return getattr(session, attr)

        def run_with_iobinding(self, binding, *args):
            both_bound.wait()                    # the other thread has bound its inputs too
            return session.run_with_iobinding(binding, *args)

    onnx.sessions["model.onnx"] = BothBindFirst()
    got: list = [None, None]

    def work(i: int) -> None:
        got[i] = onnx.prefill(batches[i])[0]
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:                                     # the backend may be shared with the module's other tests
        onnx.sessions["model.onnx"] = session
    assert all(g is not None and torch.equal(g, a) for g, a in zip(got, alone))


def test_decode_and_reorder_take_tokens_and_rows_of_any_integer_dtype(artifact):
    """The Backend protocol's tokens and beam indices are int64, but a caller's int32 tensors (numpy's default on
    some platforms) are cast, not bound as another type: the logits are those of int64 inputs."""
    ref, onnx = _backends(artifact, "llama")
    batch = _batch(ref, artifact("llama")[0])
    got = []
    for dtype in (torch.long, torch.int32):
        _, state = onnx.prefill(batch)
        state = onnx.reorder(state, torch.tensor([0, 0, 1, 1], dtype=dtype))
        logits, state = onnx.decode(torch.tensor([5, 6, 7, 8], dtype=dtype), state)
        got.append(logits)
    assert torch.equal(got[0], got[1])


def test_prefill_takes_a_batch_of_any_integer_dtype(artifact):
    """...and so does prefill: an int32 EncodedBatch was bound as float32 and ONNX Runtime failed deep inside
    ("Unexpected input data type"); the batch is cast to int64 as tokens and beam indices are."""
    from deploylm.backends.base import EncodedBatch

    ref, onnx = _backends(artifact, "llama")
    batch = _batch(ref, artifact("llama")[0])
    want, _ = onnx.prefill(batch)
    for ids, mask in ((torch.int32, torch.int32), (torch.int32, torch.bool)):
        got, _ = onnx.prefill(EncodedBatch(batch.input_ids.to(ids), batch.attention_mask.to(mask)))
        assert torch.equal(got, want)


def test_the_profiles_generation_settings_are_the_onnx_backends_defaults_over_the_models(artifact, tmp_path):
    """An artifact decodes with its profile's [generation] (the manifest's "generation"), over the model's own
    generation_config.json (documented precedence; export notes each value it replaces)."""
    import json
    import shutil

    from deploylm.artifact import load_artifact

    _, out = artifact("llama")
    profile = load_artifact(out).manifest["generation"]
    assert profile == load_profile("fp32").generation and profile
    assert OnnxBackend.from_source(str(out)).generation_defaults.items() >= profile.items()
    folder = shutil.copytree(out, tmp_path / "artifact")
    gen = folder / "generation_config.json"
    gen.write_text(json.dumps({**json.loads(gen.read_text()), "max_new_tokens": profile["max_new_tokens"] // 2}))
    opened = OnnxBackend.from_folder(folder, name="llama", generation=profile)
    assert opened.generation_defaults["max_new_tokens"] == profile["max_new_tokens"]
