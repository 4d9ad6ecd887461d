"""The latency SLO controller alone (a fake clock, no engine), and the scheduler's side of it."""

from __future__ import annotations

import pytest

from service.slo import SloConfig, SloController, effective_threshold
from tests.test_scheduler import FakeClock, make_scheduler

SLO_S = 0.2


def make_controller(clock=None, **overrides) -> SloController:
    config = dict(slo_s=SLO_S, num_stages=2)
    config.update(overrides)
    return SloController(SloConfig(**config), clock=clock or FakeClock())


def burst(controller: SloController, clock: FakeClock, depths, steps: int, every_s: float = 0.05) -> list[float]:
    """``steps`` control decisions ``every_s`` apart with these queue depths; the levels."""
    levels = []
    for _ in range(steps):
        clock.advance(every_s)
        levels.append(controller.decide(depths))
    return levels


def measured(controller: SloController, per_image_s=(0.001, 0.002), go_on=0.5) -> SloController:
    """As after a batch of 10 at each stage."""
    controller.observe(0, 10, 10 * per_image_s[0], moved_on=round(10 * go_on))
    controller.observe(1, 10, 10 * per_image_s[1], moved_on=0)
    return controller


def test_effective_threshold_runs_from_floor_to_requested():
    assert effective_threshold(0.9, 0.3, 1.0) == 0.9
    assert effective_threshold(0.9, 0.3, 0.0) == 0.3
    assert effective_threshold(0.9, 0.3, 0.5) == pytest.approx(0.6)


def test_prediction_sums_queued_work_and_the_share_that_goes_on():
    controller = measured(make_controller())
    # stage 0: 100 queued + the new one at 1 ms; stage 1: 20 queued + half of 101 at 2 ms
    assert controller.predict_s([100, 20]) == pytest.approx(101 * 0.001 + (20 + 50.5) * 0.002)


def test_time_in_the_api_server_counts_against_the_slo():
    controller = measured(make_controller())
    before = controller.predict_s([10, 0])
    controller.observe_admission(0.05)
    assert controller.predict_s([10, 0]) == pytest.approx(before + 0.05)


def test_estimates_move_with_each_batch():
    controller = measured(make_controller(smoothing=0.5))
    controller.observe(0, 10, 10 * 0.003, moved_on=10)
    assert controller.per_image_s[0] == pytest.approx(0.002)
    assert controller.go_on[0] == pytest.approx(0.75)


def test_no_estimate_no_action():
    clock = FakeClock()
    controller = make_controller(clock)
    assert burst(controller, clock, [256, 256], 5) == [1.0] * 5


def test_steps_down_under_a_burst_one_step_at_a_time_to_the_floor():
    clock = FakeClock()
    controller = measured(make_controller(clock))
    levels = burst(controller, clock, [200, 50], 12)
    assert levels[:3] == pytest.approx([0.9, 0.8, 0.7])
    assert levels[-1] == 0.0 and min(levels) == 0.0  # never below level 0: each request's floor


def test_steps_down_at_most_every_down_interval():
    clock = FakeClock()
    controller = measured(make_controller(clock, down_interval_s=0.09))
    assert burst(controller, clock, [200, 50], 4, every_s=0.05) == pytest.approx([0.9, 0.9, 0.8, 0.8])


def test_holds_between_the_marks():
    clock = FakeClock()
    controller = measured(make_controller(clock))
    burst(controller, clock, [200, 50], 3)
    # 60 queued: 0.061 + (0 + 30.5) * 0.002 = 0.122 s, between 0.4 and 0.8 of the SLO
    assert burst(controller, clock, [60, 0], 20) == pytest.approx([0.7] * 20)


