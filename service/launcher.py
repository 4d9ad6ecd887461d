"""The launcher: the ``thinkingvit serve`` process, which starts, watches and stops the others.

    launcher ── engine core (1 process: scheduler, runner, the model)
            └─ API servers (``api_servers`` processes sharing one listening socket)

Startup: bind the socket, start the engine core and wait until it has loaded and warmed up every
stage, then start the API servers. The launcher does no request work itself.

- SIGTERM / SIGINT: stop listening, let every API server drain (requests that started before the
  signal are answered; uvicorn's grace is ``drain_grace_s``), then stop the engine core; exit 0.
- An API server dies: its open connections are closed; a new one is started on the same socket
  (at most ``MAX_RESTARTS`` in ``RESTART_WINDOW_S``, else the server stops and exits 5).
- The engine core dies: the API servers answer 503 at once (their sockets see it go), the launcher
  stops them and exits 4, for the orchestrator to restart the whole server.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import tempfile
import time
from collections import deque

log = logging.getLogger("service.launcher")

EXIT_OK, EXIT_STARTUP_FAILED, EXIT_ENGINE_DIED, EXIT_API_SERVERS_CRASHING = 0, 3, 4, 5
MAX_RESTARTS, RESTART_WINDOW_S = 5, 60.0
ENGINE_STOP_S = 10.0  # after the API servers: the engine finishes its batch and exits


def listening_socket(settings) -> socket.socket:
    """The shared listening socket: inherited (``fd``) or bound to host:port."""
    if settings.fd is not None:
        sock = socket.socket(fileno=settings.fd)
    else:
        family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Launcher:
    def __init__(self, settings):
        self.settings = settings
        self.context = multiprocessing.get_context("spawn")  # fork is unsafe with threads and CUDA
        self.run_dir = tempfile.mkdtemp(prefix="thinkingvit-")
        metrics_dir = os.path.join(self.run_dir, "metrics")
        os.makedirs(metrics_dir)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # before any child starts
        self.engine_address = f"ipc://{self.run_dir}/engine"
        # [0] engine queue depth, [1] its heartbeat (time.monotonic of its last loop turn), [2] the
        # requests it held then: what the API servers' readiness reads (service.engine_client)
        self.published = self.context.Array("d", 3, lock=False)
        self.cpus = None  # the CPU plan, made by the engine core once it knows its device (engine_core)
        self.sock: socket.socket | None = None
        self.engine: multiprocessing.Process | None = None
        self.api_servers: dict[int, multiprocessing.Process] = {}  # by slot
        self.restarts: deque[float] = deque()
        self.served = self.device = None
        self._stop_requested = False

    # ------------------------------------------------------------------ startup

    def start(self) -> bool:
        """Engine first (load and warm up), then the API servers. False if startup failed."""
        try:
            self.sock = listening_socket(self.settings)
        except OSError as e:
            log.error("cannot listen on %s:%s: %s", self.settings.host, self.settings.port, e)
            return False
        if not self._start_engine():
            return False
        for slot in range(self.cpus.api_servers):
            self._start_api_server(slot)
        host, port = self.sock.getsockname()[:2]
        log.info("serving %s on http://%s:%d (%d API servers, engine core on %s, %d torch threads)",
                 self.settings.checkpoint.name, host if ":" not in host else f"[{host}]", port,
                 self.cpus.api_servers, self.device, self.cpus.engine_threads)  # fmt: skip
        return True

    def _start_engine(self) -> bool:
        from service.engine_core import serve_engine_core

        receive, send = self.context.Pipe(duplex=False)
        self.engine = self.context.Process(
            target=serve_engine_core, name="thinkingvit-engine-core",
            args=(self.settings, self.engine_address, self.published, send),
        )  # fmt: skip
        self.engine.start()
        send.close()
        try:
            status, *payload = receive.recv()
        except EOFError:
            log.error("the engine core exited during startup (exit code %s)", self.engine.exitcode)
            return False
        finally:
            receive.close()
        if status != "ready":
            log.error("the engine core could not start: %s", payload[0])
            self.engine.join()
            return False
        self.served, self.device, self.cpus = payload
        return True

    def _start_api_server(self, slot: int) -> None:
        from service.app import serve_api_server

        process = self.context.Process(
            target=serve_api_server, name=f"thinkingvit-api-{slot}",
            args=(self.settings, [self.sock], self.served, self.device, self.engine_address,
                  self.published, self.cpus.api_cpus, slot),
        )  # fmt: skip
        process.start()
        self.api_servers[slot] = process

    # ------------------------------------------------------------------ watching

    def run(self) -> int:
        """Watch the children until a signal or a death; returns the exit status."""
        wake_read, wake_write = socket.socketpair()
        wake_read.setblocking(False)
        wake_write.setblocking(False)
        previous = signal.set_wakeup_fd(wake_write.fileno())
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self._watch(wake_read)
        finally:
            signal.set_wakeup_fd(previous)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            wake_read.close()
            wake_write.close()

    def _on_signal(self, sig: int, frame) -> None:
        self._stop_requested = True

    def _watch(self, wake) -> int:
        while True:
            if self._stop_requested:
                log.info("draining: %d API servers finish the requests they hold", len(self.api_servers))
                return self.stop()
            api_sentinels = [p.sentinel for p in self.api_servers.values()]
            multiprocessing.connection.wait([self.engine.sentinel, wake, *api_sentinels])
            _drain(wake)
            if not self.engine.is_alive():
                log.error("the engine core died (exit code %s): stopping", self.engine.exitcode)
                self.stop(engine_dead=True)
                return EXIT_ENGINE_DIED
            for slot, process in list(self.api_servers.items()):
                if not process.is_alive() and not self._stop_requested:
                    if not self._restart(slot, process):
                        self.stop()
                        return EXIT_API_SERVERS_CRASHING

    def _restart(self, slot: int, dead: multiprocessing.Process) -> bool:
        _mark_dead(dead.pid)
        now = time.monotonic()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW_S:
            self.restarts.popleft()
        if len(self.restarts) >= MAX_RESTARTS:
            log.error("API servers died %d times in %.0f s: stopping", MAX_RESTARTS, RESTART_WINDOW_S)
            return False
        self.restarts.append(now)
        log.warning("API server %d (pid %d) died with exit code %s: restarting it", slot, dead.pid, dead.exitcode)
        self._start_api_server(slot)
        return True

    # ------------------------------------------------------------------ stopping

    def stop(self, engine_dead: bool = False) -> int:
        """Drain the API servers, then stop the engine; EXIT_OK if everything stopped cleanly."""
        if self.sock is not None:
            self.sock.close()  # with the API servers' copies closed too, new connections are refused
            self.sock = None
        clean = True
        for process in self.api_servers.values():
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        grace = self.settings.drain_grace_s + 10.0
        for process in self.api_servers.values():
            process.join(grace)
            if process.is_alive():
                log.error("API server %d did not stop: killing it", process.pid)
                process.kill()
                process.join()
            # Killed by that SIGTERM means it had not yet installed uvicorn's handlers, so it had
            # not accepted a connection either: a server caught starting up holds nothing to lose.
            clean &= process.exitcode in (0, -signal.SIGTERM)
        if self.engine is not None and self.engine.is_alive():
            self._stop_engine()
        clean &= engine_dead or self.engine is None or self.engine.exitcode == 0
        self._cleanup()
        return EXIT_OK if clean else 1

    def _stop_engine(self) -> None:
        import zmq

        from service.transport import Shutdown, encode

        context = zmq.Context()
        sock = context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(self.engine_address)
        sock.send(encode(Shutdown()))
        self.engine.join(ENGINE_STOP_S)
        sock.close()
        context.term()
        if self.engine.is_alive():
            log.error("the engine core did not stop: killing it")
            self.engine.kill()
            self.engine.join()

    def _cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.run_dir, ignore_errors=True)


def _drain(wake: socket.socket) -> None:
    try:
        while wake.recv(512):
            pass
    except BlockingIOError:
        pass


def _mark_dead(pid: int) -> None:
    """Drop a dead process's live gauges from the merged metrics (its counters stay)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)


def run_server(settings) -> int:
    """Start everything, serve until SIGTERM, stop; the exit status for ``thinkingvit serve``."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    launcher = Launcher(settings)
    if not launcher.start():
        launcher.stop()
        return EXIT_STARTUP_FAILED
    return launcher.run()
