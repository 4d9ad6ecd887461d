"""Stage-aware continuous batching, as a plain synchronous object (no asyncio, HTTP or torch).

Every request waits in the queue of the stage it runs next. ``schedule()`` picks one stage and
takes up to that stage's max batch from its queue; ``update()`` takes the stage's confidences and
applies the exit rule (``model.exit_rule``) with each request's own threshold: confident requests
finish, the rest move to the next stage's queue and meet survivors of other batches. The runner
only measures confidence; who leaves is decided here, in one place.

Policy (see ``docs/serving.md``): a queue is *due* when it can fill a batch, or its oldest entry
has waited the stage's max wait (Triton's dynamic batcher: the wait applies only while no full
batch can be formed). Among due queues a later stage goes first, because its requests already paid
for the earlier stages and hold carried tokens on the device; otherwise the fullest due queue goes.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from model.exit_rule import exits_early
from service.slo import effective_threshold


class QueueFull(Exception):
    """``add()`` refused a request: the waiting queues hold ``max_queue_size`` requests."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # in the queue of ``stage``
    RUNNING = "running"  # in a planned batch, until ``update()`` or ``fail()``
    ABORTED = "aborted"  # aborted while running; dropped at ``update()``


@dataclass(frozen=True)
class SchedulerConfig:
    num_stages: int
    max_batch_sizes: tuple[int, ...]  # per stage
    max_wait_s: tuple[float, ...]  # per stage: longest a partial batch waits for company
    max_queue_size: int  # waiting requests over all stages before add() refuses

    def __post_init__(self):
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        for name in ("max_batch_sizes", "max_wait_s"):
            if len(getattr(self, name)) != self.num_stages:
                raise ValueError(f"{name} needs one value per stage ({self.num_stages})")
        if min(self.max_batch_sizes) < 1 or min(self.max_wait_s) < 0 or self.max_queue_size < 1:
            raise ValueError(f"batch sizes and queue size must be >= 1, waits >= 0: {self}")


@dataclass
class Request:
    request_id: int
    threshold: float  # exit threshold in [0, 1], applied after every stage but the last
    deadline: float | None  # monotonic seconds; dropped from the queues once passed
    enqueued_at: float  # monotonic seconds it entered its current queue
    stage: int = 0
    status: RequestStatus = RequestStatus.WAITING
    requested_threshold: float = 1.0  # what the client asked for; ``threshold`` is the effective one
    min_threshold: float = 1.0  # the floor load may lower ``threshold`` to (the latency SLO)
    arrived_at: float = 0.0  # monotonic seconds it reached the server (the API server, for an SLO)
    confidence: float | None = None  # at the last stage it ran: may it leave there, if cut short?
    run_all: bool = False  # explain=all: runs every stage; the threshold only marks where it would exit
    exit_stage: int | None = None  # first stage whose confidence met the threshold, once one has


@dataclass(frozen=True)
class SchedulePlan:
    stage: int | None  # stage the batch runs; None when no batch is due
    request_ids: tuple[int, ...] = ()  # batch members, oldest first
    thresholds: tuple[float, ...] = ()  # exit threshold of each batch member
    queue_wait_s: tuple[float, ...] = ()  # how long each batch member waited in this stage's queue
    expired: tuple[int, ...] = ()  # requests dropped because their deadline passed while waiting
    aborted: tuple[int, ...] = ()  # requests removed by abort() since the last plan
    next_due_s: float | None = None  # no batch: seconds until one falls due; None: queues empty

    @property
    def dropped(self) -> tuple[int, ...]:
        """Requests whose carried state the executor should free."""
        return self.expired + self.aborted


@dataclass(frozen=True)
class StageUpdate:
    """What ``update()`` decided for one finished batch."""

    finished: tuple[int, ...]  # answered at this stage: the executor sends their answers
    moved_on: tuple[int, ...]  # queued for the next stage: the executor keeps their tokens
    exit_stages: dict[int, int] = field(default_factory=dict)  # finished id -> stage its threshold
    # let it exit at: this stage, or an earlier one for a run_all request


