"""Run the app under uvicorn with a graceful, draining shutdown.

On the first SIGTERM/SIGINT the server starts draining: new requests get 503 (Retry-After,
Connection: close) while in-flight ones finish (up to `drain_timeout_s`). Decodes still running
then stop after their current step and answer 503, and uvicorn's own shutdown closes the sockets
within GRACE_AFTER_DRAIN_S. A second signal stops the decodes at once (a second SIGINT also forces
uvicorn's exit).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from deploylm.errors import MissingDependencyError, UsageError
from deploylm.serving.app import create_app, describe_generator
from deploylm.serving.middleware import ServerState
from deploylm.serving.schemas import ServeConfig

log = logging.getLogger("deploylm.serve")

GRACE_AFTER_DRAIN_S = 2   # uvicorn's wait for connections once the drain is over (or the drain timed out)


def _uvicorn() -> Any:
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("serving needs starlette and uvicorn: pip install 'deploylm[serve]'") from None
    return uvicorn


def make_server(generator: Any, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
                log_level: str = "info") -> Any:
    """A uvicorn.Server for `generator`, draining on SIGTERM; `.run()` blocks until shut down."""
    uvicorn = _uvicorn()
    app = create_app(generator, config)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if app.state.draining or self.should_exit:
                app.state.stop_decoding.set()    # second signal: stop decoding now, and uvicorn's behaviour
                super().handle_exit(sig, frame)  # (a second SIGINT forces the exit)
                return
            self._captured_signals.append(sig)
            begin_drain(app.state, self, config.drain_timeout_s)

    # The drain already gave in-flight requests their time; uvicorn's own wait for open connections
    # afterwards only has to let the stopped ones send their 503 (it used to wait another drain_timeout).
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                               timeout_graceful_shutdown=GRACE_AFTER_DRAIN_S, lifespan="on")
    return DrainingServer(uv_config)


def begin_drain(state: ServerState, server: Any, timeout_s: float) -> threading.Thread:
    """Refuse new requests now; tell `server` to exit once nothing is in flight (or after timeout_s)."""
    state.draining = True
    log.info("draining: %d request(s) in flight, new requests get 503", state.in_flight)

    def wait_then_exit() -> None:
        if not state.idle.wait(timeout_s):
            log.warning("drain timeout (%.0fs): %d request(s) still in flight get 503 after their current "
                        "step", timeout_s, state.in_flight)
            state.stop_decoding.set()
        server.should_exit = True

    thread = threading.Thread(target=wait_then_exit, name="deploylm-drain", daemon=True)
    thread.start()
    return thread


def check_address(host: str, port: int) -> None:
    """UsageError unless `host:port` can be listened on now: uvicorn finds a taken port only after
    its startup, then logs it and exits 3."""
    bind_address(host, port).close()


def bind_address(host: str, port: int) -> Any:
    """A socket bound to `host:port` (not yet listening), or a UsageError naming --host or --port. With port 0
    the system picks a free port (`sock.getsockname()[1]`); `serve(..., sock=...)` then listens on it."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UsageError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn binds
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"--port {port}: already in use on {host}: stop what listens there or choose "
                             "another --port") from None
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror}): check --host and --port") from None
    return sock


def serve(generator: Any, config: ServeConfig, *, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", sock: Any = None) -> None:
    """Serve `generator` over HTTP until SIGTERM/SIGINT (blocking); on `sock` (from bind_address) if given."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    make_server(generator, config, host=host, port=port, log_level=log_level).run(
        sockets=None if sock is None else [sock])


def describe_model(src: str, generator: Any) -> dict[str, Any]:
    """What GET /v1/models shows: the source, backend and model shape; an artifact's manifest summary."""
    from deploylm.models.source import resolve_source

    source = resolve_source(src)
    summary = {**describe_generator(generator), "name": source.name,
               "source": {"kind": source.kind, "name": source.path.name}}
    if source.kind == "artifact":
        from deploylm.artifact import read_manifest

        m = read_manifest(source.path)
        profile = m.get("profile") if isinstance(m.get("profile"), dict) else {}
        summary["manifest"] = {"format_version": m.get("format_version"),
                               "deploylm_version": m.get("deploylm_version"), "created": m.get("created"),
                               "profile": {k: profile.get(k) for k in ("name", "precision", "backends")},
                               "source": _without_paths(m.get("source")), "parity": m.get("parity")}
    return summary


def _without_paths(source: Any) -> Any:
    """A manifest's source record as clients may see it: no file system paths of the serving machine."""
    if not isinstance(source, dict):
        return source
    return {k: (Path(v).name if k == "path" and isinstance(v, str) else v) for k, v in source.items()}


def require_serving() -> None:
    """MissingDependencyError now (before a model is loaded) unless starlette and uvicorn import."""
    from deploylm.serving.app import _starlette

    _starlette()
    _uvicorn()
