"""The trt backend's buffer logic on CPU: ping-pong KV buffers, a reorder that reaches the memory the
engine reads, and tensor binding by address — driven by a fake engine that reads and writes raw
addresses like TensorRT does (no TensorRT needed)."""
from __future__ import annotations

import ctypes
import dataclasses
from types import SimpleNamespace

import pytest
import torch

from deploylm.backends.base import EncodedBatch, ModelInfo, SpecialTokens
from deploylm.backends.trt_backend import EngineRunner, TrtBackend, pair_kv_names
from deploylm.backends.trt_buffers import KvPingPong, dense_view, gather_rows
from deploylm.errors import ArtifactError, UsageError
from deploylm.export.trt_shapes import KvBufferPlan, TrtShapes, kv_buffer_plan, profile_shapes

V, H, D, LAYERS = 11, 2, 3, 2
NAMES = [f"past_key_values.{i}.{kv}" for i in range(LAYERS) for kv in ("key", "value")]


def test_gather_rows_writes_the_kept_rows_into_the_other_buffer():
    src, dst = torch.arange(24.0), torch.full((24,), -1.0)
    shape = (3, 1, 2, 2)                                          # [R, H, L, D]
    out = gather_rows(src, dst, shape, torch.tensor([2, 0, 0, 1]))
    expected = src[:12].view(shape)[[2, 0, 0, 1]]
    assert torch.equal(out, expected) and out.data_ptr() == dst.data_ptr()
    assert torch.equal(dense_view(dst, (4, 1, 2, 2)), expected)   # the memory itself changed
    with pytest.raises(ValueError, match="distinct"):
        gather_rows(src, src, shape, torch.tensor([0]))
    assert dense_view(dst, (2, 12)).shape == (2, 12)                # a buffer exactly full
    with pytest.raises(ValueError, match="needs 25 elements, the buffer has 24"):
        dense_view(dst, (5, 5))                                   # one element more: refused by name


def test_ping_pong_swaps_and_reorder_moves_live_cache():
    plan = KvBufferPlan(("k",), rows=4, heads=1, max_len=3, head_dim=2, itemsize=4)
    kv = KvPingPong(plan, torch.float32, torch.device("cpu"))
    kv.present("k", 2, 1).copy_(torch.tensor([[[[1.0, 1.0]]], [[[2.0, 2.0]]]]))
    kv.swap()
    assert kv.past("k", 2, 1).flatten().tolist() == [1, 1, 2, 2] and kv.epoch == 1
    kv.reorder(2, 1, torch.tensor([1, 1, 0]))
    assert kv.past("k", 3, 1).flatten().tolist() == [2, 2, 2, 2, 1, 1] and kv.epoch == 2
    with pytest.raises(UsageError, match="5 rows"):
        kv.reorder(3, 1, torch.tensor([0, 0, 0, 0, 0]))


def test_pair_kv_names():
    assert pair_kv_names(["input_ids", "past_key_values.0.key"], ["logits", "present.0.key"]) == [
        ("past_key_values.0.key", "present.0.key")]
    with pytest.raises(ArtifactError, match="present.0.value"):
        pair_kv_names(["past_key_values.0.value"], ["logits"])


# ---- a fake TensorRT engine: reads inputs and writes outputs at the bound raw addresses -----------

