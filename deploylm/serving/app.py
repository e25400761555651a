"""The ASGI app (Starlette): /v1/generate, /v1/completions, /v1/models, /health over one Generator.

Non-streaming requests go through the Batcher; streaming requests run `Generator.stream` on their
own thread. Every error is `{"error": {"message", "type", "param"}}` with a 4xx/5xx status.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import re
import threading
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from deploylm.errors import PROMPT_NUMBER, DeployLMError, Interrupted, MissingDependencyError, UsageError
from deploylm.serving.batcher import Batcher, QueueFull, StopSignal
from deploylm.serving.middleware import RequestMiddleware, ServerState, request_id_of
from deploylm.serving.schemas import ApiError, Job, ServeConfig, parse_completion, parse_generate, parse_json_body
from deploylm.serving.streaming import StreamSlot, sse, stream_pieces

if TYPE_CHECKING:
    from deploylm.generator import TextStream

log = logging.getLogger("deploylm.serve")


def _starlette():
    try:
        import starlette.applications  # noqa: F401
        import starlette.responses  # noqa: F401
        import starlette.routing  # noqa: F401
    except ImportError:
        raise MissingDependencyError("serving needs starlette and uvicorn: pip install 'deploylm[serve]'") from None
    return starlette


def token_counter(generator: Any) -> Callable[[str], int]:
    """How many tokens a prompt has, by the generator's tokenizer (bytes as an upper bound if none)."""
    if callable(getattr(generator, "count_tokens", None)):
        return generator.count_tokens
    tokenizer = getattr(generator, "tokenizer", None)
    if tokenizer is not None and callable(getattr(tokenizer, "encode", None)):
        return lambda text: len(tokenizer.encode(text))
    return lambda text: len(text.encode("utf-8"))


def window_room(generator: Any) -> Callable[[int], int | None] | None:
    """A prompt's tokens -> the most new tokens the generator's model has room for after it (None: no window known)."""
    from deploylm.long_inputs import new_token_room

    info = getattr(generator, "info", None)
    if getattr(info, "max_positions", None) is None and getattr(info, "engine", None) is None:
        return None
    return functools.partial(new_token_room, info)


def describe_generator(generator: Any) -> dict[str, Any]:
    """What a generator says of itself (for an app made by create_app without a model_summary): its model's
    name, its backend and the model's shape."""
    info = getattr(generator, "info", None)
    summary: dict[str, Any] = {"name": getattr(info, "name", None) or "model",
                               "backend": getattr(getattr(generator, "backend", None), "name", None)}
    if info is not None:
        summary.update(is_encoder_decoder=info.is_encoder_decoder, vocab_size=info.vocab_size,
                       max_positions=info.max_positions)
    return summary


def _described(config: ServeConfig, generator: Any) -> ServeConfig:
    """The config with the generator's own description where the caller gave none (`deploylm serve` gives its
    source's): GET /v1/models and /health then name the model and its backend, not "model" and {}."""
    if config.model_summary:
        return config
    summary = describe_generator(generator)
    name = config.model_name if config.model_name != ServeConfig.model_name else summary["name"]
    return dataclasses.replace(config, model_name=name, model_summary={**summary, "name": name})


