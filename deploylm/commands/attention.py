"""`deploylm attention`: draw a model's attention weights on a text as a PNG (seed §8.3.1)."""
from __future__ import annotations

import click

from deploylm.commands._options import INT, quiet_transformers
from deploylm.errors import UsageError


@click.command(name="attention")
@click.option("--model", "src", metavar="SRC", help="Checkpoint, Hugging Face folder or .gguf file. Required.")
@click.argument("text", required=False)
@click.option("--out", metavar="FILE.png", help="The PNG to write. Required.")
@click.option("--layer", default="all", show_default=True, help="Layer index (0-based) or all.")
@click.option("--head", default="mean", show_default=True, help="Head index, mean (average of heads) or all (a panel per head).")
@click.option("--max-new-tokens", type=INT, default=16, show_default=True,
              help="Tokens generated greedily and included in the decoder maps (0: the text only).")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
def command(src, text, out, layer, head, max_new_tokens, device) -> None:
    """Draw the attention weights of SRC on TEXT (encoder, decoder and cross for encoder-decoders)."""
    if not src:
        raise UsageError("--model SRC is required: a checkpoint, Hugging Face folder or .gguf file")
    if text is None:
        raise UsageError("TEXT is required: the text whose attention to draw")
    if not out:
        raise UsageError("--out FILE.png is required: the image to write")
    from deploylm import attention

    layer_choice, head_choice = attention.parse_layer(layer), attention.parse_head(head)
    attention.check_png_path(out)
    attention.require_matplotlib()                 # fail before the model loads
    quiet_transformers()
    maps = attention.attention_maps(src, text, max_new_tokens=max_new_tokens, device=device)
    path = attention.draw_attention(maps, out, layer=layer_choice, head=head_choice)
    shapes = ", ".join(f"{m.kind} {len(m.layers)}x{tuple(m.layers[0].shape)}" for m in maps)
    click.echo(f"attention maps: {path}  ({shapes}; layers x [heads, queries, keys])")