def _at(address: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor aliasing CPU memory at `address` (what TensorRT does with a bound address)."""
    n = 1
    for d in shape:
        n *= d
    if n == 0:
        return torch.empty(shape, dtype=dtype)
    size = n * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * size).from_address(address), dtype=dtype).view(shape)


class ToyLM:
    """new K/V of a token = embedding + position; logits = masked sum of the whole cache @ W."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(V, H * D, generator=g)
        self.w = torch.randn(D, V, generator=g)

    def __call__(self, ids, mask, pos, past):                      # past: name -> [R, H, L, D]
        new = (self.emb[ids] + pos[..., None]).view(*ids.shape, H, D).transpose(1, 2)  # [R, H, T, D]
        present = {n: torch.cat([p, new * (1 + i)], dim=2) for i, (n, p) in enumerate(past.items())}
        m = mask[:, None, :, None].float()
        summed = sum((p * m).sum(dim=(1, 2)) for p in present.values())                # [R, D]
        return (summed @ self.w)[:, None, :], present                                   # [R, 1, V]


class FakeContext:
    """Like TensorRT's IExecutionContext: set_input_shape returns False outside the active profile."""

    def __init__(self, model: ToyLM, dtypes: dict[str, torch.dtype], engine: "FakeEngine"):
        self.model, self.dtypes, self.shapes, self.addr, self.profiles = model, dtypes, {}, {}, []
        self.engine = engine

    def set_optimization_profile_async(self, index, stream):
        self.profiles.append(index)
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profiles[-1])
        if not all(a <= d <= b for a, d, b in zip(lo, shape, hi)):
            return False                                          # TensorRT keeps the old shape
        self.shapes[name] = tuple(shape)
        return True

    def set_tensor_address(self, name, address):
        self.addr[name] = address

    def get_tensor_shape(self, name):
        rows, seq = self.shapes["input_ids"]
        total = self.shapes["attention_mask"][1]
        return (rows, 1, V) if name == "logits" else (rows, H, total, D)

    def execute_async_v3(self, stream):
        read = {n: _at(self.addr[n], s, self.dtypes[n]) for n, s in self.shapes.items()}
        past = {n: read[n] for n in NAMES}
        logits, present = self.model(read["input_ids"], read["attention_mask"], read["position_ids"], past)
        _at(self.addr["logits"], tuple(logits.shape), torch.float32).copy_(logits)
        for n, p in present.items():
            _at(self.addr[n.replace("past_key_values", "present")], tuple(p.shape), torch.float32).copy_(p)
        return True


class FakeEngine:
    def __init__(self):
        inputs = ["input_ids", "attention_mask", "position_ids", *NAMES]
        outputs = ["logits", *[n.replace("past_key_values", "present") for n in NAMES]]
        self.names = inputs + outputs
        self.modes = {n: SimpleNamespace(name="INPUT" if n in inputs else "OUTPUT") for n in self.names}
        self.types = {n: SimpleNamespace(name="INT64" if n in inputs[:3] else "FLOAT") for n in self.names}
        self.num_io_tensors = len(self.names)

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_mode(self, name):
        return self.modes[name]

    def get_tensor_dtype(self, name):
        return self.types[name]

    def get_tensor_shape(self, name):
        return (-1, 1, V) if name == "logits" else (-1, H, -1, D) if "key" in name or "value" in name else (-1, -1)

    def get_tensor_profile_shape(self, name, index):
        return engine_shapes()[("prefill", "decode")[index]][name]   # [min, opt, max]


def fake_runner(model=None):
    engine = FakeEngine()
    dtypes = {n: torch.int64 if engine.types[n].name == "INT64" else torch.float32 for n in engine.names}
    context = FakeContext(model or ToyLM(), dtypes, engine)
    return EngineRunner(engine, context, ("prefill", "decode"), torch.device("cpu"))


def engine_shapes():
    """phase -> input -> (min, opt, max), as build_engines records them in the manifest."""
    inputs = {"input_ids": (None, None), "attention_mask": (None, None), "position_ids": (None, None),
              **{n: (None, H, None, D) for n in NAMES}}
    shapes = TrtShapes(batch=(1, 2, 4), sequence=(1, 8, 16), past=(0, 8, 32), num_beams=2)
    return {p: profile_shapes(inputs, shapes, p, decoder_only=True) for p in ("prefill", "decode")}


def _backend(rows: int = 8):
    model = ToyLM()
    runner = fake_runner(model)
    info = ModelInfo(False, V, SpecialTokens((0,), 0))
    return TrtBackend(runner, info, kv_buffer_plan(engine_shapes(), 4, rows)), model, runner.context


def _reference(model, batch, steps):
    """The same toy model with an explicit functional cache and torch.index_select reorders."""
    mask = batch.attention_mask
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    past = {n: torch.zeros(mask.shape[0], H, 0, D) for n in NAMES}
    logits, past = model(batch.input_ids, mask, pos, past)
    out, nxt = [logits[:, -1]], pos[:, -1] + 1
    for beam_idx, tokens in steps:
        past = {n: p.index_select(0, beam_idx) for n, p in past.items()}
        mask, nxt = mask.index_select(0, beam_idx), nxt.index_select(0, beam_idx)
        mask = torch.cat([mask, torch.ones(len(tokens), 1, dtype=mask.dtype)], 1)
        logits, past = model(tokens[:, None], mask, nxt[:, None], past)
        out.append(logits[:, -1])
        nxt = nxt + 1
    return out