@dataclass
class Scheduler:
    config: SchedulerConfig
    clock: Callable[[], float] = time.monotonic
    check_invariants: bool = False  # the O(n) consistency check after every step: tests only
    requests: dict[int, Request] = field(default_factory=dict)  # every live request, by id
    _queues: list[deque[Request]] = field(init=False)  # per stage, oldest first
    _aborted: list[int] = field(init=False, default_factory=list)  # for the next plan
    level: float = field(init=False, default=1.0)  # thresholds between floors (0) and requested (1)

    def __post_init__(self):
        self._queues = [deque() for _ in range(self.config.num_stages)]

    # ------------------------------------------------------------------ called by request handlers

    def add(self, request_id: int, threshold: float, deadline: float | None = None,
            min_threshold: float | None = None, arrived_at: float | None = None,
            run_all: bool = False) -> None:  # fmt: skip
        """Admit a new request into the first stage's queue; raises QueueFull when at capacity.

        ``min_threshold`` (default: ``threshold``, never lowered) is the floor ``set_level`` may
        lower the request's threshold to; it starts at the current level's threshold.
        ``arrived_at`` (default: now) is when it reached the server, for the latency SLO.
        ``run_all`` (explain=all) keeps the request going to the last stage whatever its
        confidence; the exit rule still records the stage it would have left at."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id} is already scheduled")
        if self.num_waiting() >= self.config.max_queue_size:
            raise QueueFull(f"{self.num_waiting()} requests waiting (max_queue_size)")
        floor = threshold if min_threshold is None else min_threshold
        now = self.clock()
        request = Request(request_id, effective_threshold(threshold, floor, self.level), deadline,
                          enqueued_at=now, requested_threshold=threshold, min_threshold=floor,
                          arrived_at=now if arrived_at is None else arrived_at, run_all=run_all)  # fmt: skip
        self.requests[request_id] = request
        self._queues[0].append(request)
        self._check_invariants()

    def abort(self, request_id: int) -> bool:
        """Cancel a request (timeout, client gone). A running one is dropped when its batch ends.

        Returns False when the request is unknown or already finished.
        """
        request = self.requests.get(request_id)
        if request is None or request.status is RequestStatus.ABORTED:
            return False
        if request.status is RequestStatus.WAITING:
            self._queues[request.stage].remove(request)
            del self.requests[request_id]
            self._aborted.append(request_id)
        else:
            request.status = RequestStatus.ABORTED
        self._check_invariants()
        return True

    # ------------------------------------------------------------------ called by the executor loop

    def schedule(self) -> SchedulePlan:
        """Drop expired requests, then plan the next batch, or say when one falls due."""
        now = self.clock()
        expired = self._drop_expired(now)
        aborted, self._aborted = tuple(self._aborted), []
        stage = self._pick_stage(now)
        if stage is None:
            return SchedulePlan(None, expired=expired, aborted=aborted, next_due_s=self._next_due(now))
        queue = self._queues[stage]
        batch = [queue.popleft() for _ in range(min(len(queue), self.config.max_batch_sizes[stage]))]
        for request in batch:
            request.status = RequestStatus.RUNNING
        self._check_invariants()
        return SchedulePlan(
            stage,
            request_ids=tuple(r.request_id for r in batch),
            thresholds=tuple(r.threshold for r in batch),
            queue_wait_s=tuple(now - r.enqueued_at for r in batch),
            expired=expired,
            aborted=aborted,
        )

    def update(self, plan: SchedulePlan, confidences: Sequence[float]) -> StageUpdate:
        """Apply a finished batch: each request's confidence at this stage against its threshold.

        At the last stage every request finishes. Requests aborted while running are dropped and
        reported in the next plan's ``aborted``. A ``run_all`` request goes on even when confident;
        ``exit_stages`` says where each finished request's threshold let it exit.
        """
        if len(confidences) != len(plan.request_ids):
            raise ValueError(f"{len(confidences)} confidences for a batch of {len(plan.request_ids)}")
        now, last = self.clock(), plan.stage == self.config.num_stages - 1
        finished, moved_on, exit_stages = [], [], {}
        for request_id, confidence in zip(plan.request_ids, confidences):
            request = self._running(request_id)
            if request.exit_stage is None and (last or exits_early(confidence, request.threshold)):
                request.exit_stage = plan.stage
            if request.status is RequestStatus.ABORTED:
                del self.requests[request_id]
                self._aborted.append(request_id)
            elif request.exit_stage is not None and (last or not request.run_all):
                del self.requests[request_id]
                finished.append(request_id)
                exit_stages[request_id] = request.exit_stage
            else:
                request.stage, request.enqueued_at = request.stage + 1, now
                request.confidence = confidence
                request.threshold = effective_threshold(request.requested_threshold, request.min_threshold, self.level)
                request.status = RequestStatus.WAITING
                self._queues[request.stage].append(request)
                moved_on.append(request_id)
        self._check_invariants()
        return StageUpdate(tuple(finished), tuple(moved_on), exit_stages)

    def fail(self, plan: SchedulePlan) -> tuple[int, ...]:
        """The batch raised: finish all its requests (the executor fails them); returns their ids."""
        failed = []
        for request_id in plan.request_ids:
            request = self._running(request_id)
            del self.requests[request_id]
            if request.status is RequestStatus.ABORTED:
                self._aborted.append(request_id)
            else:
                failed.append(request_id)
        self._check_invariants()
        return tuple(failed)

    def set_level(self, level: float) -> None:
        """The latency SLO controller moved: every waiting request (and every new one) gets the
        threshold between its floor and its requested threshold this level sets. Running ones keep
        theirs (the plan carries them)."""
        if level == self.level:
            return
        self.level = level
        for queue in self._queues:
            for request in queue:
                request.threshold = effective_threshold(request.requested_threshold, request.min_threshold, level)

    def arrivals(self, stage: int) -> list[float]:
        """When each request waiting in ``stage``'s queue reached the server, oldest in the queue first."""
        return [r.arrived_at for r in self._queues[stage]]

    def cut_short(self, stage: int, positions: Sequence[int]) -> tuple[int, ...]:
        """Answer these waiting requests (positions in ``stage``'s queue, stage > 0) from the stage
        they already ran instead of running them on: the SLO would be missed. A request whose
        confidence there is below its floor stays. Returns the finished ids; the executor answers
        them and frees their carried tokens."""
        if stage == 0:
            raise ValueError("stage 0 requests have no answer yet")
        queue = self._queues[stage]
        picked = [queue[p] for p in positions]
        cut = [r for r in picked if exits_early(r.confidence, r.min_threshold)]
        for request in cut:
            queue.remove(request)
            del self.requests[request.request_id]
        self._check_invariants()
        return tuple(r.request_id for r in cut)

    def num_waiting(self, stage: int | None = None) -> int:
        """Requests waiting in one stage's queue, or in all of them."""
        if stage is None:
            return sum(len(q) for q in self._queues)
        return len(self._queues[stage])

    # ------------------------------------------------------------------ policy

    def _is_due(self, stage: int, now: float) -> bool:
        queue = self._queues[stage]
        if not queue:
            return False
        full = len(queue) >= self.config.max_batch_sizes[stage]
        return full or now - queue[0].enqueued_at >= self.config.max_wait_s[stage]

    def _pick_stage(self, now: float) -> int | None:
        """A due later-stage queue first; else the fullest due queue (ties: the later stage)."""
        due = [s for s in range(self.config.num_stages) if self._is_due(s, now)]
        candidates = [s for s in due if s > 0] or due
        if not candidates:
            return None
        return max(candidates, key=lambda s: (self._fill(s), s))

    def _fill(self, stage: int) -> float:
        """How much of a full batch the stage's queue holds, capped at 1."""
        return min(1.0, len(self._queues[stage]) / self.config.max_batch_sizes[stage])

    def _next_due(self, now: float) -> float | None:
        waits = [
            max(0.0, q[0].enqueued_at + self.config.max_wait_s[s] - now)
            for s, q in enumerate(self._queues)
            if q
        ]
        return min(waits, default=None)

    def _drop_expired(self, now: float) -> tuple[int, ...]:
        expired = []
        for queue in self._queues:
            for request in [r for r in queue if r.deadline is not None and r.deadline <= now]:
                queue.remove(request)
                del self.requests[request.request_id]
                expired.append(request.request_id)
        return tuple(expired)

    def _running(self, request_id: int) -> Request:
        request = self.requests.get(request_id)
        if request is None or request.status is RequestStatus.WAITING:
            raise ValueError(f"request {request_id} is not in a running batch")
        return request

    def _check_invariants(self) -> None:
        """Each live request is in exactly the queue of its stage iff it is waiting."""
        if not self.check_invariants:
            return
        queued = {id(r) for q in self._queues for r in q}
        assert len(queued) == self.num_waiting(), "a request is queued twice"
        for stage, queue in enumerate(self._queues):
            assert all(r.stage == stage and r.status is RequestStatus.WAITING for r in queue)
        for request_id, request in self.requests.items():
            assert request.request_id == request_id
            assert (request.status is RequestStatus.WAITING) == (id(request) in queued)
