"""The Python API (DESIGN.md §3): `load(src)` -> Generator; `generate` and `stream` over the one decoder.

Decoding options are flat keywords (DecodingOptions fields); a temperature, top_k or top_p given to a call that
does not sample is ignored with a UserWarning, as in transformers (a seed silently). Precedence, highest first:
  1. the keywords of the call (`gen.generate(p, num_beams=2)`),
  2. the model's defaults (an artifact's manifest/generation_config, a Hugging Face
     generation_config.json, a checkpoint's generation_config.json: num_beams, max_new_tokens, ...),
  3. DecodingOptions' own defaults.
Prompts are tokenized as a transformers user would (`tokenizer(prompts, padding=True)`): left padding
for decoder-only models, right for encoder-decoders, the tokenizer's own special tokens and nothing
more. Outputs are decoded with `skip_special_tokens=True`.

Prompts longer than the model's window are refused unless the call passes `truncation="left"|"right"`
(or `"sliding-window"` for encoder-decoders, with `window_overlap`): see deploylm.long_inputs. These
are keywords of `generate`/`stream`, not DecodingOptions: they shape the input, not the search.

Thread safety: each Generator holds a `threading.Lock` around every use of its backend (a whole
`generate` call, or a whole stream's decode, which runs on the stream's own thread), so concurrent calls
are safe and run one at a time;
a second lock, held only for the moment of each tokenizer call, guards the tokenizer (so
`count_tokens` and `encode` do not wait for a running generation).
"""
from __future__ import annotations

import atexit
import contextlib
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping
from typing import Generator as PieceStream  # the class below is named Generator

from deploylm.backends import Backend, EncodedBatch, backend_class
from deploylm.decoding.options import SAMPLING_ONLY, DecodingOptions, option_names
from deploylm.errors import Interrupted, OptionError, UsageError
from deploylm.long_inputs import (LongInputs, check_fits, concat_rows, encoding, join_parts, join_texts,
                                  prompt_budget, split_rows, tokenize, tokenize_windows)
from deploylm.models.source import Source, resolve_source
from deploylm.models.tokenizer import pad_like_the_model

if TYPE_CHECKING:
    from torch import Tensor

    from deploylm.decoding.search import SearchStats

WINDOW_ROWS = 8  # sliding-window chunks decoded together (at least the caller's prompt count)


@dataclass(frozen=True)
class Sequence:
    """One output: its text, the generated token ids (no prompt; EOS included when produced), its score."""

    text: str
    token_ids: tuple[int, ...]
    score: float


@dataclass(frozen=True)
class Result:
    """The outputs for one prompt, best first (`num_return_sequences` of them)."""

    prompt: str
    sequences: list[Sequence]


def _settled(text: str) -> str:
    """The part of a space-cleaned text that later tokens cannot rewrite. transformers' cleanup drops the space
    before ". ? ! ," and "' ", "n't", "'m", "'s", "'ve", "'re": at most three characters decide whether a space
    goes, so only a space among the last three characters may still be dropped; text without one (Chinese,
    Japanese) streams token by token."""
    tail = len(text) - 3
    space = text.find(" ", max(tail, 0))
    return text if space < 0 else text[:space]


class _Pieces:
    """A growing output text handed out in pieces once final: held back while it ends in a half-decoded character
    (U+FFFD), and, for a tokenizer that cleans up spaces (" n't" -> "n't", " ," -> ",": T5's, Marian's), before a
    space later tokens may still drop (_settled). `emitted` is what went out so far."""

    def __init__(self, tokenizer: Any) -> None:
        self.cleans = getattr(tokenizer, "clean_up_tokenization_spaces", False) is True
        self.emitted = ""

    def ready(self, text: str) -> str:
        """The piece of `text` past what went out that later tokens cannot change; "" while there is none."""
        ready = _settled(text) if self.cleans else text
        if not (ready.startswith(self.emitted) and len(ready) > len(self.emitted) and not ready.endswith("\ufffd")):
            return ""
        piece, self.emitted = ready[len(self.emitted):], ready
        return piece

    def rest(self, text: str) -> str:
        """The end of the final `text` that has not gone out."""
        return text[len(self.emitted):] if text.startswith(self.emitted) else ""


