"""Attention maps of the torch path (seed §8.3.1): compute them for one text, draw them as a PNG grid.

- deploylm encoder-decoder checkpoints: `Seq2SeqTransformer.attention_maps` gives encoder
  self-attention over the source, decoder self-attention and cross-attention over the greedy output
  (decoder start token + generated tokens, the final EOS not fed back);
- deploylm decoder-only checkpoints: `CausalTransformerLM.attention_maps` over prompt + greedy output;
- Hugging Face models (folders or .gguf): `output_attentions=True` with the eager attention
  implementation (SDPA kernels do not return weights), same inputs as above.

The greedy output comes from the project's one decoder (`deploylm.load(...).generate`, num_beams=1).
Every map is per layer [H, Tq, Tk] with rows (queries) that sum to 1 over the keys.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from deploylm.errors import MissingDependencyError, UsageError
from deploylm.models.source import resolve_source

LayerChoice = int | Literal["all"]
HeadChoice = int | Literal["mean", "all"]
MAX_LABEL = 12               # characters of a token label
MAX_TICKS = 48               # token labels per axis; longer sequences label every k-th token
COLORBAR_INCHES = 1.2                   # figure width kept for the colorbar and its label


@dataclass(frozen=True)
class AttentionMap:
    """One kind of attention ("encoder", "decoder", "cross" or "self"): per layer [H, Tq, Tk] weights."""

    kind: str
    layers: list[Tensor]
    queries: list[str]       # token labels of the rows
    keys: list[str]          # token labels of the columns


def attention_maps(src: str | Path, text: str, *, max_new_tokens: int = 16, device: str = "cpu") -> list[AttentionMap]:
    """The attention weights of SRC (checkpoint, Hugging Face folder or .gguf file) on `text`."""
    from deploylm.generator import load

    if not text.strip():
        raise UsageError("TEXT is empty: give the text whose attention to draw")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens {max_new_tokens!r}: expected an integer >= 0")
    source = resolve_source(src)
    if source.kind == "artifact":
        raise UsageError(f"model {str(src)!r} is an exported artifact: attention maps come from the torch path; "
                         "pass the checkpoint or Hugging Face folder it was exported from")
    gen = load(source, backend="torch", device=device)
    prompt = gen.encode([text])                                             # input_ids [1, S]
    generated = _greedy(gen, text, max_new_tokens)
    _check_window(gen.info, prompt.input_ids.shape[1], len(generated))
    with torch.no_grad():
        if gen.info.is_encoder_decoder:
            return _seq2seq_maps(gen, prompt.input_ids.to(gen.backend.device), generated)
        ids = torch.tensor([prompt.input_ids[0].tolist() + generated], device=gen.backend.device)   # [1, T]
        return _causal_maps(gen, ids)


def _check_window(info: Any, text_tokens: int, generated: int) -> None:
    """The maps feed the text and every generated token (the generator never feeds back its last one, so
    its own check lets one more through): more than the model's window is a UsageError."""
    window = info.max_positions
    if info.is_encoder_decoder:      # the source, and the decoder's start token + generated tokens
        inputs = {f"TEXT ({text_tokens} tokens)": text_tokens,
                  f"the decoder input (start token + {generated} generated)": generated + 1}
    else:
        inputs = {f"TEXT ({text_tokens} tokens) + {generated} generated": text_tokens + generated}
    for what, positions in inputs.items():
        if window is not None and positions > window:
            raise UsageError(f"{what} is {positions} positions, over the model's window of {window}: shorten "
                             "TEXT or lower --max-new-tokens")


def _greedy(gen: Any, text: str, max_new_tokens: int) -> list[int]:
    """Greedy continuation of `text` without a final EOS ([] for max_new_tokens=0)."""
    if max_new_tokens == 0:
        return []
    result = gen.generate([text], num_beams=1, do_sample=False, num_return_sequences=1, max_new_tokens=max_new_tokens)
    ids = list(result[0].sequences[0].token_ids)
    if ids and ids[-1] in gen.info.special.eos_token_ids:
        ids.pop()
    return ids


