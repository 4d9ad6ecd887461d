"""The API server's side of the transport: send a request to the engine core, await its answer.

One DEALER socket per API server process, on the event loop (no thread hop): ``classify`` sends the
header and the image frame and awaits a future; the loop's reader on the socket's file descriptor
receives every answer and resolves the future it belongs to. The hot path uses the socket's plain,
non-blocking calls: pyzmq's asyncio wrappers made a future, an enum check and a deferred event
check for every send and receive, about 15 % of an API server's CPU under load (py-spy). A
request that times out or whose client goes away sends an ``Abort``, so the engine never
computes it (or stops it after the running stage).

If the engine process dies, the socket's monitor reports the disconnection at once: every waiting
request fails with ``ENGINE_GONE`` (the edge answers 503), later ones are refused, and the health
routes fail. Nothing waits for an answer that cannot come.

A live engine that stops working (a wedged batch, a hung driver) is seen through its heartbeat
(``stalled_s``): readiness fails, so a balancer stops sending here while the requests already
waiting run into their deadlines (504).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time

import numpy as np
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from service.transport import Abort, Answer, Explain, Failure, FailureKind, Submit, decode_outbound, encode

log = logging.getLogger(__name__)
ENGINE_GONE = "the engine process is gone"


class EngineError(Exception):
    """The engine could not answer this request; ``kind`` says why, the edge picks the status."""

    def __init__(self, kind: FailureKind, message: str):
        super().__init__(message)
        self.kind, self.message = kind, message


class EngineClient:
    def __init__(self, address: str, published=None):
        self.address = address
        self.published = published  # shared memory: [0] queue depth, [1] heartbeat, [2] requests held (engine_core)
        self.engine_alive = True
        self._context = zmq.asyncio.Context()
        self._sock = self._context.socket(zmq.DEALER)  # asyncio: sends that would block
        self._sock.setsockopt(zmq.IDENTITY, f"api-{os.getpid()}".encode())
        self._sock.setsockopt(zmq.LINGER, 0)
        self._plain = zmq.Socket.shadow(self._sock.underlying)  # the same socket, plain non-blocking calls
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self._futures: dict[int, asyncio.Future] = {}
        self._sent_at: dict[int, float] = {}  # request id -> time.monotonic() when sent; oldest first
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        """Connect, start receiving and watching, and wait until connected."""
        self._loop = asyncio.get_running_loop()
        self._sock.connect(self.address)
        self._loop.add_reader(self._plain.FD, self._receive)
        self._tasks = [asyncio.create_task(self._watch())]
        await self._connected.wait()

    async def close(self) -> None:
        self._loop.remove_reader(self._plain.FD)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._sock.disable_monitor()
        self._monitor.close()
        self._sock.close()
        self._context.term()

    def queue_depth(self) -> int:
        """Requests waiting in the engine's queues, as it last published."""
        return 0 if self.published is None else int(self.published[0])

    def stalled_s(self) -> float:
        """How long work has waited on an engine that finished no loop turn meanwhile (0: none).

        Work is what the engine held at its last heartbeat, or this server's oldest request not
        yet answered; a request sent after the last heartbeat counts from when it was sent, so an
        engine that was merely idle is not called stalled.
        """
        if self.published is None:
            return 0.0
        held = self.published[2]  # before the beat: the engine writes the beat first
        now, beat = time.monotonic(), self.published[1]
        waits = [now - beat] if held else []
        if self._sent_at:
            waits.append(now - max(beat, next(iter(self._sent_at.values()))))
        return max(waits, default=0.0)

    def pending(self) -> int:
        """Requests this API server is waiting on."""
        return len(self._futures)

    def check_alive(self) -> None:
        """Raise ``ENGINE_GONE`` once the engine process has died."""
        if not self.engine_alive:
            raise EngineError(FailureKind.ENGINE_GONE, ENGINE_GONE)

    async def classify(self, image: np.ndarray, threshold: float, timeout_s: float,
                       min_threshold: float | None = None, waited_s: float = 0.0,
                       explain: Explain = Explain.NONE) -> Answer:  # fmt: skip
        """Send one preprocessed image (C, H, W) float32 and await its answer; raises EngineError.
        ``min_threshold``: how far a latency SLO may lower the threshold (None: not at all);
        ``waited_s``: how long the request has been in this server already (the SLO counts it);
        ``explain``: which per-stage results to send back."""
        self.check_alive()
        request_id = next(self._ids)
        future = self._loop.create_future()
        self._futures[request_id] = future
        self._sent_at[request_id] = time.monotonic()
        header = encode(Submit(request_id, threshold, timeout_s, min_threshold, waited_s, explain))
        expiry = self._loop.call_later(timeout_s, _expire, future)
        try:
            await self._send([header, image.data], timeout_s)
            return await future
        except TimeoutError:
            self._abort(request_id)
            raise EngineError(FailureKind.TIMEOUT, f"no answer within {timeout_s:g} s; the request was dropped") from None
        except asyncio.CancelledError:
            self._abort(request_id)
            raise
        finally:
            expiry.cancel()
            self._futures.pop(request_id, None)
            self._sent_at.pop(request_id, None)

    async def _send(self, frames: list, timeout_s: float) -> None:
        """Send now if the socket takes it (nearly always), else wait up to ``timeout_s`` for room
        on pyzmq's asyncio socket (an engine that stopped reading: its queue of 1,000 messages is
        full). A send can take in answers that the descriptor then no longer signals: receive them."""
        try:
            self._plain.send_multipart(frames, zmq.NOBLOCK, copy=False)  # large frames: zero-copy
        except zmq.Again:
            await asyncio.wait_for(self._sock.send_multipart(frames, copy=False), timeout_s)
        self._receive()

    def _abort(self, request_id: int) -> None:
        """Tell the engine to drop the request; if its socket is full, the engine's own deadline
        for the request drops it instead."""
        if self.engine_alive and self._futures.pop(request_id, None) is not None:
            with contextlib.suppress(zmq.ZMQError):  # zmq.Again included
                self._plain.send(encode(Abort(request_id)), zmq.NOBLOCK)
            self._receive()

    def _receive(self) -> None:
        """Every answer waiting on the socket (the loop's reader, and after each send). Reading
        ``EVENTS`` also clears the descriptor's signal, which is edge-like: it is only raised again
        by new activity, so the socket is drained until it reports nothing to read."""
        sock = self._plain
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            message = decode_outbound(sock.recv(zmq.NOBLOCK, copy=False).buffer)
            future = self._futures.pop(message.request_id, None)
            if future is None or future.done():  # aborted meanwhile
                continue
            if isinstance(message, Failure):
                future.set_exception(EngineError(message.kind, message.message))
            else:
                future.set_result(message)

    async def _watch(self) -> None:
        while True:
            event = parse_monitor_message(await self._monitor.recv_multipart())["event"]
            if event == zmq.EVENT_CONNECTED:
                self._connected.set()
            elif event == zmq.EVENT_DISCONNECTED:
                self._engine_gone()
                return

    def _engine_gone(self) -> None:
        log.error("the engine core disconnected: failing %d waiting requests", len(self._futures))
        self.engine_alive = False
        self._connected.set()  # a start() still waiting returns; health then reports the death
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(EngineError(FailureKind.ENGINE_GONE, ENGINE_GONE))


def _expire(future: asyncio.Future) -> None:
    """The request's deadline passed without an answer (a timer, not a task per request)."""
    if not future.done():
        future.set_exception(TimeoutError())