def load(src: str | Path | Source, backend: str | None = None, **backend_options: Any) -> "Generator":
    """Open SRC (checkpoint, Hugging Face folder, .gguf file or artifact) with `backend`.

    backend: "torch" | "onnx" | "trt"; default "onnx" for an artifact, "torch" otherwise.
    backend_options go to the backend (torch: device="cpu"|"cuda", dtype="float32"|"float16"|"bfloat16"|"int8",
    int8 = dynamic quantization of the Linear layers, CPU only; threads=N PyTorch CPU threads, set with
    torch.set_num_threads: the loading thread's, and the count of every thread that first runs PyTorch later (a
    thread that ran it before keeps its own); onnx: device, threads=N intra-op threads, providers=[...] ONNX
    Runtime execution provider names (default: from device), opt_level="disable"|"basic"|"extended"|"all" graph
    optimizations, spin=True for ONNX Runtime threads that spin briefly between kernels: faster on idle cores, slower
    beside busy processes, see deploylm.backends.onnx_backend.create_session).
    """
    from deploylm.models.tokenizer import load_tokenizer

    source = src if isinstance(src, Source) else resolve_source(src)
    name = backend or ("onnx" if source.kind == "artifact" else "torch")
    if not isinstance(backend_options.get("spin", False), bool):   # spin="no" is truthy: it would turn spinning on
        raise UsageError(f"spin={backend_options['spin']!r}: expected True or False")
    if backend_options.get("spin") and name != "onnx":
        raise UsageError(f"spin=True applies to the onnx backend (ONNX Runtime's threads), not to {name!r}")
    opener = backend_class(name)                    # unknown name: UsageError listing them
    _check_backend_options(name, opener, backend_options)
    with _LOADING:   # one load at a time: transformers' lazy imports fail when two threads race through them
        opened = opener.from_source(source, **backend_options)
        tokenizer = load_tokenizer(source, light=source.kind == "artifact")   # artifacts: no transformers import
    where = {"artifact": f"{source.path / 'manifest.json'} ('generation')", "gguf": str(source.path)}.get(
        source.kind, str(source.path / "generation_config.json"))      # where the model's decoding defaults live
    return Generator(opened, tokenizer, defaults_from=where)


_LOADING = threading.Lock()


def _check_backend_options(name: str, opener: Any, options: Mapping[str, Any]) -> None:
    """Options the backend's from_source takes by name; spin=False goes with any backend (the CLI passes
    it). A misspelt or foreign option (dtype for onnx, say) would otherwise be dropped without a word."""
    import inspect

    takes = {p.name for p in inspect.signature(opener.from_source).parameters.values() if p.kind is p.KEYWORD_ONLY}
    unknown = sorted(k for k in options if k not in takes and not (k == "spin" and not options[k]))
    if unknown:
        raise UsageError(f"backend {name!r} takes no option {', '.join(map(repr, unknown))}: expected any of "
                         f"{', '.join(sorted(takes))}")


