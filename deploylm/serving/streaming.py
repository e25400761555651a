"""Streaming: run `Generator.stream` on its own thread and hand its pieces to the event loop.

When the client goes away the async side stops reading and sets the stop flag; `start` receives that
flag and hands it to the generator as its `stop`, which ends the decode after its current step (a beam
search may go many steps without a piece, so the flag is not only read between pieces); the thread then
closes the generator (releasing the model) and ends, so a dropped stream costs at most one step.
"""
from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, AsyncIterator, Callable, Iterator

_END = object()


class StreamSlot:
    """One stream's place among the server's `max_streams`, held by its response and by its worker thread
    (event-loop side only): `release` runs once both are done. A client that leaves ends the response at
    once, but the thread may still wait for the model behind other work; the slot stays taken until it
    ends, so streams opened and dropped at once cannot pile up threads beyond the limit."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release, self._holders = release, 1   # the response's hold

    def hold(self) -> None:
        self._holders += 1

    def drop(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._release()


async def stream_pieces(start: Callable[[threading.Event], Iterator[str]],
                        slot: StreamSlot | None = None) -> AsyncIterator[str]:
    """Yield the pieces of `start(left)` (a blocking iterator) as they come, from a worker thread; `left` is
    set once nobody reads them any more (the iterator should stop after its current step). `slot` is held
    until the thread ends."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            stop.set()

    def produce() -> None:
        iterator = None
        try:
            iterator = start(stop)
            for piece in iterator:
                if stop.is_set():
                    break
                put(piece)
        except BaseException as exc:  # noqa: BLE001 - handed to the async side
            put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            put(_END)
            if slot is not None:
                try:
                    loop.call_soon_threadsafe(slot.drop)
                except RuntimeError:  # loop closed: the server is gone
                    pass

    thread = threading.Thread(target=produce, name="deploylm-stream", daemon=True)
    if slot is not None:
        slot.hold()
    try:
        thread.start()
    except BaseException:
        if slot is not None:
            slot.drop()
        raise
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def sse(data: Any) -> bytes:
    """One server-sent event carrying `data` as JSON (or a literal string such as [DONE])."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
