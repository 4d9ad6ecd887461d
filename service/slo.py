"""The latency SLO controller: spend less compute per image instead of refusing requests.

A fixed-budget server under overload either queues (latency explodes) or refuses (429). A nested
model has a third way: answer more images after the first stage. This controller decides how far to
go, online, from what the engine measures. Like the scheduler it is a plain synchronous object with
an injected clock (no asyncio, torch or HTTP), so its policy is unit-tested with a fake clock.

- Moving estimates (exponentially weighted) of each stage's time per image at the batches it ran,
  and of the share of each stage's batch that goes on to the next stage.
- ``predict_s(depths)``: when a request arriving now would be answered, from the queue depths: the
  work already queued at every stage, plus the share of earlier stages' work that will go on.
- ``decide(depths)``: the *level* in [0, 1] that sets every request's effective threshold between
  its floor (level 0) and its requested threshold (level 1), see ``effective_threshold``. Predicted
  over the SLO (with headroom for the HTTP side): one step down, at most every ``down_interval_s``.
  Predicted well under it (``recover_below``) and no step down for ``hold_s``: one step up, at most
  every ``up_interval_s``. Between the two marks the level holds: that gap and the hold time are
  the hysteresis that keeps it from oscillating.
- ``overdue(stage, arrivals, depths)``: which requests waiting for a later stage would be answered
  after their SLO; the engine answers those from the stage they already ran (``degraded``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def effective_threshold(requested: float, floor: float, level: float) -> float:
    """The threshold a request runs with at this level: its floor at 0, exactly what it asked for
    at 1 (so a server without an SLO applies the requested threshold bit for bit)."""
    if level >= 1:
        return requested
    return max(floor, floor + (requested - floor) * level)


@dataclass(frozen=True)
class SloConfig:
    slo_s: float  # the latency objective, arrival to answer
    num_stages: int
    step_down: float = 0.1  # level lost per step while the prediction is over the SLO
    step_up: float = 0.1  # level regained per recovery step
    down_above: float = 0.8  # step down when the prediction exceeds this share of the SLO
    recover_below: float = 0.4  # step up only while the prediction is under this share of the SLO
    down_interval_s: float = 0.02  # at least this long between steps down (batches to show effect)
    up_interval_s: float = 0.2  # at least this long between steps up
    hold_s: float = 0.5  # no step up for this long after a step down
    smoothing: float = 0.2  # weight of the newest batch in the moving estimates

    def __post_init__(self):
        if not self.slo_s > 0:
            raise ValueError(f"slo_s must be > 0, got {self.slo_s}")
        if not 0 < self.recover_below < self.down_above:
            raise ValueError("need 0 < recover_below < down_above (the hysteresis band)")


class SloController:
    def __init__(self, config: SloConfig, clock: Callable[[], float] = time.monotonic):
        self.config, self.clock = config, clock
        stages = config.num_stages
        self.level = 1.0
        self.per_image_s: list[float | None] = [None] * stages  # moving estimate per stage
        self.go_on: list[float | None] = [None] * (stages - 1) + [0.0]  # share of a batch going on
        self.front_s: float | None = None  # moving estimate of the time before admission (API server)
        self.predicted_s = 0.0  # the last prediction decide() acted on
        self._last_down = self._last_up = -math.inf

    # ------------------------------------------------------------------ called after every batch

    def observe(self, stage: int, batch_size: int, compute_s: float, moved_on: int) -> None:
        """A stage batch finished: update that stage's time per image and its go-on share."""
        if batch_size < 1:
            return
        a = self.config.smoothing
        per_image = compute_s / batch_size
        old = self.per_image_s[stage]
        self.per_image_s[stage] = per_image if old is None else (1 - a) * old + a * per_image
        if stage < len(self.go_on) - 1:
            share, old = moved_on / batch_size, self.go_on[stage]
            self.go_on[stage] = share if old is None else (1 - a) * old + a * share

    def observe_admission(self, waited_s: float) -> None:
        """A request was admitted after ``waited_s`` in the API server (body, decoding): that time
        counts against the SLO too."""
        a, old = self.config.smoothing, self.front_s
        self.front_s = waited_s if old is None else (1 - a) * old + a * waited_s

    # ------------------------------------------------------------------ called before every schedule

    def predict_s(self, depths: Sequence[int]) -> float:
        """Seconds until a request arriving now is answered: its time in the API server, the queued
        work of every stage (later stages run first), the share of earlier stages' work that goes
        on, and the new request."""
        total, carried = self.front_s or 0.0, 1.0  # carried: requests flowing into this stage from earlier ones
        for stage, depth in enumerate(depths):
            load = depth + carried
            total += self._batched_s(stage, load)
            go_on = self.go_on[stage]
            carried = load * (1.0 if go_on is None else go_on)  # unmeasured: all go on
        return total

    def decide(self, depths: Sequence[int]) -> float:
        """One control step from the current queue depths; returns the (maybe new) level."""
        cfg, now = self.config, self.clock()
        self.predicted_s = self.predict_s(depths)
        if self.predicted_s > cfg.down_above * cfg.slo_s:
            if self.level > 0 and now - self._last_down >= cfg.down_interval_s:
                self.level = max(0.0, round(self.level - cfg.step_down, 6))
                self._last_down = now
        elif self.predicted_s < cfg.recover_below * cfg.slo_s and self.level < 1:
            if now - self._last_down >= cfg.hold_s and now - self._last_up >= cfg.up_interval_s:
                self.level = min(1.0, round(self.level + cfg.step_up, 6))
                self._last_up = now
        return self.level

    def overdue(self, stage: int, arrivals: Sequence[float], depths: Sequence[int]) -> list[int]:
        """Positions in ``stage``'s queue (oldest first, ``arrivals`` in monotonic seconds) whose
        request would finish that stage after its SLO: the later stages' queues run first, then the
        queue's batches in order."""
        now, t = self.clock(), self.per_image_s[stage]
        if t is None or not arrivals:
            return []
        ahead = sum(self._batched_s(s, depths[s]) for s in range(stage + 1, len(depths)))
        slo = self.config.slo_s
        return [p for p, arrived in enumerate(arrivals) if now + ahead + (p + 1) * t > arrived + slo]

    def _batched_s(self, stage: int, load: float) -> float:
        """Time to run ``load`` requests through one stage (0 before any estimate). The time per
        image is measured at the batches the stage ran: small while the queues are short, full
        ones under load, so ``load * time per image`` follows the batching the load brings."""
        t = self.per_image_s[stage]
        return 0.0 if t is None else max(0.0, load) * t