class Generator:
    """Generates text from prompts with one backend and its tokenizer; safe to share between threads."""

    def __init__(self, backend: Backend, tokenizer: Any, defaults: Mapping[str, Any] | None = None,
                 defaults_from: str | None = None) -> None:
        _check_backend(backend)
        self.backend = backend
        self.tokenizer = tokenizer
        self.info = backend.info
        model_defaults = defaults if defaults is not None else getattr(backend, "generation_defaults", {})
        known = {k: v for k, v in dict(model_defaults).items() if k in option_names()}
        try:
            self.defaults = _model_defaults(known)
        except UsageError as exc:   # the model's own defaults, not the caller's options: say where they come from
            raise UsageError(f"{defaults_from or self.info.name or 'the model'}: the model's default {exc}") from None
        pad_like_the_model(tokenizer, self.info.special)
        self._lock = BackendLock()               # held for every use of the backend
        self._tokenizer_lock = threading.Lock()  # held briefly for every tokenizer call

    def options(self, **options: Any) -> DecodingOptions:
        """The options a call with these keywords uses: call > model defaults > DecodingOptions defaults."""
        return self.defaults.replace(**options)

    def generate(self, prompts: str | list[str], *, truncation: str | None = None,
                 window_overlap: int | None = None, stats: "SearchStats | None" = None,
                 stop: threading.Event | None = None, **options: Any) -> list[Result]:
        """One Result per prompt, each with `num_return_sequences` sequences, best first.

        truncation: None (refuse prompts over the window) | "left" | "right" | "sliding-window"
        (encoder-decoder; chunks sharing `window_overlap` tokens, outputs joined) — deploylm.long_inputs.
        stats: a SearchStats filled in place with the decode loop's steps and timings (not sliding-window).
        stop: a threading.Event; once set, the decode ends after its current step with Interrupted (a server
        that shuts down does not wait for results nobody will read).
        """
        from deploylm.decoding.search import generate_ids

        texts = _prompt_list(prompts)
        _check_stop(stop, stats)
        opts = self.options(**options)
        _warn_ignored_sampling(options, opts)
        fit = LongInputs(truncation=truncation, window_overlap=window_overlap)
        if self._slides(fit):
            return self._generate_windows(texts, opts, fit.overlap, stop)
        batch = self.encode(texts, opts, truncation=fit.truncation)
        with self._lock, _memory_is_usage(len(texts), opts):
            hyps = generate_ids(self.backend, batch, opts, stats, stop)
        return [Result(prompt, [self._sequence(h.token_ids, h.score) for h in per_prompt])
                for prompt, per_prompt in zip(texts, hyps)]

    def check(self, prompts: str | list[str], *, truncation: str | None = None, window_overlap: int | None = None,
              stats: "SearchStats | None" = None, stop: threading.Event | None = None, **options: Any) -> None:
        """Raise the UsageError `generate` would raise before decoding (the options; an empty prompt, one over
        the window, one the tokenizer cannot encode; a sequence_bias past the vocabulary), without decoding:
        a caller with many batches refuses a bad input before any output goes out. It takes generate's
        keywords (`stop` and `stats` are only checked)."""
        from deploylm.decoding.processors import build_processors

        texts = _prompt_list(prompts)
        _check_stop(stop, stats)
        opts = self.options(**options)
        fit = LongInputs(truncation=truncation, window_overlap=window_overlap)
        if self._slides(fit):   # each window is a source of its own: the processors see each one
            for chunks in self._windows(texts, opts, fit.overlap):
                build_processors(opts, self.info, 1, encoder_input_ids=chunks.input_ids)
            return
        batch = self.encode(texts, opts, truncation=fit.truncation)
        build_processors(opts, self.info, 1 if self.info.is_encoder_decoder else batch.input_ids.shape[1],
                         encoder_input_ids=batch.input_ids)

    def stream(self, prompt: str, *, truncation: str | None = None, window_overlap: int | None = None,
               stop: threading.Event | None = None, **options: Any) -> TextStream:
        """The best output's text in pieces, each as soon as every live beam agrees on it (a TextStream:
        iterate it; once exhausted, its `finish_reason` says whether the output stopped or ran out of
        max_new_tokens).

        truncation/window_overlap as in `generate`; with "sliding-window" each piece is one decoded chunk.
        The decode runs on a thread of the stream's own, from the first read until the output ends (or the
        stream is closed), and holds the model for that long: other calls, the reading thread's own
        included, wait for it; a slow reader does not hold the model longer, and the stream can be read
        from any thread (a thread pool's workers in turn). `close()` (from any thread, or by leaving a
        `with gen.stream(...) as pieces:` block) ends the decode after its current step.
        stop: as in `generate`; once set, the stream raises Interrupted at its next read (and its decode
        ends after its current step).
        num_return_sequences must be 1: a stream is one text (generate returns several).
        """
        if not isinstance(prompt, str):
            raise UsageError(f"stream takes one prompt string, got {type(prompt).__name__}")
        _check_stop(stop)
        opts = self.options(**options)
        _warn_ignored_sampling(options, opts)
        if opts.num_return_sequences != 1:   # it would decode them all and stream one (the server refuses it too)
            raise UsageError(f"stream returns one sequence, the best: num_return_sequences={opts.num_return_sequences} "
                             "must be 1 (generate() returns several)")
        fit = LongInputs(truncation=truncation, window_overlap=window_overlap)
        closed = threading.Event()                 # set by TextStream.close(): the decode ends after its step
        either = _EitherSet(stop, closed)
        if self._slides(fit):
            return TextStream(self._stream_windows(prompt, opts, fit.overlap, either), closed, stop)
        batch = self.encode([prompt], opts, truncation=fit.truncation)
        return TextStream(self._stream_text(batch, opts, either), closed, stop)

    def finish_reason(self, token_ids: Any, max_new_tokens: int) -> str:
        """Why an output ended: "stop" (an end-of-sequence token, or fewer tokens than allowed) or "length"
        (max_new_tokens reached; also when the end token there is the one a generation_config's
        forced_eos_token_id forces at the limit: the model did not choose to stop)."""
        if len(token_ids) >= max_new_tokens and self.info.generation.get("forced_eos_token_id") is not None:
            return "length"
        ended = bool(token_ids) and int(token_ids[-1]) in self.info.special.eos_token_ids
        return "stop" if ended or len(token_ids) < max_new_tokens else "length"

    def _stream_text(self, batch: EncodedBatch, opts: DecodingOptions,
                     stop: threading.Event | None = None) -> PieceStream[str, None, str]:
        """The pieces of one prompt's best output; returns its finish reason."""
        from deploylm.decoding.search import STOPPED
        from deploylm.decoding.stream import stream_ids

        out = _Pieces(self.tokenizer)
        with self._lock, _memory_is_usage(1, opts):
            ids: list[int] = []
            text = ""
            for pieces in stream_ids(self.backend, batch, opts):
                if stop is not None and stop.is_set():
                    raise Interrupted(STOPPED)
                if not pieces[0]:
                    continue
                ids.extend(pieces[0])
                text = self.decode(ids)
                if piece := out.ready(text):
                    yield piece
            if rest := out.rest(text):
                yield rest
        return self.finish_reason(ids, opts.max_new_tokens)

    def encode(self, prompts: list[str], options: DecodingOptions | None = None,
               truncation: str | None = None) -> EncodedBatch:
        """Tokenize and pad `prompts` (left for decoder-only, right for encoder-decoder).

        Empty prompts are an error; with `options`, so is a prompt that cannot fit max_new_tokens more,
        unless `truncation` is "left" or "right": then such a prompt is cut from that side to fit.
        """
        texts = _prompt_list(prompts)
        side = "right" if self.info.is_encoder_decoder else "left"
        cut = truncation if truncation in ("left", "right") else None
        with self._tokenizer_lock:  # a Rust tokenizer's padding/truncation settings are shared state
            budget = None
            if options is not None and cut:   # the special tokens stay: the budget must hold them and some text
                budget = prompt_budget(self.info, options.max_new_tokens, self.tokenizer.num_special_tokens_to_add())
            batch = tokenize(self.tokenizer, texts, padding_side=side, max_length=budget, truncation_side=cut)
        self._check_lengths(batch, options)
        return batch

    def decode(self, token_ids: list[int] | tuple[int, ...]) -> str:
        """Text of generated ids, special tokens skipped."""
        with self._tokenizer_lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def count_tokens(self, text: str) -> int:
        """How many tokens `text` is as a prompt (the tokenizer's special tokens included)."""
        with self._tokenizer_lock, encoding(self.tokenizer, [text]):
            return len(self.tokenizer(text, verbose=False)["input_ids"])

    def _sequence(self, token_ids: tuple[int, ...], score: float) -> Sequence:
        return Sequence(self.decode(token_ids), tuple(int(t) for t in token_ids), float(score))

    def _check_lengths(self, batch: EncodedBatch, options: DecodingOptions | None) -> None:
        """Every prompt has tokens, and prompt + max_new_tokens fit the model's window (if bounded)."""
        lengths = batch.attention_mask.sum(dim=1).tolist()
        if 0 in lengths:
            raise UsageError(f"prompt {lengths.index(0) + 1} has no tokens after tokenization: give some text")
        self._check_vocabulary([batch.input_ids[i][batch.attention_mask[i].bool()] for i in range(len(lengths))])
        if options is not None:
            check_fits(lengths, self.info, options.max_new_tokens)

    def _check_vocabulary(self, per_prompt: list[Tensor]) -> None:
        """Every token id of every prompt is a row of the model's embedding: a tokenizer that belongs to
        another model gives ids past it (IndexError deep in the model, or garbage from a graph)."""
        vocab = self.info.vocab_size
        for index, ids in enumerate(per_prompt):
            bad = int(ids.max()) if ids.numel() else -1
            if bad >= vocab:
                with self._tokenizer_lock:
                    piece = self.tokenizer.decode([bad])
                raise UsageError(f"prompt {index + 1} has token id {bad} ({piece!r}), outside the model's vocabulary "
                                 f"of {vocab} ids: the tokenizer does not belong to this model (its folder's "
                                 "tokenizer files and config.json's vocab_size disagree)")

    # -- sliding window (encoder-decoder) -------------------------------------------------------
    def _slides(self, fit: LongInputs) -> bool:
        """True when this call decodes windows; "sliding-window" on a decoder-only model is an error."""
        if fit.truncation != "sliding-window":
            return False
        if not self.info.is_encoder_decoder:
            raise OptionError(f"truncation='sliding-window' splits the source of an encoder-decoder model; "
                              f"{self.info.name!r} is decoder-only: use truncation='left' or 'right'", "truncation")
        return self.info.max_positions is not None  # an unbounded encoder: every source fits as it is

    def _windows(self, texts: list[str], opts: DecodingOptions, overlap: int) -> list[EncodedBatch]:
        """Per text, its chunks [C, <= window] (right-padded), consecutive chunks sharing `overlap` tokens."""
        window = prompt_budget(self.info, opts.max_new_tokens)
        with self._tokenizer_lock:
            chunks = [tokenize_windows(self.tokenizer, text, window=window, overlap=overlap) for text in texts]
        for index, chunk in enumerate(chunks):
            if int(chunk.attention_mask.sum()) == 0:
                raise UsageError(f"prompt {index + 1} has no tokens after tokenization: give some text")
        self._check_vocabulary([chunk.input_ids[chunk.attention_mask.bool()] for chunk in chunks])
        return chunks

    def _generate_windows(self, texts: list[str], opts: DecodingOptions, overlap: int,
                          stop: threading.Event | None = None) -> list[Result]:
        """Decode every chunk of every text (in batches of rows), then join each text's chunk outputs."""
        from deploylm.decoding.search import generate_ids

        chunks = self._windows(texts, opts, overlap)
        hyps = []
        with self._lock, _memory_is_usage(len(texts), opts):
            deadline = _deadline(opts)
            for piece in split_rows(concat_rows(chunks, self.tokenizer.pad_token_id), max(len(texts), WINDOW_ROWS)):
                hyps.extend(generate_ids(self.backend, piece, _time_left(opts, deadline), None, stop))
        results, start = [], 0
        for text, chunk in zip(texts, chunks):
            per_chunk, start = hyps[start:start + chunk.batch_size], start + chunk.batch_size
            ranks = min(len(outputs) for outputs in per_chunk)
            results.append(Result(text, [self._joined([outputs[r] for outputs in per_chunk], overlap)
                                         for r in range(ranks)]))
        return results

    def _stream_windows(self, prompt: str, opts: DecodingOptions, overlap: int,
                        stop: threading.Event | None = None) -> PieceStream[str, None, str]:
        """The joined best output of `prompt`'s chunks, one piece per decoded chunk; returns the finish
        reason of the last chunk's output."""
        from deploylm.decoding.search import generate_ids

        chunks = self._windows([prompt], opts, overlap)[0]
        eos, outputs, text, out = self.info.special.eos_token_ids, [], "", _Pieces(self.tokenizer)
        # sampling: windows decoded in generate's batches of rows, so they get the same draws of the seed
        rows = WINDOW_ROWS if opts.do_sample else 1
        with self._lock, _memory_is_usage(1, opts):
            deadline = _deadline(opts)
            for piece in split_rows(chunks, rows):
                for hyps in generate_ids(self.backend, piece, _time_left(opts, deadline), None, stop):
                    outputs.append(hyps[0].token_ids)
                    # a window that continues the last through a shared run is decoded with it (_joined_text),
                    # so the end of the text so far may still change: held back as _stream_text holds it
                    text = self._joined_text(join_parts(outputs, overlap, eos, self._forced_bos()))
                    if piece := out.ready(text):
                        yield piece
            if rest := out.rest(text):
                yield rest
        return self.finish_reason(outputs[-1] if outputs else (), opts.max_new_tokens)

    def _joined(self, hyps: list[Any], overlap: int) -> Sequence:
        """One Sequence from the same-rank hypothesis of each chunk: ids joined, texts joined (join_texts),
        scores summed."""
        parts = join_parts([h.token_ids for h in hyps], overlap, self.info.special.eos_token_ids, self._forced_bos())
        ids = tuple(t for part, _ in parts for t in part)
        return Sequence(self._joined_text(parts), tuple(int(t) for t in ids), sum(float(h.score) for h in hyps))

    def _forced_bos(self) -> int | None:
        """The model's forced_bos_token_id (each window's output starts with it), if it sets one."""
        from deploylm.decoding.processors import ForcedBOS

        value = self.info.generation.get("forced_bos_token_id")
        return None if value is None else ForcedBOS(value).token_id

    def _joined_text(self, parts: list[tuple[tuple[int, ...], bool]]) -> str:
        """The text of join_parts' parts. A part that continues the output before it through a shared run is
        decoded with it: alone, it would start a text of its own, which a SentencePiece tokenizer (T5's,
        Marian's) begins without its first space ("cat dog" -> "catdog"), and a character whose bytes the
        two parts split would be U+FFFD twice. Parts that start apart are texts of their own (join_texts)."""
        runs: list[list[int]] = []
        for part, shared in parts:
            if shared and runs:
                runs[-1].extend(part)
            elif part:
                runs.append(list(part))
        return join_texts([self.decode(run) for run in runs], [True] * len(runs))