def _seq2seq_maps(gen: Any, src_ids: Tensor, generated: list[int]) -> list[AttentionMap]:
    from deploylm.models.transformer import Seq2SeqTransformer

    model, tok = gen.backend.model, gen.tokenizer
    tgt = torch.tensor([[gen.info.special.decoder_start_token_id] + generated], device=src_ids.device)  # [1, T]
    mask = torch.ones_like(src_ids)
    if isinstance(model, Seq2SeqTransformer):
        maps = model.attention_maps(src_ids, mask, tgt)
        encoder, decoder, cross = maps["encoder"], maps["decoder"], maps["cross"]
    else:
        model.set_attn_implementation("eager")
        out = model(input_ids=src_ids, attention_mask=mask, decoder_input_ids=tgt, output_attentions=True)
        encoder, decoder, cross = (_returned(model, out, name) for name in
                                   ("encoder_attentions", "decoder_attentions", "cross_attentions"))
    source, target = token_labels(tok, src_ids[0].tolist()), token_labels(tok, tgt[0].tolist())
    return [AttentionMap("encoder", _first(encoder), source, source),
            AttentionMap("decoder", _first(decoder), target, target),
            AttentionMap("cross", _first(cross), target, source)]


def _causal_maps(gen: Any, ids: Tensor) -> list[AttentionMap]:
    from deploylm.models.causal_lm import CausalTransformerLM

    model = gen.backend.model
    if isinstance(model, CausalTransformerLM):
        weights = model.attention_maps(ids)
    else:
        model.set_attn_implementation("eager")
        weights = _returned(model, model(input_ids=ids, output_attentions=True), "attentions")
    labels = token_labels(gen.tokenizer, ids[0].tolist())
    return [AttentionMap("self", _first(weights), labels, labels)]


def _returned(model: Any, output: Any, name: str) -> Any:
    """output.<name>, the per-layer attention weights; a model that returns none (a state-space model such
    as Mamba has no attention layers) is a UsageError."""
    weights = getattr(output, name, None)
    if not weights or any(w is None for w in weights):
        raise UsageError(f"model {model.name_or_path!r}: {type(model).__name__} returns no attention weights "
                         f"for some or all of its layers (state-space or convolution layers have none): "
                         f"nothing to draw")
    return weights


def _first(per_layer: Any) -> list[Tensor]:
    """Per layer [1, H, Tq, Tk] -> per layer [H, Tq, Tk] float32 on the CPU."""
    return [w[0].detach().float().cpu() for w in per_layer]


def token_labels(tok: Any, ids: list[int]) -> list[str]:
    """A short readable label per token id: its text, or its vocabulary entry when the text is blank
    or only part of a character."""
    labels = []
    for i in ids:
        text = tok.decode([i], skip_special_tokens=False).strip()
        if not text or "\ufffd" in text:
            text = str(tok.convert_ids_to_tokens(i))
        labels.append(text[:MAX_LABEL])
    return labels


# ---- drawing ----------------------------------------------------------------------------------


def parse_layer(value: str) -> LayerChoice:
    """"all" or a layer index >= 0 (command-line form)."""
    return "all" if value == "all" else _index("--layer", value, "all")


def parse_head(value: str) -> HeadChoice:
    """"mean", "all" or a head index >= 0 (command-line form)."""
    return value if value in ("mean", "all") else _index("--head", value, "mean, all")


def _index(flag: str, value: str, words: str) -> int:
    try:
        index = int(value)
    except ValueError:
        index = -1
    if index < 0:
        raise UsageError(f"{flag} {value!r}: expected {words} or an index >= 0")
    return index


