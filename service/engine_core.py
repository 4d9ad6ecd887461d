"""The engine core: one process, one loop, the scheduler and the stage runner side by side.

Each turn of the loop takes in what the API servers sent (new requests, aborts), asks the
scheduler for a batch, runs it on the runner, lets the scheduler apply the exit rule to the
confidences, and sends the answers back to the API server that asked. Nothing else runs in this
process, so the model's op dispatch never waits for HTTP parsing or image decoding.

``EngineCore`` is that logic without sockets (tests drive it directly); ``serve_engine_core`` is
the process entry, which adds the ZeroMQ socket, the published queue depth and the ready handshake.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import zmq

from model.exit_rule import exits_early
from service.scheduler import QueueFull, SchedulePlan, Scheduler
from service.slo import SloController
from service.transport import (
    Abort,
    Answer,
    Explain,
    Failure,
    FailureKind,
    Outbound,
    Shutdown,
    Submit,
    decode_inbound,
    encode,
)

log = logging.getLogger(__name__)

ClientId = bytes  # the ZeroMQ identity of an API server process


@dataclass
class EngineHooks:
    """Test-only observation and fault injection inside the engine process; all optional."""

    before_batch: Callable[[int, Sequence[int]], None] | None = None  # raise to fail, block to hold
    on_admit: Callable[[int, ClientId], None] | None = None  # engine request id, from which API server
    on_abort: Callable[[int], None] | None = None  # engine request id was aborted
    on_idle: Callable[[dict[str, int]], None] | None = None  # the loop is about to wait for work
    paused: Callable[[], bool] | None = None  # while True the engine takes requests in, runs no batch
    wake_fd: int | None = None  # readable when ``paused`` may have changed; the loop reads it empty


@dataclass
class _Request:
    """What the engine holds for a request besides the scheduler's record."""

    client: ClientId
    client_request_id: int
    timeout_s: float
    confidences: list[float] = field(default_factory=list)  # one per stage run
    explain: Explain = Explain.NONE
    probabilities: list[np.ndarray] = field(default_factory=list)  # (classes,) per stage run, explain only
    queue_s: float = 0.0
    compute_s: float = 0.0
    threshold: float = 1.0  # as requested (the scheduler holds the effective one)
    min_threshold: float | None = None  # its floor under a latency SLO
    last_probabilities: np.ndarray | None = None  # (classes,) at the last stage run: an SLO may answer with it