def test_prefill_decode_reorder_match_reference_through_bound_addresses():
    backend, model, context = _backend()
    batch = EncodedBatch(torch.tensor([[0, 3, 4, 5], [6, 7, 8, 9]]), torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    steps = [(torch.tensor([0, 0, 1, 1]), torch.tensor([1, 2, 3, 4])),      # expand to 2 beams
             (torch.tensor([1, 0, 3, 3]), torch.tensor([5, 6, 7, 8])),      # beams swap / duplicate
             (torch.tensor([2, 2, 0, 1]), torch.tensor([9, 10, 1, 2]))]     # rows cross inputs
    want = _reference(model, batch, steps)
    logits, state = backend.prefill(batch)
    got = [logits]
    for beam_idx, tokens in steps:
        state = backend.reorder(state, beam_idx)
        logits, state = backend.decode(tokens, state)
        got.append(logits)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    assert context.profiles == [0, 1]                             # prefill profile, then decode once
    assert state.length == 7 and state.rows == 4


def test_reorder_is_what_the_engine_reads():
    backend, model, _ = _backend()
    batch = EncodedBatch(torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2, dtype=torch.long))
    _, state = backend.prefill(batch)
    state = backend.reorder(state, torch.tensor([1, 0]))
    swapped, _ = backend.decode(torch.tensor([5, 5]), state)
    _, plain = backend.prefill(batch)
    same, _ = backend.decode(torch.tensor([5, 5]), plain)
    torch.testing.assert_close(swapped, same.flip(0))             # rows really swapped in the engine's input
    assert not torch.allclose(swapped, same)


def test_identity_reorder_copies_nothing():
    backend, _, _ = _backend()
    _, state = backend.prefill(EncodedBatch(torch.tensor([[1, 2], [3, 4]]), torch.ones(2, 2, dtype=torch.long)))
    same = backend.reorder(state, torch.tensor([0, 1]))
    assert same is state and state.kv.epoch == 1                  # no gather, no swap


def test_stale_state_and_too_many_rows_are_refused():
    backend, _, _ = _backend(rows=4)
    _, state = backend.prefill(EncodedBatch(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long)))
    newer = backend.reorder(state, torch.tensor([0, 0]))
    with pytest.raises(RuntimeError, match="stale"):
        backend.decode(torch.tensor([1]), state)
    with pytest.raises(UsageError, match="5 rows"):
        backend.reorder(newer, torch.tensor([0, 0, 0, 0, 0]))


def test_prompts_outside_the_prefill_profile_are_refused_before_the_engine():
    backend, _, context = _backend()                              # prefill: 4 rows, 16 tokens; decode 8 rows
    assert (backend.plan.prefill_rows, backend.plan.prefill_tokens, backend.plan.rows) == (4, 16, 8)
    with pytest.raises(UsageError, match="5 prompts in one call exceed the TensorRT engine's prefill profile of 4"):
        backend.prefill(EncodedBatch(torch.ones(5, 2, dtype=torch.long), torch.ones(5, 2, dtype=torch.long)))
    with pytest.raises(UsageError, match="prompt of 17 tokens exceeds the TensorRT engine's prefill profile of 16"):
        backend.prefill(EncodedBatch(torch.ones(1, 17, dtype=torch.long), torch.ones(1, 17, dtype=torch.long)))
    assert context.profiles == []                                 # refused before any engine call


def test_a_shape_the_engine_refuses_is_a_usage_error_naming_the_input():
    runner = fake_runner()
    feeds = {"input_ids": torch.ones(6, 2, dtype=torch.long), "attention_mask": torch.ones(6, 2, dtype=torch.long),
             "position_ids": torch.ones(6, 2, dtype=torch.long), **{n: torch.zeros(6, H, 0, D) for n in NAMES}}
    with pytest.raises(UsageError, match=r"input_ids of shape \(6, 2\) is outside the TensorRT engine's prefill "
                                         r"profile \(\(1, 1\) to \(4, 16\)\)"):
        runner.run("prefill", feeds, {})