def test_recovers_after_the_hold_one_step_per_interval():
    clock = FakeClock()
    controller = measured(make_controller(clock, hold_s=0.52, up_interval_s=0.18))
    burst(controller, clock, [200, 50], 12)  # the last step down at the 10th
    assert controller.level == 0.0
    levels = burst(controller, clock, [0, 0], 50)  # 2.5 s of empty queues
    assert levels[:8] == [0.0] * 8  # within the hold: 0.1 + 0.4 s after the last step down
    assert levels[8] == pytest.approx(0.1)
    assert levels == sorted(levels) and len(set(levels)) == 11  # back up, one step at a time
    assert levels.index(1.0) == 8 + 9 * 4  # a step every 4th decision (0.2 s): 2.35 s after


def test_overdue_picks_the_requests_that_would_finish_after_the_slo():
    clock = FakeClock()
    controller = measured(make_controller(clock))
    now = clock.now
    # stage 1 at 2 ms per image: position p finishes at now + (p + 1) * 2 ms
    arrivals = [now - 0.199, now - 0.195, now - 0.1, now - 0.5]
    assert controller.overdue(1, arrivals, [0, 4]) == [0, 3]


def test_overdue_counts_later_stages_first():
    clock = FakeClock()
    controller = make_controller(clock, num_stages=3)
    for stage in range(3):
        controller.observe(stage, 10, 0.01, moved_on=5)
    now = clock.now
    assert controller.overdue(1, [now - 0.1], [0, 1, 0]) == []
    assert controller.overdue(1, [now - 0.1], [0, 1, 100]) == [0]  # 100 ms of stage 2 run first


# ---------------------------------------------------------------------------------- the scheduler


def test_level_lowers_waiting_and_new_requests_to_no_less_than_their_floor():
    scheduler = make_scheduler()
    scheduler.add(0, 0.9, min_threshold=0.5)
    scheduler.add(1, 0.8)  # no floor given: never lowered
    scheduler.set_level(0.0)
    scheduler.add(2, 0.9, min_threshold=0.1)
    assert [scheduler.requests[i].threshold for i in range(3)] == pytest.approx([0.5, 0.8, 0.1])
    scheduler.set_level(1.0)
    assert [scheduler.requests[i].threshold for i in range(3)] == pytest.approx([0.9, 0.8, 0.9])


def test_arrival_is_when_the_server_took_the_request_in():
    scheduler = make_scheduler()
    scheduler.add(0, 0.9, min_threshold=0.1, arrived_at=scheduler.clock() - 0.03)
    scheduler.add(1, 0.9)
    assert scheduler.arrivals(0) == [scheduler.clock() - 0.03, scheduler.clock()]


def test_plan_carries_the_effective_threshold():
    scheduler = make_scheduler()
    scheduler.add(0, 0.9, min_threshold=0.3)
    scheduler.set_level(0.5)
    plan = _due_plan(scheduler)
    assert plan.thresholds == pytest.approx((0.6,))


def test_a_request_moving_on_takes_the_level_of_its_new_queue():
    scheduler = make_scheduler()
    scheduler.add(0, 0.9, min_threshold=0.1)
    plan = _due_plan(scheduler)
    scheduler.set_level(0.0)
    assert scheduler.update(plan, [0.05]).moved_on == (0,)
    assert scheduler.requests[0].threshold == pytest.approx(0.1)


def test_cut_short_answers_later_stage_requests_that_pass_their_floor():
    scheduler = make_scheduler()
    scheduler.add(0, 0.9, min_threshold=0.0)
    scheduler.add(1, 0.9, min_threshold=0.5)
    scheduler.add(2, 0.9)  # no floor: may not be cut
    plan = _due_plan(scheduler)
    scheduler.update(plan, [0.3, 0.3, 0.3])
    assert scheduler.arrivals(1) == [scheduler.requests[i].arrived_at for i in range(3)]
    assert scheduler.cut_short(1, [0, 1, 2]) == (0,)
    assert scheduler.num_waiting(1) == 2 and 0 not in scheduler.requests
    with pytest.raises(ValueError):
        scheduler.cut_short(0, [0])


def _due_plan(scheduler):
    scheduler.clock.advance(1.0)  # past every max wait
    plan = scheduler.schedule()
    assert plan.stage is not None
    return plan