def create_app(generator: Any, config: ServeConfig | None = None) -> Any:
    """The ASGI app serving `generator` (anything with generate/stream as deploylm.Generator)."""
    _starlette()
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Route

    config = _described(config or ServeConfig(), generator)
    state = ServerState()
    api = _Api(generator, config, state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        api.start()
        try:
            yield
        finally:
            await api.stop()

    async def http_error(request: Any, exc: HTTPException) -> Any:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                        type=kind, headers=dict(exc.headers or {})))   # a 405's Allow

    routes = [Route("/health", api.health, methods=["GET"]),
              Route("/v1/models", api.models, methods=["GET"]),
              Route("/v1/models/{model_id:path}", api.model, methods=["GET"]),
              Route("/v1/generate", api.generate, methods=["POST"]),
              Route("/v1/completions", api.completions, methods=["POST"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.state.serve = state
    app.state.api = api
    served = RequestMiddleware(app, state)
    # Mounted in another app, this app's own lifespan does not run (Starlette runs only the outer one's): the
    # outer app passes it on, `Starlette(..., lifespan=served.lifespan)` or `async with served.lifespan(app):`
    # in its own, so its shutdown finishes the queued requests and stops the batcher's thread.
    served.lifespan = lifespan
    return served


STREAM_STEP_WAIT_S = 10.0   # at shutdown: how long the threads of streams whose clients left get to end their step

SHUTTING_DOWN = ApiError(503, "server is shutting down: this request was not finished; retry on another instance",
                         type="unavailable", headers={"retry-after": "1", "connection": "close"})  # as the drain's 503s


class _Api:
    """Route handlers sharing the generator, the batcher and the limits."""

    def __init__(self, generator: Any, config: ServeConfig, state: ServerState) -> None:
        self.generator, self.config, self.state = generator, config, state
        self.count_tokens = token_counter(generator)
        self.defaults = getattr(generator, "defaults", None)  # the model's decoding defaults, if any
        self.room = window_room(generator)
        self.batcher: Batcher | None = None

    def start(self) -> None:
        if self.batcher is not None:   # started on the loop of a server that is gone: its worker task went
            self.batcher.abandon()     # with that loop; its thread goes now
        self.batcher = Batcher(lambda prompts, options, stop: self.generator.generate(prompts, stop=stop, **options),
                               max_batch_size=self.config.max_batch_size, max_wait_ms=self.config.max_wait_ms,
                               max_queue=self.config.max_queue, stop=self.state.stop_decoding)
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()
            self.batcher = None
        await self._streams_ended(STREAM_STEP_WAIT_S)

    async def _streams_ended(self, timeout_s: float) -> None:
        """Wait until every stream's thread has ended. Their responses are over by now, but a thread whose
        client left is still in its current step on the model (it stops after it): the server must not be
        gone (the process exiting around a daemon thread inside the backend) before it is done."""
        deadline = time.monotonic() + timeout_s
        while self.state.active_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if self.state.active_streams:
            log.warning("%d stream(s) still decoding after %.0fs at shutdown", self.state.active_streams, timeout_s)

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        b = self.batcher
        others = max(0, self.state.in_flight - 1)     # this /health request is in flight too: not counted
        return JSONResponse({"status": "ok", "model": self.config.model_name, "in_flight": others,
                             "queued": b.queued if b else 0, "decoding": b.decoding if b else 0,
                             "batches": b.batches if b else 0, "active_streams": self.state.active_streams})

    def _model_entry(self) -> dict[str, Any]:
        return {"id": self.config.model_name, "object": "model", "created": self.state.started, "owned_by": "deploylm",
                "deploylm": self.config.model_summary}

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"object": "list", "data": [self._model_entry()]})

    async def model(self, request: Any) -> Any:
        """GET /v1/models/{id} (OpenAI's models.retrieve): the served model, or 404 for another id."""
        from starlette.responses import JSONResponse

        wanted = request.path_params["model_id"]
        if wanted != self.config.model_name:
            return _error_response(ApiError(404, f"model {wanted!r} is not served here: this server serves "
                                            f"{self.config.model_name!r}", type="not_found_error", param="model"))
        return JSONResponse(self._model_entry())

    async def generate(self, request: Any) -> Any:
        return await self._handle(request, parse_generate, self._generate_body, self._generate_events)

    async def completions(self, request: Any) -> Any:
        return await self._handle(request, parse_completion, self._completion_body, self._completion_events)

    async def _handle(self, request: Any, parse: Callable, render: Callable, events: Callable) -> Any:
        from starlette.responses import JSONResponse, Response

        rid = request_id_of(request.scope)
        try:
            body = parse_json_body(await _read_body(request, self.config.max_body_bytes))
            # tokenizing a long prompt takes ~0.1 s: off the event loop, so /health and others go on
            job = await asyncio.to_thread(parse, body, self.config, self.count_tokens, self.defaults, self.room)
            # the model's own checks on this request alone: a batch (or a chunk of a long request) would number
            # its prompts among the others'
            await asyncio.to_thread(self._precheck, job)
            if job.stream:
                slot = self._reserve_stream()
                guarded = self._guarded(events(job, rid, slot), functools.partial(_refusal, body=body, parse=parse),
                                        rid, done=parse is parse_completion)
                return _StreamSlotResponse(slot.drop, guarded,
                                           media_type="text/event-stream", headers={"cache-control": "no-cache"})
            results = await self._decode(request, job, rid)
            if results is None:  # client went away; nobody reads this
                return Response(status_code=499)
            return JSONResponse(render(job, results, rid))
        except ApiError as exc:
            return _error_response(exc)
        except UsageError as exc:  # the generator refused the input (e.g. longer than the model's window)
            return _error_response(_refusal(exc, body=body, parse=parse))
        except Interrupted:
            return _error_response(SHUTTING_DOWN)
        except DeployLMError as exc:   # the model's own failure (a numerical overflow): its line, and in the log
            log.warning("%s request failed: %s", rid, exc)
            return _error_response(ApiError(500, str(exc), type="server_error"))
        except Exception as exc:  # noqa: BLE001 - a bug or a backend failure: log it, answer 500
            log.exception("%s request failed", rid)
            return _error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                            type="server_error"))

    async def _decode(self, request: Any, job: Job, rid: str) -> list[Any] | None:
        if self.batcher is None or not self.batcher.runs_on(asyncio.get_running_loop()):
            # the lifespan did not run (an app mounted in another whose lifespan does not pass it on): the batcher
            # starts with the first request instead, and again under a later server of the same app (another
            # event loop: the first one's worker task is gone with its loop)
            self.start()
        assert self.batcher is not None
        try:
            future = self.batcher.submit(job, rid)
        except QueueFull as exc:
            raise ApiError(503, f"server is busy ({exc}): retry later", type="server_overloaded",
                           headers={"retry-after": "1"}) from None
        watcher = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not future.done():
                self.batcher.cancel(future)
                log.info("%s client disconnected before its result; request dropped", rid)
        return future.result() if not future.cancelled() else None

    def _precheck(self, job: Job) -> None:
        """Refuse (400) what the generator would refuse (prompt over the window, sequence_bias past the
        vocabulary, ...) before the 200 and a stream's first event go out: `Generator.check`."""
        check = getattr(self.generator, "check", None)
        if callable(check):
            check(list(job.prompts), **job.options)

    def _reserve_stream(self) -> StreamSlot:
        if self.state.active_streams >= self.config.max_streams:
            raise ApiError(503, f"server is busy ({self.state.active_streams} streams open, limit "
                           f"{self.config.max_streams}): retry later", type="server_overloaded",
                           headers={"retry-after": "1"})
        self.state.active_streams += 1
        return StreamSlot(self._release_stream)

    def _release_stream(self) -> None:
        self.state.active_streams -= 1

    async def _guarded(self, events: AsyncIterator[bytes], refusal: Callable[[UsageError], ApiError], rid: str,
                       done: bool = False) -> AsyncIterator[bytes]:
        """Pass the events through; a failure after the headers went out becomes a final error event, followed
        by `data: [DONE]` where the stream's protocol ends with it (`done`: completions, as vLLM's OpenAI server
        does: a client reading to [DONE] is not left waiting on an error it does not parse). A failure is logged with
        the request id `rid`, as a 500 without streaming is: the operator can find the request it was.

        Between two events the event loop runs once: pieces that arrived together would otherwise be
        written back to back without it ever reading the socket, so after a client left, every write of
        the burst went to the closed connection (asyncio logs "socket.send() raised exception." for each)."""
        try:
            async for chunk in events:
                yield chunk
                await asyncio.sleep(0)   # lets the loop see a disconnect (uvicorn then drops our writes)
        except (ApiError, UsageError) as exc:
            yield sse((exc if isinstance(exc, ApiError) else refusal(exc)).body())   # as without streaming
        except Interrupted:       # the drain is over: the stream ends after its current step
            yield sse(SHUTTING_DOWN.body())
        except DeployLMError as exc:   # the model's own failure (a numerical overflow): its line, as without stream
            log.warning("%s stream failed: %s", rid, exc)
            yield sse(ApiError(500, str(exc), type="server_error").body())
        except Exception as exc:  # noqa: BLE001 - headers are sent: the error becomes the last event
            log.exception("%s stream failed", rid)
            yield sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body())
        else:
            return
        if done:
            yield sse("[DONE]")

    def _pieces(self, job: Job, opened: list[TextStream], slot: StreamSlot) -> AsyncIterator[str]:
        """The text pieces of the job's stream; the TextStream lands in `opened` (its finish_reason)."""
        def start(left: threading.Event) -> TextStream:   # stops after its current step once the drain is
            stop = StopSignal(self.state.stop_decoding, abandoned=left)   # over or the client has left
            opened.append(self.generator.stream(job.prompts[0], stop=stop, **job.options))
            return opened[0]

        return stream_pieces(start, slot)

    async def _generate_events(self, job: Job, rid: str, slot: StreamSlot) -> AsyncIterator[bytes]:
        text: list[str] = []
        opened: list[TextStream] = []
        async for piece in self._pieces(job, opened, slot):
            text.append(piece)
            yield sse({"text": piece})
        yield sse({"done": True, "prompt": job.prompts[0], "text": "".join(text),
                   "finish_reason": opened[0].finish_reason})

    async def _completion_events(self, job: Job, rid: str, slot: StreamSlot) -> AsyncIterator[bytes]:
        head = {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_name}
        opened: list[TextStream] = []
        async for piece in self._pieces(job, opened, slot):
            yield sse({**head, "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}]})
        yield sse({**head, "choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": opened[0].finish_reason}]})
        yield sse("[DONE]")

    def _generate_body(self, job: Job, results: list[Any], rid: str) -> dict[str, Any]:
        return {"results": [{"prompt": prompt, "outputs": [_output(s) for s in result.sequences]}
                            for prompt, result in zip(job.prompts, results)]}

    def _completion_body(self, job: Job, results: list[Any], rid: str) -> dict[str, Any]:
        choices, completion_tokens = [], 0
        for result in results:
            for seq in result.sequences:
                n = len(seq.token_ids)
                completion_tokens += n
                choices.append({"text": seq.text, "index": len(choices), "logprobs": None,
                                "finish_reason": self.generator.finish_reason(seq.token_ids, job.max_new_tokens)})
        prompt_tokens = sum(self.count_tokens(p) for p in job.prompts)
        return {"id": f"cmpl-{rid}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


@functools.lru_cache(maxsize=None)
def _stream_slot_response() -> Any:
    from starlette.responses import StreamingResponse

    class StreamSlotResponse(StreamingResponse):
        """A streaming response that releases its stream slot however it ends (even unstarted)."""

        def __init__(self, release: Callable[[], None], *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._release = release

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self._release()

    return StreamSlotResponse


def _StreamSlotResponse(release: Callable[[], None], *args: Any, **kwargs: Any) -> Any:
    return _stream_slot_response()(release, *args, **kwargs)


def _refusal(exc: UsageError, *, body: Any, parse: Callable) -> ApiError:
    """The 400 for the generator's refusal of a request (`body`, read by `parse`), streamed or not: its prompts named
    by their JSON paths, without truncation advice (no truncation option here), and in the endpoint's own terms
    (completions: max_tokens), with the option it is about as `param`."""
    from deploylm.decoding.options import option_names
    from deploylm.long_inputs import without_truncation_advice

    message = _json_paths(without_truncation_advice(str(exc)), _listed(body))
    param = "prompt" if message.startswith("prompt") else next(  # the option it names first, if any
        (name for name in sorted(option_names(), key=len, reverse=True) if message.startswith(name)), None)
    field = "max_tokens" if parse is parse_completion else "max_new_tokens"   # the field a client sends
    if body.get(field) is None and "max_new_tokens=" in message:   # the default (null: not given): say so
        message += f" (the default: the request left {field} out)"
    if parse is parse_completion:
        message = message.replace("max_new_tokens", "max_tokens")
        param = "max_tokens" if param == "max_new_tokens" else param
    return ApiError(400, message, param=param)


def _listed(body: Any) -> bool:
    """Whether the request gave its prompts as a JSON list (else one string)."""
    return not isinstance(body.get("prompt"), str)


def _json_paths(message: str, listed: bool) -> str:
    """The generator's "prompt N" (1-based, as `deploylm generate` numbers prompts) as the JSON path of that
    prompt in the request, the way the server's own checks name it: prompt[N-1] in a list, prompt alone for a
    single string. One endpoint then answers in one style."""
    def path(match: re.Match) -> str:
        name = match.group(0).rsplit(" ", 1)[0]          # "prompt" or "of prompt"
        return name + (f"[{int(match.group(1)) - 1}]" if listed else "")

    return PROMPT_NUMBER.sub(path, message)


def _output(seq: Any) -> dict[str, Any]:
    score = float(seq.score)
    return {"text": seq.text, "token_ids": [int(t) for t in seq.token_ids],
            "score": score if math.isfinite(score) else None}


def _error_response(exc: ApiError) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _read_body(request: Any, limit: int) -> bytes:
    """The request body, refusing (413) more than `limit` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"Content-Length {declared!r} is not a number")
        if int(declared) > limit:
            raise ApiError(413, f"request body has {declared} bytes, over this server's limit of {limit}")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"request body is over this server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _wait_disconnect(request: Any) -> None:
    """Return when the client disconnects (the body is already read, so receive() waits for that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
