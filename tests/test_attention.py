"""`deploylm attention`: weights from every model kind are proper (rows sum to 1, causal where they
must be), the PNG is written, and bad input is one line, exit 2."""
import re
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from deploylm.attention import attention_maps, draw_attention, panels
from deploylm.cli import cli
from deploylm.errors import UsageError, WriteFailed
from tests.helpers.tiny_seed import build_tiny_seed

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT = "red fox blue cat"


@pytest.fixture(scope="module")
def seed_seq2seq(tmp_path_factory):
    return build_tiny_seed(tmp_path_factory.mktemp("attn") / "seq2seq", layers=2)


@pytest.fixture(scope="module")
def seed_lm(tmp_path_factory):
    return build_tiny_seed(tmp_path_factory.mktemp("attn") / "lm", arch="decoder", layers=2, seed=1)   # no EOS first


def assert_rows_sum_to_one(amap):
    for weights in amap.layers:                                  # [H, Tq, Tk]
        assert weights.shape[1:] == (len(amap.queries), len(amap.keys))
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))


def assert_causal(amap):
    for weights in amap.layers:
        assert torch.equal(weights.triu(1), torch.zeros_like(weights))   # nothing attends to the future


def test_seq2seq_checkpoint_maps(seed_seq2seq):
    maps = attention_maps(seed_seq2seq, TEXT, max_new_tokens=5)
    assert [m.kind for m in maps] == ["encoder", "decoder", "cross"]
    encoder, decoder, cross = maps
    assert len(encoder.layers) == 2 and encoder.layers[0].shape[0] == 2
    assert encoder.queries == encoder.keys == cross.keys and encoder.keys[-1] == "</s>"
    assert decoder.queries[0] == "<s>" and cross.queries == decoder.queries and 1 < len(decoder.queries) <= 6
    for amap in maps:
        assert_rows_sum_to_one(amap)
    assert_causal(decoder)
    assert not torch.equal(encoder.layers[0].triu(1), torch.zeros_like(encoder.layers[0]))   # encoder sees both ways


def test_decoder_only_checkpoint_maps(seed_lm):
    (amap,) = attention_maps(seed_lm, TEXT, max_new_tokens=3)
    assert amap.kind == "self" and len(amap.layers) == 2
    prompt_len = len(attention_maps(seed_lm, TEXT, max_new_tokens=0)[0].queries)
    assert len(amap.queries) == prompt_len + 3                       # prompt + greedy continuation
    assert_rows_sum_to_one(amap)
    assert_causal(amap)


def test_causal_lm_attention_maps_method():
    from deploylm.models.causal_lm import CausalTransformerLM
    from deploylm.models.config import make_config

    config = make_config("tiny", 50, arch="decoder", d_model=16, n_heads=2, d_ff=32, n_encoder_layers=0,
                         n_decoder_layers=3, max_positions=32)
    torch.manual_seed(0)
    model = CausalTransformerLM(config).eval()
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])              # row 0 left-padded
    logits, _ = model(ids, mask)
    maps = model.attention_maps(ids, mask)
    assert len(maps) == 3 and all(w.shape == (2, 2, 6, 6) for w in maps)      # per layer [B, H, T, T]
    for w in maps:
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
        assert torch.equal(w.triu(1), torch.zeros_like(w))                     # causal
        assert torch.equal(w[0, :, 2:, :2], torch.zeros(2, 4, 2))              # real tokens never see padding
    torch.testing.assert_close(model(ids, mask)[0], logits)                    # forward unchanged, no state kept


def test_hugging_face_maps(tiny_gpt2_dir, tiny_t5_dir):
    (amap,) = attention_maps(tiny_gpt2_dir, "the quick brown fox", max_new_tokens=2)
    assert amap.kind == "self" and len(amap.layers) == 2 and amap.layers[0].shape[0] == 4
    assert_rows_sum_to_one(amap)
    assert_causal(amap)
    maps = attention_maps(tiny_t5_dir, "the quick brown fox", max_new_tokens=3)
    assert [m.kind for m in maps] == ["encoder", "decoder", "cross"]
    for amap in maps:
        assert_rows_sum_to_one(amap)
    assert_causal(maps[1])


