"""`deploylm serve`: an HTTP JSON API over one model, with request batching and streaming."""
from __future__ import annotations

import math

import click

from deploylm.commands._options import quiet_transformers, spin_option, threads_option


@click.command("serve")
@click.option("--model", "src", required=True, metavar="SRC", help="Artifact, checkpoint, Hugging Face folder or .gguf.")
@click.option("--backend", type=click.Choice(["torch", "onnx", "trt"]), default=None,
              help="Backend (default: onnx for an artifact, torch otherwise).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port to listen on (0: a free one, named in the `serving ... on` line).")
@click.option("--max-batch-size", type=click.IntRange(1), default=8, show_default=True,
              help="Prompts decoded together in one batch.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              callback=lambda c, p, v: _finite(p, v), help="How long a request waits for others to batch with.")
@click.option("--max-queue", type=click.IntRange(1), default=64, show_default=True,
              help="Requests waiting to be decoded; beyond: 503 with Retry-After.")
@click.option("--max-streams", type=click.IntRange(1), default=16, show_default=True,
              help="Concurrent streaming responses; beyond: 503 with Retry-After.")
@click.option("--max-prompt-tokens", type=click.IntRange(1), default=512, show_default=True,
              help="Tokens per prompt; beyond: 400.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=256, show_default=True,
              help="The largest max_new_tokens a request may ask for (also caps the default).")
@click.option("--max-beams", type=click.IntRange(1), default=16, show_default=True,
              help="The largest num_beams / best_of and num_return_sequences / n a request may ask for "
                   "(also caps the defaults).")
@click.option("--max-body-bytes", type=click.IntRange(1), default=1 << 20, show_default=True,
              help="Request body size; beyond: 413.")
@click.option("--drain-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              callback=lambda c, p, v: _finite(p, v, inf_ok=True),
              help="Seconds in-flight requests get to finish after SIGTERM.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="uvicorn's and deploylm's log (info: one access line per request).")
@threads_option
@spin_option
def command(src: str, backend: str | None, host: str, port: int, drain_timeout: float, log_level: str,
            threads: int | None, spin: bool, **limits: int | float) -> None:
    """Serve SRC over HTTP: POST /v1/generate, POST /v1/completions, GET /v1/models, GET /health."""
    import deploylm
    from deploylm.commands.generate import backend_options
    from deploylm.serving import ServeConfig, serve
    from deploylm.serving.server import bind_address, check_address, describe_model, require_serving

    require_serving()                      # before minutes of loading, and before "serving ... on" is printed
    sock = None
    if port == 0:                          # the system's choice of a free port, held from now on and printed
        sock = bind_address(host, port)
        port = sock.getsockname()[1]
    else:
        check_address(host, port)
    quiet_transformers()                   # no weight-loading bars in the server's log
    generator = deploylm.load(src, backend=backend, **backend_options(src, backend, "cpu", "float32", spin, threads))
    summary = describe_model(src, generator)
    config = ServeConfig(model_name=summary["name"],
                         drain_timeout_s=drain_timeout, model_summary=summary, **limits)
    shown = f"[{host}]" if ":" in host else host            # an IPv6 address in a URL is bracketed
    click.echo(f"serving {src} ({summary['backend']}) on http://{shown}:{port}", err=True)
    serve(generator, config, host=host, port=port, log_level=log_level, sock=sock)


def _finite(param: click.Parameter, value: float, inf_ok: bool = False) -> float:
    """FloatRange lets nan through (every comparison with it is false), and inf: a wait of nan or inf ms
    never ends, so every request would hang. A drain of inf is "wait for them all" (a second SIGTERM cuts it)."""
    if math.isnan(value) or (math.isinf(value) and not inf_ok):
        raise click.BadParameter(f"{value} is not a finite number")
    return value