class TextStream:
    """The pieces of one streamed output, as an iterator (`for piece in gen.stream(...)`).

    The decode (`pieces`, a generator that holds the model while it runs) runs on a thread of its own from
    the first read, and hands each piece over through a queue: the reader may be any thread, or several in
    turn, and the model is held for the decode's time, not the reader's. Once the stream is exhausted,
    `finish_reason` says why the output ended (Generator.finish_reason: "stop" or "length"; a sliding-window
    stream's is its last chunk's); None before. `close()`, from any thread, stops it early: the decode ends
    after its current step and has let the model go when close() returns; later reads end the iteration.
    `closed` is the event the decode checks at every step (Generator.stream passes it in); `stop` the
    caller's event, which makes the next read raise Interrupted.
    """

    def __init__(self, pieces: PieceStream[str, None, str], closed: threading.Event | None = None,
                 stop: threading.Event | None = None) -> None:
        self._pieces = pieces
        self._closed = closed if closed is not None else threading.Event()
        self._stop = stop
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()            # one decode thread, whichever threads read first
        self._done = False
        self.finish_reason: str | None = None

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        if self._stop is not None and self._stop.is_set() and not self._done:
            from deploylm.decoding.search import STOPPED

            self._end()
            raise Interrupted(STOPPED)
        with self._start:
            if self._done or self._closed.is_set():
                raise StopIteration
            if self._thread is None:
                self._thread = threading.Thread(target=_decode_pieces, args=(self._pieces, self._closed, self._queue),
                                                name="deploylm-decode", daemon=True)
                self._thread.start()
        kind, value = self._queue.get()
        if kind == "piece":
            return value
        self._done = True
        self._join()
        if kind != "error":
            self.finish_reason = self.finish_reason or value
        self._queue.put(("end", None))            # for a reader on another thread waiting here too: it ends as well
        if kind == "error":
            raise value
        raise StopIteration(value)

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        """Stop the decode after its current step and wait for it to let the model go (not on its own thread)."""
        with self._start:
            self._closed.set()
            self._done = True
            started = self._thread is not None
        if started:
            self._join()
        else:
            self._pieces.close()                  # never started: it never took the model

    def _join(self) -> None:
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __del__(self) -> None:                   # dropped unread: its decode ends after its current step
        closed = getattr(self, "_closed", None)
        if closed is not None:
            closed.set()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode_pieces(pieces: PieceStream[str, None, str], closed: threading.Event, out: queue.SimpleQueue) -> None:
    """A TextStream's decode thread: every piece of `pieces` onto `out` as ("piece", text), then ("end", the
    finish reason) or ("error", the exception). `closed` set (the stream closed or dropped) ends it quietly after
    the current step, or at the next piece for an iterator that does not watch the event. It holds no reference
    to its TextStream, which is dropped when the reader lets it go."""
    with _DECODING_LOCK:
        _DECODING[threading.current_thread()] = closed
    try:
        while True:
            if closed.is_set():
                pieces.close()
                out.put(("end", None))
                return
            try:
                piece = next(pieces)
            except StopIteration as end:
                out.put(("end", end.value))
                return
            out.put(("piece", piece))
    except Interrupted as exc:
        out.put(("end", None) if closed.is_set() else ("error", exc))
    except BaseException as exc:  # noqa: BLE001 - raised to the reader, on its thread
        out.put(("error", exc))
    finally:
        with _DECODING_LOCK:
            _DECODING.pop(threading.current_thread(), None)