def test_panels_choose_layers_and_heads(seed_seq2seq):
    maps = attention_maps(seed_seq2seq, TEXT, max_new_tokens=2)
    assert [len(row) for row in panels(maps)] == [1] * 6                 # 3 kinds x 2 layers, mean of heads
    assert [len(row) for row in panels(maps, layer=1, head="all")] == [2] * 3
    title, weights, _ = panels(maps, layer=0, head=1)[0][0]
    assert title == "encoder layer 0 head 1" and torch.equal(weights, maps[0].layers[0][1])
    title, weights, _ = panels(maps, layer=1)[2][0]
    assert title == "cross layer 1 (mean of heads)" and torch.allclose(weights, maps[2].layers[1].mean(0))
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[0]))


def test_png_is_written(seed_seq2seq, tmp_path):
    maps = attention_maps(seed_seq2seq, TEXT, max_new_tokens=3)
    (tmp_path / ".attn.png.tmp-0123abcd-999999999").write_bytes(b"\x89PNG")   # a killed run's half-written picture
    out = draw_attention(maps, tmp_path / "attn.png", head="all")
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert [p.name for p in tmp_path.iterdir()] == ["attn.png"]           # no temporary file left


def test_a_full_disk_is_one_error_and_leaves_no_file(seed_seq2seq, tmp_path, monkeypatch):
    def full(self, data):
        with open(self, "wb") as fh:
            fh.write(data[:4])                                            # a part was written, then the disk filled
        raise OSError(28, "No space left on device")

    maps = attention_maps(seed_seq2seq, TEXT, max_new_tokens=2)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(WriteFailed, match=r"could not write .*attn.png: No space left on device; nothing was written") \
            as failed:
        draw_attention(maps, tmp_path / "attn.png", head="all")
    assert failed.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_draws_png(tiny_gpt2_dir, tmp_path):
    out = tmp_path / "gpt2.png"
    res = CliRunner().invoke(cli, ["attention", "--model", str(tiny_gpt2_dir), "the quick brown fox", "--out", str(out),
                                   "--layer", "1", "--head", "0", "--max-new-tokens", "2"])
    assert res.exit_code == 0, res.output
    assert "attention maps:" in res.output and out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 5_000


def test_help():
    res = CliRunner().invoke(cli, ["attention", "--help"])
    assert res.exit_code == 0 and "--layer" in res.output and "--head" in res.output and "FILE.png" in res.output