def panels(maps: list[AttentionMap], layer: LayerChoice = "all", head: HeadChoice = "mean") -> list[list[tuple[str, Tensor, AttentionMap]]]:
    """Grid rows (one per map and layer) of (title, [Tq, Tk] weights, map) panels, one per head shown."""
    _check_choice(maps, layer, head)
    rows = []
    for amap in maps:
        for index, weights in enumerate(amap.layers):                     # weights [H, Tq, Tk]
            if layer != "all" and index != layer:
                continue
            if head == "mean":
                rows.append([(f"{amap.kind} layer {index} (mean of heads)", weights.mean(0), amap)])
            else:
                heads = range(weights.shape[0]) if head == "all" else [head]
                rows.append([(f"{amap.kind} layer {index} head {h}", weights[h], amap) for h in heads])
    return rows


def _check_choice(maps: list[AttentionMap], layer: LayerChoice, head: HeadChoice) -> None:
    if layer != "all" and (isinstance(layer, bool) or not isinstance(layer, int) or layer < 0):
        raise UsageError(f"layer {layer!r}: expected 'all' or a layer index >= 0")
    if head not in ("mean", "all") and (isinstance(head, bool) or not isinstance(head, int) or head < 0):
        raise UsageError(f"head {head!r}: expected 'mean', 'all' or a head index >= 0")
    depth = max(len(m.layers) for m in maps)
    if layer != "all" and layer >= depth:
        raise UsageError(f"--layer {layer}: the model has {depth} layer(s), 0..{depth - 1}")
    heads = min(w.shape[0] for m in maps for w in m.layers)
    if isinstance(head, int) and head >= heads:
        raise UsageError(f"--head {head}: the model has {heads} head(s), 0..{heads - 1}")


def draw_attention(maps: list[AttentionMap], out: str | Path, *, layer: LayerChoice = "all",
                   head: HeadChoice = "mean") -> Path:
    """Draw the chosen panels as a PNG grid with token labels; written atomically to `out`."""
    out = check_png_path(out)
    figure_class = require_matplotlib()
    grid = panels(maps, layer, head)
    tokens = max(max(len(m.queries), len(m.keys)) for m in maps)
    cell = min(10.0, max(2.5, 0.2 * tokens + 1.0))                        # inches per panel
    columns = max(len(row) for row in grid)
    # + COLORBAR_INCHES: the colorbar gets its own room (a one-column figure gave it the panels' titles)
    fig = figure_class(figsize=(cell * columns + COLORBAR_INCHES, cell * len(grid)), layout="constrained")
    axes = fig.subplots(len(grid), columns, squeeze=False)
    image = None
    for r, row in enumerate(grid):
        for c in range(columns):
            if c >= len(row):
                axes[r][c].axis("off")
                continue
            title, weights, amap = row[c]
            image = axes[r][c].imshow(weights.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            _label_axes(axes[r][c], title, amap)
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    from deploylm.fsutil import remove_stale_temporaries, write_atomic

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    remove_stale_temporaries(out)            # half-written pictures of runs that were killed outright
    return write_atomic(out, buffer.getvalue())


def _label_axes(ax: Any, title: str, amap: AttentionMap) -> None:
    ax.set_title(title, fontsize=9)
    for labels, set_ticks, set_labels, rotation in ((amap.keys, ax.set_xticks, ax.set_xticklabels, 90),
                                                    (amap.queries, ax.set_yticks, ax.set_yticklabels, 0)):
        step = max(1, -(-len(labels) // MAX_TICKS))
        positions = list(range(0, len(labels), step))
        set_ticks(positions)
        set_labels([labels[i] for i in positions], fontsize=7, rotation=rotation)
    ax.set_xlabel("key (attended to)", fontsize=8)
    ax.set_ylabel("query", fontsize=8)


def check_png_path(out: str | Path) -> Path:
    """`out` as a Path ending in .png in an existing folder that takes a new file."""
    from deploylm.fsutil import check_output_file

    return check_output_file(out, "--out", ".png")


def require_matplotlib() -> Any:
    """matplotlib's Figure class (drawn without pyplot, so no display or global state is touched)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingDependencyError("drawing attention maps needs matplotlib: pip install 'deploylm[plot]'") from None
    return Figure
