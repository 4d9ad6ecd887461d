"""The thin asyncio layer: admit requests, run the executor loop, resolve futures.

Handlers call ``classify()``; it registers a future, adds the request to the scheduler and waits.
One loop task schedules a batch, runs it on the worker thread, applies the exit decisions and
resolves the futures of finished requests. The scheduler is touched only on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from service.errors import batch_failed, out_of_memory, refused, timed_out
from service.metrics import ServiceMetrics
from service.scheduler import QueueFull, SchedulePlan, Scheduler
from service.worker import BeforeBatchHook, StageResult, Worker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hooks:
    """Test and fault-injection hooks; all optional."""

    before_batch: BeforeBatchHook | None = None  # worker thread, before each stage batch
    on_admit: Callable[[int], None] | None = None  # event loop, request id entered the queue
    on_abort: Callable[[int], None] | None = None  # event loop, request id was aborted


@dataclass(frozen=True)
class Answer:
    probabilities: list[float]  # softmax over classes at the exit stage
    confidence: float  # the exit rule's confidence at the exit stage
    exit_stage: int  # 0-based
    gmacs: float  # compute spent on this request
    queue_s: float  # summed over the stage queues it waited in
    compute_s: float  # summed over the batches it ran in


@dataclass
class _Pending:
    future: asyncio.Future
    image: torch.Tensor | None  # (C, H, W) on the CPU, until stage 0 has run
    timeout_s: float
    queue_s: float = 0.0
    compute_s: float = 0.0


class Engine:
    def __init__(
        self,
        scheduler: Scheduler,
        worker: Worker,
        metrics: ServiceMetrics,
        exit_gmacs: Sequence[float],
        stage_gmacs: Sequence[float],
        retry_after_s: int = 1,
        hooks: Hooks = Hooks(),
    ):
        self.scheduler, self.worker, self.metrics, self.hooks = scheduler, worker, metrics, hooks
        self.exit_gmacs, self.stage_gmacs = tuple(exit_gmacs), tuple(stage_gmacs)
        self.retry_after_s = retry_after_s
        self.ready = False  # warmed up and not draining
        self.draining = False
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_task = asyncio.create_task(self._run(), name="thinkingvit-executor")
        self._set_ready(True)

    async def stop(self) -> None:
        self._set_ready(False)
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self.worker.close()

    def begin_drain(self) -> None:
        """Readiness off and no new requests; admitted ones still run to the end."""
        if not self.draining:
            self.draining = True
            self._set_ready(False)
            log.info("draining: readiness is false, %d requests in flight finish", len(self._pending))

    def begin_drain_threadsafe(self) -> None:
        """From a signal handler or another thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.begin_drain)

    def in_flight(self) -> dict[str, int]:
        """What the server holds for unanswered requests (all zeros when idle): a leak check."""
        return {
            "futures": len(self._pending),
            "scheduled": len(self.scheduler.requests),
            "waiting": self.scheduler.num_waiting(),
            "carried": len(self.worker.carried),
        }

    def _set_ready(self, ready: bool) -> None:
        self.ready = ready and not self.draining
        self.metrics.ready.set(1 if self.ready else 0)

    # ------------------------------------------------------------------ called by handlers

    async def classify(self, image: torch.Tensor, threshold: float, timeout_s: float) -> Answer:
        """Queue one preprocessed image and wait for its answer; raises ServiceError."""
        request_id = self._admit(image, threshold, timeout_s)
        future = self._pending[request_id].future
        try:
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            self.abort(request_id)
            raise timed_out(timeout_s) from None
        except asyncio.CancelledError:
            self.abort(request_id)
            raise

    def abort(self, request_id: int) -> None:
        """Drop a request wherever it is; a running one is dropped when its batch ends."""
        self._pending.pop(request_id, None)
        if self.scheduler.abort(request_id):
            self._wake.set()  # the loop frees its carried tokens
            self._record_depth()
            if self.hooks.on_abort:
                self.hooks.on_abort(request_id)

    def check_admission(self) -> None:
        """Raise the refusal a new request would get now (503 draining or not ready, 429 queue
        full); handlers call it before decoding, so overload is refused without that work."""
        if self.draining:
            raise refused(503, "draining", "the server is shutting down", self.retry_after_s)
        if not self.ready:
            raise refused(503, "not_ready", "the model is not loaded yet", self.retry_after_s)
        if (waiting := self.scheduler.num_waiting()) >= self.scheduler.config.max_queue_size:
            raise refused(429, "queue_full", f"queue full: {waiting} requests waiting", self.retry_after_s)

    def _admit(self, image: torch.Tensor, threshold: float, timeout_s: float) -> int:
        self.check_admission()
        request_id = next(self._ids)
        try:
            self.scheduler.add(request_id, threshold, deadline=time.monotonic() + timeout_s)
        except QueueFull as e:
            raise refused(429, "queue_full", f"queue full: {e}", self.retry_after_s) from None
        self._pending[request_id] = _Pending(asyncio.get_running_loop().create_future(), image, timeout_s)
        self._wake.set()
        self._record_depth()
        if self.hooks.on_admit:
            self.hooks.on_admit(request_id)
        return request_id

    # ------------------------------------------------------------------ the executor loop

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            plan = self.scheduler.schedule()
            self._drop(plan)
            self._record_depth()
            if plan.stage is None:
                await self._sleep(plan.next_due_s)
            else:
                await self._execute(plan)

    async def _sleep(self, timeout_s: float | None) -> None:
        """Until a request arrives or is aborted, or the next partial batch falls due."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()

    def _drop(self, plan: SchedulePlan) -> None:
        for request_id in plan.expired:
            pending = self._pending.pop(request_id, None)
            if pending is not None and not pending.future.done():
                pending.future.set_exception(timed_out(pending.timeout_s))
        if plan.dropped:
            self.worker.submit(self.worker.release, plan.dropped)

    async def _execute(self, plan: SchedulePlan) -> None:
        for request_id, wait_s in zip(plan.request_ids, plan.queue_wait_s):
            self._pending[request_id].queue_s += wait_s
            self.metrics.queue_wait.labels(str(plan.stage)).observe(wait_s)
        await self._run_batch(plan)

    async def _run_batch(self, plan: SchedulePlan) -> None:
        """Run one batch on the worker and apply its exits. A batch that runs out of device
        memory is retried as two halves (recursively); a batch of one that still does not fit,
        or any other exception, fails only that batch's requests."""
        if not plan.request_ids:
            return
        stage, label = plan.stage, str(plan.stage)
        images = [self._pending[r].image for r in plan.request_ids] if stage == 0 else None
        self.metrics.batch_size.labels(label).observe(len(plan.request_ids))
        job = self.worker.submit(self.worker.run_stage, stage, plan.request_ids, plan.thresholds, images)
        try:
            result: StageResult = await asyncio.wrap_future(job)
        except Exception as e:  # one batch fails, the server keeps serving
            oom = isinstance(e, torch.OutOfMemoryError)
            self.metrics.batch_failures.labels(label, "out_of_memory" if oom else "error").inc()
            if oom and len(plan.request_ids) > 1:
                size = len(plan.request_ids)
                log.warning("stage %d batch of %d ran out of memory; retrying in halves", stage, size)
                for half in (range(size // 2), range(size // 2, size)):
                    await self._run_batch(self._without_aborted(sub_plan(plan, half)))
                return
            log.exception("stage %d batch of %d failed", stage, len(plan.request_ids))
            self._fail(plan, e)
            return
        self.metrics.stage_compute.labels(label).observe(result.compute_s)
        self.metrics.gmacs.inc(self.stage_gmacs[stage] * len(plan.request_ids))
        finished = set(self.scheduler.update(plan, result.exited))
        for i, request_id in enumerate(plan.request_ids):
            pending = self._pending.get(request_id)
            if pending is None:  # aborted while its batch ran
                continue
            pending.image, pending.compute_s = None, pending.compute_s + result.compute_s
            if request_id in finished:
                self._finish(request_id, stage, result.probabilities[i], result.confidence[i])

    def _without_aborted(self, plan: SchedulePlan) -> SchedulePlan:
        """Before a retry: requests aborted meanwhile leave the batch uncomputed (the scheduler
        reports them in the next plan, so their carried tokens are freed)."""
        live = [i for i, r in enumerate(plan.request_ids) if r in self._pending]
        if len(live) < len(plan.request_ids):
            gone = [i for i in range(len(plan.request_ids)) if i not in live]
            self.scheduler.fail(sub_plan(plan, gone))  # all aborted: fails no one
        return sub_plan(plan, live)

    def _finish(self, request_id: int, stage: int, probabilities: list[float], confidence: float) -> None:
        pending = self._pending.pop(request_id)
        gmacs = self.exit_gmacs[stage]
        self.metrics.exits.labels(str(stage)).inc()
        self.metrics.request_gmacs.observe(gmacs)
        if not pending.future.done():
            answer = Answer(probabilities, confidence, stage, gmacs, pending.queue_s, pending.compute_s)
            pending.future.set_result(answer)

    def _fail(self, plan: SchedulePlan, error: Exception) -> None:
        self.worker.submit(self.worker.release, plan.request_ids)
        oom = isinstance(error, torch.OutOfMemoryError)
        for request_id in self.scheduler.fail(plan):
            pending = self._pending.pop(request_id, None)
            if pending is not None and not pending.future.done():
                failure = out_of_memory(error, self.retry_after_s) if oom else batch_failed(error)
                pending.future.set_exception(failure)

    def _record_depth(self) -> None:
        for stage in range(self.scheduler.config.num_stages):
            self.metrics.queue_depth.labels(str(stage)).set(self.scheduler.num_waiting(stage))


def sub_plan(plan: SchedulePlan, members: Sequence[int]) -> SchedulePlan:
    """The batch members at these positions, for a retry. Drops were already handled with the
    whole plan, so a sub-plan carries none."""
    return SchedulePlan(
        plan.stage,
        request_ids=tuple(plan.request_ids[i] for i in members),
        thresholds=tuple(plan.thresholds[i] for i in members),
        queue_wait_s=tuple(plan.queue_wait_s[i] for i in members),
    )