@pytest.mark.parametrize("args, message", [
    (["--model", "{tmp}/nope", TEXT, "--out", "{tmp}/a.png"], "does not exist"),
    (["--model", "{seed}", "--out", "{tmp}/a.png"], "TEXT is required"),
    (["--model", "{seed}", "  ", "--out", "{tmp}/a.png"], "TEXT is empty"),
    (["--model", "{seed}", TEXT], "--out FILE.png is required"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.jpg"], "expected a file name ending in .png"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/missing/a.png"], "does not exist"),
    (["--model", "{seed}", TEXT, "--out", "/proc/a.png"], "--out '/proc/a.png': cannot write in '/proc'"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--layer", "2"], "--layer 2: the model has 2 layer(s)"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--layer", "first"], "--layer 'first'"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--head", "5"], "--head 5: the model has 2 head(s)"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--head", "2"], "--head 2: the model has 2 head(s), 0..1"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--head", "-1"], "--head '-1'"),
    (["--model", "{seed}", TEXT, "--out", "{tmp}/a.png", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
])
def test_bad_input_is_one_line_exit_2(args, message, seed_seq2seq, tmp_path):
    argv = ["attention", *[a.format(tmp=tmp_path, seed=seed_seq2seq) for a in args]]
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_names_the_extra(seed_seq2seq, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)                   # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = CliRunner().invoke(cli, ["attention", "--model", str(seed_seq2seq), TEXT, "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 2 and "pip install 'deploylm[plot]'" in res.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("head", ["mean", "all"])
def test_colorbar_overlaps_no_panel(seed_seq2seq, tmp_path, monkeypatch, head):
    """The colorbar and its label sit beside the panels: none of a panel's title, labels or image
    overlaps them, in one column (head mean) as in a grid (head all)."""
    from matplotlib.figure import Figure

    import deploylm.attention as attention

    figures = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    monkeypatch.setattr(attention, "require_matplotlib", lambda: Recorded)
    maps = attention_maps(seed_seq2seq, "a b c", max_new_tokens=3)
    draw_attention(maps, tmp_path / "a.png", head=head)
    fig = figures[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()                          # the constrained layout, as savefig drew it
    renderer = canvas.get_renderer()
    colorbar = fig.axes[-1]
    assert colorbar.get_label() == "<colorbar>"
    bar = colorbar.get_tightbbox(renderer)
    for ax in fig.axes[:-1]:
        if ax.get_visible() and ax.axison:
            assert not ax.get_tightbbox(renderer).overlaps(bar), ax.get_title()


def test_a_model_without_attention_layers_is_refused_in_one_line(tmp_path):
    """Mamba runs on the torch backend (docs/models.md) but has no attention weights to draw."""
    from transformers import AutoModelForCausalLM, MambaConfig

    from tests.helpers.tiny_hf import train_tokenizer

    tok = train_tokenizer("gpt2")
    config = MambaConfig(vocab_size=len(tok), hidden_size=16, state_size=4, num_hidden_layers=1,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "mamba")
    tok.save_pretrained(tmp_path / "mamba")
    out = tmp_path / "a.png"
    res = CliRunner().invoke(cli, ["attention", "--model", str(tmp_path / "mamba"), "the fox", "--out", str(out),
                                   "--max-new-tokens", "1"])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and "MambaForCausalLM returns no attention weights" in lines[-1], res.output
    assert not out.exists()


@pytest.mark.parametrize("max_new_tokens", [0, 2])
def test_a_text_over_the_window_is_refused_in_one_line(tiny_gpt2_dir, tmp_path, max_new_tokens):
    """The maps feed the text and every generated token (the generator's check lets the last one out):
    more than the window of GPT-2's position table is one error line, not an IndexError."""
    import deploylm

    gen = deploylm.load(tiny_gpt2_dir)
    window = gen.info.max_positions
    words = ["the"]                                                # one token more per word
    while gen.count_tokens(" ".join(words)) < window - max_new_tokens + 1:   # as long as generate accepts
        words.append("the")
    out = tmp_path / "a.png"
    res = CliRunner().invoke(cli, ["attention", "--model", str(tiny_gpt2_dir), " ".join(words), "--out", str(out),
                                   "--max-new-tokens", str(max_new_tokens)])
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"window of {window}" in lines[0], res.output
    assert not out.exists()


@pytest.mark.parametrize("choice, message", [
    ({"layer": -1}, "layer -1: expected 'all' or a layer index >= 0"),
    ({"layer": True}, "layer True: expected 'all' or a layer index >= 0"),
    ({"layer": "1"}, "layer '1': expected 'all' or a layer index >= 0"),
    ({"head": -1}, "head -1: expected 'mean', 'all' or a head index >= 0"),
    ({"head": "foo"}, "head 'foo': expected 'mean', 'all' or a head index >= 0"),
])
def test_python_api_refuses_a_layer_or_head_it_cannot_draw(seed_seq2seq, tmp_path, choice, message):
    from deploylm.errors import UsageError

    maps = attention_maps(seed_seq2seq, TEXT, max_new_tokens=1)
    with pytest.raises(UsageError, match=re.escape(message)):
        draw_attention(maps, tmp_path / "a.png", **choice)
    assert list(tmp_path.iterdir()) == []


def test_the_final_eos_is_not_fed_back_and_the_window_counts_every_fed_position():
    from types import SimpleNamespace

    from deploylm.attention import _check_window, _greedy

    def gen(tokens):
        special = SimpleNamespace(eos_token_ids=[2])
        result = [SimpleNamespace(sequences=[SimpleNamespace(token_ids=tokens)])]
        return SimpleNamespace(info=SimpleNamespace(special=special), generate=lambda *a, **k: result)

    assert _greedy(gen([5, 6, 2]), "x", 3) == [5, 6] and _greedy(gen([5, 6, 7]), "x", 3) == [5, 6, 7]
    assert _greedy(gen([5]), "x", 0) == []
    causal = SimpleNamespace(max_positions=10, is_encoder_decoder=False)
    _check_window(causal, 8, 2)                                               # exactly the window: fine
    with pytest.raises(UsageError, match=r"TEXT \(9 tokens\) \+ 2 generated is 11 positions, over the model's window of 10"):
        _check_window(causal, 9, 2)
    seq2seq = SimpleNamespace(max_positions=10, is_encoder_decoder=True)
    _check_window(seq2seq, 10, 9)                                             # start token + 9 = 10
    with pytest.raises(UsageError, match=r"start token \+ 10 generated\) is 11 positions"):
        _check_window(seq2seq, 10, 10)


def test_a_layer_of_the_deeper_stack_draws_that_stack_only():
    from deploylm.attention import AttentionMap

    def stack(kind, depth):
        return AttentionMap(kind, [torch.full((2, 3, 3), 1 / 3) for _ in range(depth)], list("abc"), list("abc"))

    maps = [stack("encoder", 3), stack("decoder", 1), stack("cross", 1)]
    assert [[title for title, _, _ in row] for row in panels(maps, layer=2, head=1)] == [["encoder layer 2 head 1"]]
    with pytest.raises(UsageError, match=r"--layer 3: the model has 3 layer\(s\), 0..2"):
        panels(maps, layer=3)


def test_token_labels_fall_back_to_the_vocabulary_entry_and_are_cut():
    from types import SimpleNamespace

    from deploylm.attention import MAX_LABEL, token_labels

    texts = {1: " ", 2: "\ufffd", 3: "hello", 4: "x" * 30}
    tok = SimpleNamespace(decode=lambda ids, skip_special_tokens: texts[ids[0]],
                          convert_ids_to_tokens=lambda i: f"<tok{i}>")
    assert token_labels(tok, [1, 2, 3, 4]) == ["<tok1>", "<tok2>", "hello", "x" * MAX_LABEL]


def test_an_artifact_is_refused_naming_the_model_it_was_exported_from_as_the_way(tmp_path):
    """Attention maps come from the torch path: an artifact is refused before anything loads, saying to pass the
    model it was exported from (not the generic "the torch backend cannot open an artifact")."""
    artifact = tmp_path / "art"
    artifact.mkdir()
    (artifact / "manifest.json").write_text("{}")
    res = CliRunner().invoke(cli, ["attention", "--model", str(artifact), TEXT, "--out", str(tmp_path / "a.png")])
    assert res.exit_code == 2, res.output
    assert res.output == (f"error: model {str(artifact)!r} is an exported artifact: attention maps come from the torch "
                          "path; pass the checkpoint or Hugging Face folder it was exported from\n")
    assert not (tmp_path / "a.png").exists()


def test_a_head_past_the_stack_with_the_fewest_heads_is_refused_in_one_line():
    """Stacks with different head counts (an encoder of 4, a decoder of 2): a head only the encoder has is refused
    as a UsageError naming the count every stack has, not an IndexError from inside the drawing."""
    from deploylm.attention import AttentionMap

    def stack(kind, heads):
        return AttentionMap(kind, [torch.full((heads, 3, 3), 1 / 3)], list("abc"), list("abc"))

    maps = [stack("encoder", 4), stack("decoder", 2), stack("cross", 2)]
    assert len(panels(maps, head=1)) == 3
    with pytest.raises(UsageError, match=r"^--head 3: the model has 2 head\(s\), 0..1$"):
        panels(maps, head=3)


def test_model_and_a_png_out_are_checked_before_anything_loads(tmp_path, monkeypatch):
    """No --model is one line (not a traceback from resolving None), and a bad --out is refused before the model
    loads, not after minutes of it."""
    import deploylm.attention

    monkeypatch.setattr(deploylm.attention, "attention_maps", lambda *a, **k: pytest.fail("loaded the model first"))
    res = CliRunner().invoke(cli, ["attention", TEXT, "--out", str(tmp_path / "a.png")])
    assert (res.exit_code, res.output) == (2, "error: --model SRC is required: a checkpoint, Hugging Face folder or "
                                              ".gguf file\n")
    res = CliRunner().invoke(cli, ["attention", "--model", str(tmp_path), TEXT, "--out", str(tmp_path / "a.jpg")])
    assert res.exit_code == 2 and "expected a file name ending in .png" in res.output, res.output


def test_a_model_that_returns_no_weights_for_some_layers_is_refused_in_one_line():
    """A hybrid model (attention in some layers, state-space in others) returns None for the layers without:
    a UsageError, not a TypeError from indexing None."""
    from types import SimpleNamespace

    from deploylm.attention import _returned

    model = SimpleNamespace(name_or_path="hybrid")
    with pytest.raises(UsageError, match="returns no attention weights for some or all of its layers"):
        _returned(model, SimpleNamespace(attentions=(torch.ones(1, 2, 3, 3), None)), "attentions")


def test_matplotlib_is_required_and_the_flags_reach_the_maps_before_anything_loads(tmp_path, monkeypatch):
    """Without matplotlib the command stops before the model loads (not after minutes of it); with it, --device
    and --max-new-tokens reach attention_maps as given."""
    import deploylm.attention

    seen = {}

    def maps(src, text, **kwargs):
        seen.update(kwargs)
        raise UsageError("stop here")

    monkeypatch.setattr(deploylm.attention, "attention_maps", maps)
    argv = ["attention", "--model", str(tmp_path), TEXT, "--out", str(tmp_path / "a.png"), "--device", "cuda:1",
            "--max-new-tokens", "3"]
    assert CliRunner().invoke(cli, argv).output == "error: stop here\n"
    assert seen == {"max_new_tokens": 3, "device": "cuda:1"}
    seen.clear()
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    res = CliRunner().invoke(cli, argv)
    assert res.exit_code == 2 and "pip install 'deploylm[plot]'" in res.output and seen == {}, res.output


def test_every_panel_shares_the_0_to_1_colour_scale_and_empty_grid_cells_are_blank(tmp_path, monkeypatch):
    """Weights are drawn on one scale, 0..1 (the colorbar's), not each panel stretched to its own range; a row
    with fewer heads than the widest (an encoder of 4, a decoder of 2, head all) leaves its extra cells blank."""
    from matplotlib.figure import Figure

    import deploylm.attention as attention
    from deploylm.attention import AttentionMap

    figures = []

    class Recorded(Figure):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            figures.append(self)

    def stack(kind, heads):
        weights = torch.tensor([[0.2, 0.8], [0.4, 0.6]]).expand(heads, 2, 2)
        return AttentionMap(kind, [weights], ["a", "b"], ["a", "b"])

    monkeypatch.setattr(attention, "require_matplotlib", lambda: Recorded)
    draw_attention([stack("encoder", 4), stack("decoder", 2)], tmp_path / "a.png", head="all")
    panels_axes = figures[0].axes[:-1]                              # the last is the colorbar
    assert len(panels_axes) == 8 and [ax.axison for ax in panels_axes].count(False) == 2
    assert all(ax.images[0].get_clim() == (0.0, 1.0) for ax in panels_axes if ax.axison)


def test_layer_takes_all_or_an_index_and_not_heads_words():
    from deploylm.attention import parse_head, parse_layer

    assert (parse_layer("all"), parse_layer("2"), parse_head("mean"), parse_head("all"), parse_head("1")) == (
        "all", 2, "mean", "all", 1)
    with pytest.raises(UsageError, match=r"^--layer 'mean': expected all or an index >= 0$"):
        parse_layer("mean")