class EngineCore:
    """Admission, the schedule-run-update step and answer routing; no sockets, no processes."""

    def __init__(self, scheduler: Scheduler, runner, metrics, exit_gmacs: Sequence[float],
                 stage_gmacs: Sequence[float], hooks: EngineHooks | None = None,
                 slo: SloController | None = None):  # fmt: skip
        self.scheduler, self.runner, self.metrics = scheduler, runner, metrics
        self.slo = slo  # None: no latency SLO, every request runs with the threshold it asked for
        self.exit_gmacs, self.stage_gmacs = tuple(exit_gmacs), tuple(stage_gmacs)
        self.hooks = hooks or EngineHooks()
        self.requests: dict[int, _Request] = {}  # by engine request id
        self._by_client: dict[tuple[ClientId, int], int] = {}  # (client, its id) -> engine id
        self._ids = itertools.count()
        self._outbox: list[tuple[ClientId, Outbound]] = []
        self._admitted: list[tuple[int, np.ndarray]] = []  # (engine id, (C, H, W) image) not yet staged
        self.take_input: Callable[[], None] = lambda: None  # the process loop's non-blocking intake
        self._image_bytes = 4 * int(np.prod(runner.image_shape))  # float32 (C, H, W)

    # ------------------------------------------------------------------ input

    def submit(self, client: ClientId, message: Submit, image: bytes) -> None:
        """Admit a request, or answer at once with why not (queue full, wrong image shape)."""
        shape = self.runner.image_shape
        if len(image) != self._image_bytes:
            self._fail_now(client, message.request_id, FailureKind.BAD_INPUT,
                           f"image frame of {len(image)} bytes; the model takes float32 {shape}")  # fmt: skip
            return
        request_id = next(self._ids)
        now = time.monotonic()
        deadline = now + message.timeout_s
        if self.slo is not None:
            self.slo.observe_admission(message.waited_s)
        try:
            self.scheduler.add(request_id, message.threshold, deadline, message.min_threshold, now - message.waited_s,
                               run_all=message.explain is Explain.ALL)  # fmt: skip
        except QueueFull as e:
            self._fail_now(client, message.request_id, FailureKind.QUEUE_FULL, f"queue full: {e}")
            return
        self._admitted.append((request_id, np.frombuffer(image, dtype=np.float32).reshape(shape)))  # no copy
        self.requests[request_id] = _Request(client, message.request_id, message.timeout_s,
                                             threshold=message.threshold, min_threshold=message.min_threshold,
                                             explain=message.explain)  # fmt: skip
        self._by_client[client, message.request_id] = request_id
        if self.hooks.on_admit:
            self.hooks.on_admit(request_id, client)

    def stage_admitted(self) -> None:
        """Hand the images admitted since the last call to the runner, all at once (on a GPU one
        upload): before each batch is planned, and after the intake during a batch, whose upload
        then runs while the device computes. A request aborted meanwhile is left out (its release
        has already happened)."""
        admitted, self._admitted = self._admitted, []
        live = [(r, image) for r, image in admitted if r in self.requests]
        if live:
            self.runner.stage_images([r for r, _ in live], [image for _, image in live])

    def abort(self, client: ClientId, message: Abort) -> None:
        """Drop a request wherever it is; a running one is dropped when its batch ends."""
        request_id = self._by_client.get((client, message.request_id))
        if request_id is None:
            return
        self._forget(request_id)
        if self.scheduler.abort(request_id) and self.hooks.on_abort:
            self.hooks.on_abort(request_id)

    # ------------------------------------------------------------------ the step

    def step(self) -> float | None:
        """Schedule and run at most one batch. Returns 0 when more work is due now, else how long
        the loop may wait for input (None: until something arrives)."""
        self.stage_admitted()
        if self.slo is not None:
            self._apply_slo()
        plan = self.scheduler.schedule()
        self._drop(plan)
        if plan.stage is not None:
            self._run(plan)
        self._record_depth()
        if plan.stage is not None:
            return 0.0
        if self.hooks.on_idle:
            self.hooks.on_idle(self.in_flight())
        if self.slo is not None and self.scheduler.level < 1:  # wake up to raise the thresholds back
            due = math.inf if plan.next_due_s is None else plan.next_due_s
            return min(due, self.slo.config.up_interval_s)
        return plan.next_due_s

    def take_outbox(self) -> list[tuple[ClientId, Outbound]]:
        out, self._outbox = self._outbox, []
        return out

    def in_flight(self) -> dict[str, int]:
        """What the engine holds for unanswered requests (all zeros when idle): a leak check."""
        return {
            "requests": len(self.requests),
            "scheduled": len(self.scheduler.requests),
            "waiting": self.scheduler.num_waiting(),
            "carried": len(self.runner.carried),
            "staged": len(self.runner.staged),
        }

    # ------------------------------------------------------------------ internals

    def _drop(self, plan: SchedulePlan) -> None:
        for request_id in plan.expired:
            request = self._forget(request_id)
            if request is not None:
                self._reply(request, Failure(request.client_request_id, FailureKind.TIMEOUT,
                                             f"no answer within {request.timeout_s:g} s; the request was dropped"))  # fmt: skip
        if plan.dropped:
            self.runner.release(plan.dropped)

    def _run(self, plan: SchedulePlan) -> None:
        label = str(plan.stage)
        for request_id, wait_s in zip(plan.request_ids, plan.queue_wait_s):
            self.requests[request_id].queue_s += wait_s
            self.metrics.queue_wait.labels(label).observe(wait_s)
        self._run_batch(plan)

    def _run_batch(self, plan: SchedulePlan) -> None:
        """Run one batch and apply its exits. Between launching the batch and reading its result the
        engine takes input, so on a GPU the next batch's images upload while this one computes.
        A batch that runs out of device memory is retried as two halves (recursively); a batch of
        one that still does not fit, or any other exception, fails only that batch's requests."""
        if not plan.request_ids:
            return
        stage, label = plan.stage, str(plan.stage)
        self.metrics.batch_size.labels(label).observe(len(plan.request_ids))
        try:
            if self.hooks.before_batch:
                self.hooks.before_batch(stage, plan.request_ids)
            pending = self.runner.launch(stage, plan.request_ids)
        except Exception as e:  # one batch fails, the engine keeps serving
            self._batch_raised(plan, e)
            return
        self.take_input()  # while the device computes (on a CPU the batch has already run)
        self.stage_admitted()  # on a GPU their upload overlaps this batch too
        try:
            result = pending.result()
        except Exception as e:  # e.g. a CUDA error raised when the results are read
            self._batch_raised(plan, e)
            return
        self.metrics.stage_compute.labels(label).observe(result.compute_s)
        self.metrics.gmacs.inc(self.stage_gmacs[stage] * len(plan.request_ids))
        update = self.scheduler.update(plan, result.confidence)
        self.runner.carry(update.moved_on)
        if self.slo is not None:
            self.slo.observe(stage, len(plan.request_ids), result.compute_s, len(update.moved_on))
        finished = set(update.finished)
        for i, request_id in enumerate(plan.request_ids):
            request = self.requests.get(request_id)
            if request is None:  # aborted while its batch ran
                continue
            request.compute_s += result.compute_s
            request.confidences.append(result.confidence[i])
            if request.explain is not Explain.NONE:
                request.probabilities.append(result.probabilities[i])  # (classes,)
            if request_id in finished:
                self._finish(request_id, update.exit_stages[request_id], result.probabilities[i], plan.thresholds[i])
            elif self.slo is not None:
                request.last_probabilities = result.probabilities[i]  # an answer if the SLO cuts it short

    def _batch_raised(self, plan: SchedulePlan, error: Exception) -> None:
        stage = plan.stage
        oom = _is_out_of_memory(error)
        self.metrics.batch_failures.labels(str(stage), "out_of_memory" if oom else "error").inc()
        if oom and len(plan.request_ids) > 1:
            size = len(plan.request_ids)
            log.warning("stage %d batch of %d ran out of memory; retrying in halves", stage, size)
            for half in (range(size // 2), range(size // 2, size)):
                self.take_input()  # aborts that came in meanwhile keep their requests out of a retry
                self._run_batch(self._without_aborted(sub_plan(plan, half)))
            return
        log.error("stage %d batch of %d failed: %r", stage, len(plan.request_ids), error)
        self.runner.release(plan.request_ids)
        for request_id in self.scheduler.fail(plan):
            request = self._forget(request_id)
            if request is None:
                continue
            if oom:
                failure = Failure(request.client_request_id, FailureKind.OUT_OF_MEMORY,
                                  f"the device ran out of memory for this image, even in a batch of one: {error}")  # fmt: skip
            else:
                failure = Failure(request.client_request_id, FailureKind.BATCH_FAILED,
                                  f"inference failed for this batch: {type(error).__name__}: {error}")  # fmt: skip
            self._reply(request, failure)

    def _without_aborted(self, plan: SchedulePlan) -> SchedulePlan:
        """Before a retry: requests aborted meanwhile leave the batch uncomputed (the scheduler
        reports them in the next plan, so their carried tokens are freed)."""
        live = [i for i, r in enumerate(plan.request_ids) if r in self.requests]
        if len(live) < len(plan.request_ids):
            gone = [i for i in range(len(plan.request_ids)) if i not in live]
            self.scheduler.fail(sub_plan(plan, gone))  # all aborted: fails no one
        return sub_plan(plan, live)

    def _finish(self, request_id: int, exit_stage: int, probabilities: np.ndarray, threshold: float,
                cut_short: bool = False) -> None:  # fmt: skip
        """Answer at ``exit_stage`` with the effective ``threshold`` its exit was decided by (an
        explain=all request ran on past it, and paid for that). Degraded: cut short by the SLO, or
        out before the last stage below the threshold it asked for."""
        request = self._forget(request_id)
        gmacs = self.exit_gmacs[len(request.confidences) - 1]  # the stages it actually ran
        self.metrics.exits.labels(str(exit_stage)).inc()
        self.metrics.request_gmacs.observe(gmacs)
        last = exit_stage == self.scheduler.config.num_stages - 1
        lowered = not last and not exits_early(request.confidences[exit_stage], request.threshold)
        if cut_short or lowered:
            self.metrics.degraded.labels("cut_short" if cut_short else "lowered").inc()
        self.metrics.effective_threshold.observe(threshold)
        if request.explain is not Explain.NONE:
            probabilities = request.probabilities[exit_stage]
        answer = Answer(
            request.client_request_id, exit_stage, request.confidences, probabilities.tobytes(),  # float32 row
            request.queue_s, request.compute_s, threshold=threshold, degraded=cut_short or lowered,
            stage_probabilities=[p.tobytes() for p in request.probabilities],
        )  # fmt: skip
        self._reply(request, answer)

    def _apply_slo(self) -> None:
        """Before planning a batch: let the controller set the level from the queue depths, then
        answer the later-stage requests that would miss the SLO from the stage they already ran."""
        scheduler, stages = self.scheduler, self.scheduler.config.num_stages
        depths = [scheduler.num_waiting(s) for s in range(stages)]
        scheduler.set_level(self.slo.decide(depths))
        self.metrics.threshold_level.set(scheduler.level)
        for stage in range(1, stages):
            overdue = self.slo.overdue(stage, scheduler.arrivals(stage), depths)
            cut = scheduler.cut_short(stage, overdue) if overdue else ()
            self.runner.release(cut)
            for request_id in cut:
                request = self.requests[request_id]
                self._finish(request_id, stage - 1, request.last_probabilities, request.min_threshold, cut_short=True)

    def _fail_now(self, client: ClientId, client_request_id: int, kind: FailureKind, message: str) -> None:
        self._outbox.append((client, Failure(client_request_id, kind, message)))

    def _reply(self, request: _Request, message: Outbound) -> None:
        self._outbox.append((request.client, message))

    def _forget(self, request_id: int) -> _Request | None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self._by_client.pop((request.client, request.client_request_id), None)
        return request

    def _record_depth(self) -> None:
        for stage in range(self.scheduler.config.num_stages):
            self.metrics.queue_depth.labels(str(stage)).set(self.scheduler.num_waiting(stage))
        self.metrics.in_flight.set(len(self.requests))
        self.metrics.carried.set(len(self.runner.carried))


def sub_plan(plan: SchedulePlan, members: Sequence[int]) -> SchedulePlan:
    """The batch members at these positions, for a retry. Drops were already handled with the
    whole plan, so a sub-plan carries none."""
    return SchedulePlan(
        plan.stage,
        request_ids=tuple(plan.request_ids[i] for i in members),
        thresholds=tuple(plan.thresholds[i] for i in members),
        queue_wait_s=tuple(plan.queue_wait_s[i] for i in members),
    )


def _is_out_of_memory(error: BaseException) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError)


# ----------------------------------------------------------------------------- the process


def load_hooks(spec: str | None) -> EngineHooks | None:
    """``module:factory`` (the ``engine_hooks`` setting, tests only) -> the factory's EngineHooks."""
    if not spec:
        return None
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)()