_DECODING: dict[threading.Thread, threading.Event] = {}   # live decode threads: their streams' closed events
_DECODING_LOCK = threading.Lock()


@atexit.register
def _stop_decodes_at_exit() -> None:
    """A script that ends with a stream still decoding (left open half-read): its decode thread, a daemon, must
    not run on into the interpreter's teardown. Each is stopped after its current step and waited for."""
    with _DECODING_LOCK:
        live = list(_DECODING.items())
    for thread, closed in live:
        closed.set()
    for thread, _ in live:
        thread.join(timeout=60)


class _EitherSet:
    """is_set() of the caller's stop event or the stream's own closed event (what the decode loops check)."""

    def __init__(self, stop: threading.Event | None, closed: threading.Event) -> None:
        self._stop, self._closed = stop, closed

    def is_set(self) -> bool:
        return self._closed.is_set() or (self._stop is not None and self._stop.is_set())


class BackendLock:
    """The lock held for every use of a Generator's backend. It knows which thread holds it, so a
    thread that asks for it again (a backend or logits processor of this model calling back into the
    Generator mid-call) gets a UsageError instead of waiting for itself forever. Streams decode on a thread
    of their own (TextStream), so their readers' calls wait like any other."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self) -> BackendLock:
        if self._holder == threading.get_ident():
            raise UsageError("this thread is already inside a call of this model (a backend calling back into the "
                             "Generator?): a call cannot wait for itself")
        self._lock.acquire()
        self._holder = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self._holder = None
        self._lock.release()


def _model_defaults(known: Mapping[str, Any]) -> DecodingOptions:
    """The model's decoding defaults as DecodingOptions. Two of their rules depend on the call: a sampling
    model's num_return_sequences > 1 with num_beams=1 is valid only in a call that samples (deploylm does not
    apply the model's own do_sample), and a min_new_tokens above the default max_new_tokens only in a call that
    raises max_new_tokens. Such defaults are kept (each value checked) and every call's merged options are
    checked instead (Generator.options), so the call that fits works and the others get the UsageError."""
    import copy

    try:
        return DecodingOptions.from_mapping(known)
    except UsageError:
        counts = {name: known.get(name, default) for name, default in (
            ("max_new_tokens", DecodingOptions.max_new_tokens), ("num_return_sequences", 1), ("num_beams", 4),
            ("min_new_tokens", 0))}
        if any(type(value) is not int for value in counts.values()):   # "x" or 2.5: the error says which
            raise
        max_new = counts["max_new_tokens"]
        greedy_draws = counts["num_return_sequences"] > 1 and counts["num_beams"] == 1
        if not (greedy_draws or counts["min_new_tokens"] > max_new):
            raise
    loose = DecodingOptions.from_mapping({**known, "do_sample": True,      # every value valid on its own
                                          "max_new_tokens": max(max_new, known.get("min_new_tokens", 0))})
    defaults = copy.copy(loose)           # a copy runs no validation; Generator.options validates each call's
    object.__setattr__(defaults, "do_sample", bool(known.get("do_sample", False)))
    object.__setattr__(defaults, "max_new_tokens", max_new)
    return defaults


def _warn_ignored_sampling(given: Mapping[str, Any], opts: DecodingOptions) -> None:
    """A temperature, top_k or top_p the caller gave to a call that does not sample is ignored (greedy or beam
    search): one UserWarning names them, as transformers' generate warns (`deploylm generate` and the server refuse
    them; a library call goes on, as transformers'). Only the call's own keywords count, and only values that
    would change a sampled output: the model's own sampling defaults (a generation_config temperature of 0.6 with
    do_sample false) and temperature=1.0, top_k=0 or top_p=1.0 change nothing. A seed does not warn: without
    sampling it is harmless, and clients send one with every request (OpenAI's seed)."""
    if opts.do_sample:
        return
    ignored = [f"{name}={_as_given(given[name])}" for name in ("temperature", "top_k", "top_p")   # not the seed
               if name in given and getattr(opts, name) != SAMPLING_ONLY[name]]
    if ignored:
        several = len(ignored) > 1
        warnings.warn(f"{', '.join(ignored)} appl{'y' if several else 'ies'} only when sampling, and this call "
                      f"searches deterministically (greedy or beam search): {'they are' if several else 'it is'} "
                      "ignored; pass do_sample=True to sample", UserWarning, stacklevel=3)


def _as_given(value: Any) -> str:
    """A number as the caller wrote it: NumPy's np.float32(0.7) prints as 0.7, where the Python float the options hold
    prints as 0.699999988079071; anything else by its repr."""
    import numbers

    return str(value) if isinstance(value, numbers.Number) and not isinstance(value, bool) else repr(value)


def _check_backend(backend: Any) -> None:
    """A Backend (deploylm.backends.base): name, device, info (a ModelInfo), prefill, decode, reorder; else a
    UsageError naming what is missing (a custom backend: docs/serving.md, "A backend of your own")."""
    from deploylm.backends.base import ModelInfo

    missing = [a for a in ("name", "device", "info", "prefill", "decode", "reorder") if not hasattr(backend, a)]
    if missing or not isinstance(backend.info, ModelInfo):
        what = f"no {', '.join(missing)}" if missing else f"info={backend.info!r}, not a ModelInfo"
        raise UsageError(f"{type(backend).__name__} is not a deploylm Backend ({what}): a backend has name, device, "
                         "info (deploylm.backends.ModelInfo), prefill, decode and reorder (docs/serving.md, "
                         "\"A backend of your own\")")


@contextlib.contextmanager
def _memory_is_usage(prompts: int, opts: DecodingOptions) -> Iterator[None]:
    """A call too large for the machine's memory (num_beams=10**6, or max_new_tokens=10**9 on a model without
    a window, say: the search keeps every row's tokens) ends in one UsageError that says what to lower, not in
    the allocator's message from inside torch or ONNX Runtime."""
    try:
        yield
    except (MemoryError, RuntimeError) as exc:
        text = str(exc)
        if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
                or "can't allocate memory" in text or "Failed to allocate memory" in text):
            raise
        raise UsageError(f"not enough memory for {prompts} prompt(s) x {opts.rows_per_input} row(s) each "
                         f"(num_beams={opts.num_beams}, num_return_sequences={opts.num_return_sequences}) of up to "
                         f"max_new_tokens={opts.max_new_tokens} tokens: lower num_beams, num_return_sequences or "
                         f"max_new_tokens, or send fewer prompts at once") from None