def test_kv_buffers_grow_to_what_the_call_needs_not_the_engine_maximum():
    backend, model, _ = _backend()
    batch = EncodedBatch(torch.tensor([[1, 2, 3]]), torch.ones(1, 3, dtype=torch.long))
    logits, state = backend.prefill(batch)
    state = backend.reorder(state, torch.tensor([0, 0]))          # 2 beams
    for step in range(3):
        logits, state = backend.decode(torch.tensor([step + 1, step + 2]), state)
    plan, held = backend.plan, [b.numel() for pair in state.kv.buffers.values() for b in pair]
    assert plan.numel == 8 * H * 33 * D                           # the engine's maximum: 8 rows x 33 tokens
    assert max(held) == 2 * H * (3 + 64) * D < plan.numel         # 2 rows x (the prompt + 64 tokens of room)
    want = _reference(model, batch, [(torch.tensor([0, 0]), torch.tensor([1, 2])),
                                     (torch.tensor([0, 1]), torch.tensor([2, 3])),
                                     (torch.tensor([0, 1]), torch.tensor([3, 4]))])
    torch.testing.assert_close(logits, want[-1])


def test_a_profile_tensorrt_refuses_to_select_is_an_error():
    runner = fake_runner()
    runner.context.set_optimization_profile_async = lambda index, stream: False     # as TensorRT on failure
    feeds = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "position_ids": torch.ones(1, 2, dtype=torch.long), **{n: torch.zeros(1, H, 0, D) for n in NAMES}}
    with pytest.raises(RuntimeError, match=r"TensorRT could not select optimization profile 0 \(prefill\)"):
        runner.run("prefill", feeds, {})


class _LoggedStream:
    """A stand-in for torch.cuda.Stream that logs the waits between the caller's stream and the engine's."""

    cuda_stream = 0

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(f"{self.name} waits for {other.name}")


def test_the_engine_stream_waits_for_the_inputs_converted_on_the_callers_stream(monkeypatch):
    """The casts/copies that put an input in the engine's dtype, dense and aligned, run on the caller's stream: the
    engine's stream must wait for them (it waited before they were queued, so the engine could read the memory
    before the copy landed)."""
    runner = fake_runner()
    log = []
    runner._side = _LoggedStream("engine", log)                   # as on CUDA
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: _LoggedStream("caller", log))
    held = runner._held
    monkeypatch.setattr(runner, "_held", lambda name, tensor: (log.append(f"cast {name}"), held(name, tensor))[1])
    feeds = {"input_ids": torch.ones(1, 2, dtype=torch.int32), "attention_mask": torch.ones(1, 2, dtype=torch.int32),
             "position_ids": torch.ones(1, 2, dtype=torch.int32), **{n: torch.zeros(1, H, 0, D) for n in NAMES}}
    runner.run("prefill", feeds, {})
    waits = log.index("engine waits for caller")
    assert [e for e in log[:waits] if e.startswith("cast")] == [f"cast {n}" for n in runner.inputs]
    assert log[-1] == "caller waits for engine"