def serve_engine_core(settings, address: str, published, ready_conn) -> None:
    """Process entry: load and warm up, say so on ``ready_conn``, then loop until ``Shutdown``.

    The engine core makes the server's CPU plan (``processes.plan_cpus``), as only it knows whether
    its device is a GPU without the launcher loading torch: it confines itself to its cores and
    threads and sends the plan with its ready message, for the launcher to place the API servers.

    ``published`` is shared memory the API servers read before decoding: ``[0]`` the number of
    requests waiting in all queues, so overload is refused without spending a decode on it; ``[1]``
    the heartbeat, ``time.monotonic()`` (one clock for every process on Linux) after each step
    and whenever the engine was idle, and ``[2]`` the requests it holds, set before the step: a
    wedged engine stops beating while it holds work, and the API servers' readiness fails
    (``engine_stall_s``).
    """
    from service import processes

    processes.become_child("engine-core")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from service.runner import resolve_device

        device = resolve_device(settings.device)  # the one 'auto' rule: CUDA when present
        cpus = processes.plan_cpus(settings.auto_or("api_servers"), settings.auto_or("engine_threads"),
                                   settings.cpu_affinity, gpu=device.type == "cuda")  # fmt: skip
        processes.confine(cpus.engine_cpus)
        core, served = build_engine_core(settings, cpus.engine_threads, device)
    except Exception as e:
        log.exception("the engine core could not start")
        ready_conn.send(("failed", f"{type(e).__name__}: {e}"))
        return
    context = zmq.Context()
    sock = context.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(address)
    ready_conn.send(("ready", served, str(core.runner.device), cpus))
    ready_conn.close()
    try:
        _loop(core, sock, published)
    finally:
        sock.close()
        context.term()
    processes.skip_final_collection()


