"""Observation and fault injection inside the engine core process, for tests.

The server runs the engine core in its own process, so a test cannot hand it a Python callback.
Instead the server is started with ``engine_hooks="tests.engine_probe:hooks"`` and the address of
an ``EngineProbe`` the test owns:

- the engine side (``hooks()``, imported inside the engine core) pushes events: every admission,
  abort and stage batch (with the engine's request ids) and what the engine holds when it goes idle;
- the test side sends commands, acknowledged before the call returns: pause the engine (requests
  queue up, aborts are still taken in) until ``resume()``; hold a batch inside the engine until
  ``release()``; raise an error or a real ``torch.OutOfMemoryError`` inside a batch, matched by
  stage, ids or size.

Everything waits on events with a timeout, never on sleeps.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable

import zmq

ADDRESS_VARIABLE = "THINKINGVIT_TEST_PROBE"
TIMEOUT_S = 60
IDLE = {"requests": 0, "scheduled": 0, "waiting": 0, "carried": 0, "staged": 0}


# ----------------------------------------------------------------------------- the engine side


class _EngineSide:
    def __init__(self, base: str):
        self._context = zmq.Context()
        self._events = self._context.socket(zmq.PUSH)
        self._events.connect(f"{base}-events")
        self._rules: list[dict] = []
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._paused = False
        self.wake_read, self._wake_write = os.pipe()
        commands = self._context.socket(zmq.REP)
        commands.connect(f"{base}-commands")
        threading.Thread(target=self._serve_commands, args=(commands,), daemon=True).start()

    def _serve_commands(self, sock) -> None:
        while True:
            command, argument = sock.recv_pyobj()
            with self._lock:
                if command == "rule":
                    self._released.clear()
                    self._rules.append(argument)
                elif command == "release":
                    self._released.set()
                elif command == "clear":
                    self._rules.clear()
                elif command in ("pause", "resume"):
                    self._paused = command == "pause"
                    os.write(self._wake_write, b"x")
            sock.send_pyobj("ok")

    def before_batch(self, stage: int, request_ids) -> None:
        ids = tuple(request_ids)
        self._events.send_pyobj(("batch", stage, ids))
        with self._lock:
            matched = [r for r in self._rules if _matches(r, stage, ids)]
            self._rules = [r for r in self._rules if not (r in matched and r.get("once"))]
        for rule in matched:
            action = rule["action"]
            if action == "hold":
                self._events.send_pyobj(("held", stage, ids))
                assert self._released.wait(TIMEOUT_S), "the test never released the engine"
            elif action == "delay":  # simulated device time: the engine sleeps as if a GPU ran
                time.sleep((rule["base_ms"] + rule["per_image_ms"] * len(ids)) / 1000)
            elif action == "raise":
                raise RuntimeError(rule.get("message", "injected fault"))
            elif action == "oom":
                import torch

                raise torch.OutOfMemoryError(rule.get("message", "injected: CUDA out of memory"))

    def on_admit(self, request_id: int, client: bytes) -> None:
        self._events.send_pyobj(("admit", request_id, client))

    def on_abort(self, request_id: int) -> None:
        self._events.send_pyobj(("abort", request_id))

    def paused(self) -> bool:
        return self._paused

    def on_idle(self, in_flight: dict[str, int]) -> None:
        self._events.send_pyobj(("idle", in_flight))


def _matches(rule: dict, stage: int, ids: tuple[int, ...]) -> bool:
    return (
        rule.get("stage", stage) == stage
        and len(ids) >= rule.get("min_size", 0)
        and (not rule.get("ids_any") or bool(set(rule["ids_any"]) & set(ids)))
        and tuple(rule.get("ids_equal", ids)) == ids
    )


def hooks():
    """The ``engine_hooks`` factory, called inside the engine core process."""
    from service.engine_core import EngineHooks

    side = _EngineSide(os.environ[ADDRESS_VARIABLE])
    return EngineHooks(before_batch=side.before_batch, on_admit=side.on_admit, on_abort=side.on_abort,
                       on_idle=side.on_idle, paused=side.paused, wake_fd=side.wake_read)  # fmt: skip


# ----------------------------------------------------------------------------- the test side


class EngineProbe:
    """What the engine core did, and the rules it follows; created before the server starts."""

    def __init__(self):
        self._dir = tempfile.mkdtemp(prefix="thinkingvit-probe-")
        base = f"ipc://{self._dir}/probe"
        self._context = zmq.Context()
        self._events = self._context.socket(zmq.PULL)
        self._events.bind(f"{base}-events")
        self._commands = self._context.socket(zmq.REQ)
        self._commands.setsockopt(zmq.RCVTIMEO, TIMEOUT_S * 1000)
        self._commands.setsockopt(zmq.SNDTIMEO, TIMEOUT_S * 1000)
        self._commands.bind(f"{base}-commands")
        self.settings = {"engine_hooks": "tests.engine_probe:hooks"}
        self.env = {ADDRESS_VARIABLE: base}
        self.batches: list[tuple[int, tuple[int, ...]]] = []  # (stage, engine request ids)
        self.admitted: list[int] = []
        self.sender: dict[int, bytes] = {}  # engine request id -> the API server that sent it
        self.aborted: list[int] = []
        self.held: list[tuple[int, tuple[int, ...]]] = []
        self.in_flight: dict[str, int] | None = None  # as the engine last went idle
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    # rules -------------------------------------------------------------------

    def pause(self) -> None:
        """The engine keeps taking requests in (and aborts) but starts no batch until ``resume``."""
        self._command("pause")

    def resume(self) -> None:
        self._command("resume")

    def hold_next_batch(self) -> None:
        """The next batch blocks inside the engine, which then takes nothing in, until ``release``."""
        self.add_rule(action="hold", once=True)

    def release(self) -> None:
        self._command("release")

    def add_rule(self, **rule) -> None:
        """``action``: hold / raise / oom / delay (``base_ms`` + ``per_image_ms``); matched by ``stage``, ``ids_any``, ``ids_equal``,
        ``min_size``; ``once`` removes it after its first match."""
        self._command("rule", rule)

    def clear_rules(self) -> None:
        self._command("clear")

    # waiting -----------------------------------------------------------------

    def wait_held(self, n: int = 1) -> None:
        self.wait_for(lambda: len(self.held) >= n, "the engine to hold a batch")

    def wait_admitted(self, n: int) -> None:
        self.wait_for(lambda: len(self.admitted) >= n, f"{n} admissions")

    def wait_aborted(self, n: int) -> None:
        self.wait_for(lambda: len(self.aborted) >= n, f"{n} aborts")

    def wait_idle(self) -> None:
        """Until the engine went idle holding nothing: no request, queue entry or carried token."""
        self.wait_for(lambda: self.in_flight == IDLE, f"an idle engine (last: {self.in_flight})")

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        with self._changed:
            assert self._changed.wait_for(predicate, TIMEOUT_S), f"timed out waiting for {what}"

    def computed(self) -> set[int]:
        return {r for _, ids in self.batches for r in ids}

    def close(self) -> None:
        self._commands.close(linger=0)
        self._context.term()  # the collector sees ContextTerminated and closes its socket
        self._thread.join()

    # internals -----------------------------------------------------------------

    def _command(self, command: str, argument=None) -> None:
        self._commands.send_pyobj((command, argument))
        assert self._commands.recv_pyobj() == "ok"

    def _collect(self) -> None:
        while True:
            try:
                event = self._events.recv_pyobj()
            except zmq.ContextTerminated:
                self._events.close(linger=0)
                return
            with self._changed:
                kind = event[0]
                if kind == "batch":
                    self.batches.append(event[1:])
                elif kind == "held":
                    self.held.append(event[1:])
                elif kind == "admit":
                    self.admitted.append(event[1])
                    self.sender[event[1]] = event[2]
                elif kind == "abort":
                    self.aborted.append(event[1])
                elif kind == "idle":
                    self.in_flight = event[1]
                self._changed.notify_all()