def test_a_profile_the_binding_refuses_by_raising_names_the_phase():
    """TensorRT 10's Python binding of set_optimization_profile_async raises RuntimeError("Error in set optimization
    profile async.") where the C++ call returns false; it never returns False."""
    runner = fake_runner()

    def refuse(index, stream):
        raise RuntimeError("Error in set optimization profile async.")

    runner.context.set_optimization_profile_async = refuse
    feeds = {"input_ids": torch.ones(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
             "position_ids": torch.ones(1, 2, dtype=torch.long), **{n: torch.zeros(1, H, 0, D) for n in NAMES}}
    with pytest.raises(RuntimeError, match=r"could not select optimization profile 0 \(prefill\): Error in set"):
        runner.run("prefill", feeds, {})
    assert runner._profile is None                                # not recorded as selected: the next call retries


# ---- what hand mutants of trt_backend / trt_buffers showed untested ---------------------------------

def _feeds(rows, dtype=torch.long):
    ids = torch.tensor([[3, 4]] * rows, dtype=dtype)
    pos = torch.tensor([[0, 1]] * rows, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": pos,
            **{n: torch.zeros(rows, H, 0, D) for n in NAMES}}


def test_left_padding_positions_reach_the_engine_as_zero_not_minus_one():
    backend, model, context = _backend()
    seen = []
    context.model = lambda ids, mask, pos, past: (seen.append(pos.clone()), model(ids, mask, pos, past))[1]
    backend.prefill(EncodedBatch(torch.tensor([[0, 0, 5], [6, 7, 8]]), torch.tensor([[0, 0, 1], [1, 1, 1]])))
    assert seen[0].tolist() == [[0, 0, 0], [0, 1, 2]]             # an index -1 is out of range for an engine's Gather


def test_inputs_are_cast_to_the_engines_dtype_before_binding():
    runner = fake_runner()
    want = runner.run("prefill", _feeds(2), {})["logits"]
    got = runner.run("prefill", _feeds(2, torch.int32), {})["logits"]   # the engine reads int64 at the address
    torch.testing.assert_close(got, want)


def test_an_output_buffer_of_the_wrong_shape_is_refused():
    runner = fake_runner()
    wrong = {"present.0.key": torch.empty(2, H, 3, D)}                 # the engine writes [2, H, 2, D]
    with pytest.raises(RuntimeError, match=r"present.0.key: engine writes \(2, 2, 2, 3\)"):
        runner.run("prefill", _feeds(2), wrong)


def test_kv_buffers_never_grow_past_the_engines_maximum():
    plan = KvBufferPlan(("k",), rows=2, heads=1, max_len=10, head_dim=2, itemsize=4)
    kv = KvPingPong(plan, torch.float32, torch.device("cpu"))
    kv.present("k", 2, 9)                                          # 9 tokens + 64 of room would pass the maximum
    assert kv.buffers["k"][1].numel() == plan.numel == 2 * 1 * 10 * 2


def test_decoding_past_the_engines_longest_cache_is_a_usage_error():
    backend, _, _ = _backend()                                     # the longest cache: 33 tokens
    _, state = backend.prefill(EncodedBatch(torch.ones(1, 16, dtype=torch.long), torch.ones(1, 16, dtype=torch.long)))
    for step in range(17):                                         # 16 + 17 = 33
        _, state = backend.decode(torch.tensor([1]), state)
    with pytest.raises(UsageError, match="a cache of 34 tokens exceeds the TensorRT engine's 33"):
        backend.decode(torch.tensor([1]), state)


def test_encoder_decoder_engines_are_refused_with_the_backends_that_run_them(tmp_path):
    section = {"engines": [{"name": "encoder_model", "file": "trt/encoder_model.plan"},
                           {"name": "decoder_model", "file": "trt/decoder_model.plan"}]}
    with pytest.raises(UsageError, match="the trt backend runs decoder-only artifacts .*--backend onnx"):
        TrtBackend.from_folder(tmp_path, section, name="t5")


def test_a_model_folder_is_refused_with_the_export_command(tmp_path, monkeypatch):
    from deploylm.models.source import Source

    monkeypatch.setattr("deploylm.backends.trt_backend.require_trt_gpu", lambda purpose: None)
    with pytest.raises(UsageError, match=r"--backend trt needs an artifact folder .* --profile trt-fp16"):
        TrtBackend.from_source(Source("hf", tmp_path))


@pytest.mark.parametrize("device", ["cpu", "mps", "cuda0"])
def test_a_device_other_than_cuda_is_refused_before_the_engine_loads(tmp_path, monkeypatch, device):
    """TensorRT reads every bound address as GPU memory: CPU tensors bound by address would be read as device
    pointers (an illegal memory access), so deploylm.load(..., backend="trt", device="cpu") is refused up front."""
    from deploylm.models.source import Source

    monkeypatch.setattr("deploylm.backends.trt_backend.require_trt_gpu", lambda purpose: None)
    with pytest.raises(UsageError, match=rf"device='{device}': the trt backend runs TensorRT engines on a CUDA GPU"):
        TrtBackend.from_source(Source("artifact", tmp_path), device=device)


# ---- the engine's lengths, checked by the Generator before it decodes ----------------------------

def _words_tokenizer():
    """Words "w1".."w9" as ids 1..9 of the fake engine's vocabulary (0 pads and ends), no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({"<pad>": 0, **{f"w{i}": i for i in range(1, 10)}}))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="<pad>")


def _prompt(tokens: int) -> str:
    return " ".join(f"w{1 + i % 9}" for i in range(tokens))


def test_the_backend_tells_the_generator_the_engines_lengths():
    from deploylm.backends.base import EngineLimits

    backend, _, _ = _backend()                                      # prefill: 16 tokens; decode: past up to 32
    assert backend.info.engine == EngineLimits(positions=33, prompt_tokens=16)


def test_a_request_past_the_engines_longest_cache_is_refused_before_the_engine_runs():
    """A prompt + max_new_tokens over the engine's decode profile used to fail only once the cache outgrew it,
    after most of the decode (minutes on a real model): now one line up front, naming the limit, the request's
    numbers and what to do, and no engine call. A request that fits exactly still runs to its end."""
    from deploylm.generator import Generator

    backend, _, context = _backend()
    gen = Generator(backend, _words_tokenizer())
    with pytest.raises(UsageError) as refused:
        gen.generate(_prompt(16), max_new_tokens=19, num_beams=1, min_new_tokens=19)    # 16 + 19 - 1 = 34
    assert str(refused.value) == (
        "prompt 1 has 16 tokens; with max_new_tokens=19 that needs 34 positions, over the TensorRT engine's window "
        "of 33 positions: shorten the prompt, lower max_new_tokens, re-export with a larger [tensorrt] shapes.past, "
        "or pass truncation='left' or 'right' (deploylm generate: --truncation left|right)")
    with pytest.raises(UsageError, match="over the TensorRT engine's window of 33 positions"):
        gen.check([_prompt(2), _prompt(16)], max_new_tokens=19)                        # before any batch decodes
    assert context.profiles == []
    out = gen.generate(_prompt(16), max_new_tokens=18, num_beams=1, min_new_tokens=18)  # 16 + 18 - 1 = 33
    assert len(out[0].sequences[0].token_ids) == 18


def test_a_prompt_over_the_engines_prefill_profile_is_refused_before_the_engine_runs():
    from deploylm.generator import Generator

    backend, _, context = _backend()
    gen = Generator(backend, _words_tokenizer())
    with pytest.raises(UsageError) as refused:
        gen.check([_prompt(3), _prompt(17)], max_new_tokens=2)
    assert str(refused.value) == (
        "prompt 2 has 17 tokens, over the TensorRT engine's longest prompt of 16 tokens: shorten the prompt, "
        "re-export with a larger [tensorrt] shapes.sequence, or pass truncation='left' or 'right' (deploylm "
        "generate: --truncation left|right)")
    with pytest.raises(UsageError, match=r"max_new_tokens=40 leaves no room for a prompt in the TensorRT engine's "
                                         r"window of 33 positions: lower max_new_tokens to at most 33, or re-export "
                                         r"with a larger \[tensorrt\] shapes.past"):
        gen.check(_prompt(3), max_new_tokens=40)
    assert context.profiles == []


def test_truncation_cuts_a_prompt_to_what_the_engine_takes():
    from deploylm.generator import Generator

    backend, _, _ = _backend()
    gen = Generator(backend, _words_tokenizer())
    opts = gen.options(max_new_tokens=20, num_beams=1)
    assert gen.encode([_prompt(30)], opts, truncation="left").input_ids.shape[1] == 14      # 33 - 20 + 1
    opts = gen.options(max_new_tokens=2, num_beams=1)
    assert gen.encode([_prompt(30)], opts, truncation="right").input_ids.shape[1] == 16     # the prefill profile


def test_the_models_window_still_names_the_model_where_it_is_the_tighter_limit():
    from deploylm.generator import Generator

    backend, _, _ = _backend()
    backend.info = dataclasses.replace(backend.info, max_positions=20)
    with pytest.raises(UsageError, match=r"needs 21 positions, over the model's window of 20: shorten the prompt, "
                                         r"lower max_new_tokens, or pass truncation"):
        Generator(backend, _words_tokenizer()).check(_prompt(10), max_new_tokens=12)