def _loop(core: EngineCore, sock, published) -> None:
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    hooks = core.hooks
    if hooks.wake_fd is not None:
        poller.register(hooks.wake_fd, zmq.POLLIN)
    intake = _Intake(core, sock)
    core.take_input = intake
    wait_s: float | None = None
    while not intake.shutdown:
        timeout_ms = None if wait_s is None else max(0, int(wait_s * 1000 + 0.5))
        ready = dict(poller.poll(timeout_ms))
        if not core.requests:  # idle until now: the stall clock starts with the new work
            published[1] = time.monotonic()
        if sock in ready:
            intake()
        published[2] = len(core.requests)  # held from here on, through the step below
        if hooks.wake_fd in ready:
            os.read(hooks.wake_fd, 4096)
        if intake.shutdown:
            break
        if hooks.paused is not None and hooks.paused():
            wait_s = None  # the engine takes input but runs nothing until a wake-up
        else:
            wait_s = core.step()
            published[1], published[2] = time.monotonic(), len(core.requests)  # the heartbeat
        published[0] = core.scheduler.num_waiting()
        for client, message in core.take_outbox():  # refusals from the intake too, paused or not
            sock.send_multipart([client, encode(message)], copy=False)
    log.info("engine core: shutdown")


class _Intake:
    """Everything that arrived on the socket, without blocking, before the next batch is planned."""

    def __init__(self, core: EngineCore, sock):
        self.core, self.sock, self.shutdown = core, sock, False

    def __call__(self) -> None:
        while not self.shutdown:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            client, message = frames[0].bytes, decode_inbound(frames[1].buffer)
            if isinstance(message, Submit):
                self.core.submit(client, message, frames[2].buffer)
            elif isinstance(message, Abort):
                self.core.abort(client, message)
            elif isinstance(message, Shutdown):
                self.shutdown = True