def _deadline(opts: DecodingOptions) -> float | None:
    """When a call's max_time is up (None: never): the windows of a sliding-window call, decoded batch after
    batch, share one max_time, as the call's decode does."""
    return None if opts.max_time is None else time.time() + opts.max_time


def _time_left(opts: DecodingOptions, deadline: float | None) -> DecodingOptions:
    """`opts` with the seconds left until `deadline` as max_time: once it is past, a batch stops after its first
    token (max_time must stay positive), so every window still has an output to join."""
    return opts if deadline is None else opts.replace(max_time=max(deadline - time.time(), 1e-9))


def _check_stop(stop: Any, stats: Any = None) -> None:
    """`stop` is None or a threading.Event (not stop strings, which deploylm does not have); `stats` None or a
    SearchStats: else a UsageError, not an AttributeError from inside the decode loop."""
    from deploylm.decoding.search import SearchStats

    if stop is not None and not callable(getattr(stop, "is_set", None)):
        raise UsageError(f"stop={stop!r}: expected a threading.Event (set it to end the decode after its current "
                         "step) or None; deploylm has no stop strings")
    if stats is not None and not isinstance(stats, SearchStats):
        raise UsageError(f"stats={stats!r}: expected a deploylm.decoding.search.SearchStats (filled in place) or None")


def _prompt_list(prompts: str | list[str]) -> list[str]:
    """A list of non-empty prompt strings (a single string becomes a list of one)."""
    texts = [prompts] if isinstance(prompts, str) else list(prompts) if isinstance(prompts, (list, tuple)) else None
    if texts is None:
        raise UsageError(f"prompts must be a string or a list of strings, got {type(prompts).__name__}")
    if not texts:
        raise UsageError("no prompts given: expected at least one prompt")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            kind = type(text).__name__
            raise UsageError(f"prompt {index + 1} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}: expected a string")
        if not text.strip():
            raise UsageError(f"prompt {index + 1} is {'empty' if not text else 'only whitespace'}: expected some text")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:    # a lone surrogate: JSON "\ud800", or undecodable bytes in argv
            raise UsageError(f"prompt {index + 1} is not valid Unicode text: {exc.object[exc.start:exc.end]!r} at "
                             f"character {exc.start} (a lone surrogate, or bytes that were not UTF-8)") from None
    return texts