def build_engine_core(settings, threads: int, device):
    """Load the checkpoint onto ``device`` (a torch.device), warm up every stage and wire
    scheduler, runner and metrics."""
    import torch

    from model.checkpoint import load_checkpoint
    from service.metrics import EngineMetrics
    from service.runner import StageRunner
    from service.scheduler import SchedulerConfig
    from service.served_model import ServedModel
    from service.slo import SloConfig

    torch.set_num_threads(threads)
    loaded = load_checkpoint(settings.checkpoint, preset=settings.preset, device=device)
    loaded.model.set_attention_backend(settings.attention_backend)
    served = ServedModel.from_checkpoint(settings.checkpoint.name, loaded)
    num_stages = served.num_stages
    config = SchedulerConfig(
        num_stages=num_stages,
        max_batch_sizes=settings.per_stage("max_batch_size", num_stages),
        max_wait_s=tuple(ms / 1000 for ms in settings.per_stage("max_wait_ms", num_stages)),
        max_queue_size=settings.max_queue_size,
    )
    runner = StageRunner(loaded.model, device, settings.autocast, staging_batch=config.max_batch_sizes[0])
    runner.warm_up(config.max_batch_sizes)
    metrics = EngineMetrics(num_stages)
    slo = None
    if settings.latency_slo_ms is not None:
        slo = SloController(SloConfig(slo_s=settings.latency_slo_ms / 1000, num_stages=num_stages))
        metrics.latency_slo.set(settings.latency_slo_ms / 1000)
    core = EngineCore(Scheduler(config), runner, metrics, served.exit_gmacs, served.stage_gmacs,
                      load_hooks(settings.engine_hooks), slo)  # fmt: skip
    log.info("engine core %d: %s on %s, %d torch threads", os.getpid(), settings.checkpoint.name, device, threads)
    return core, served
