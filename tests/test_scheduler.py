"""The scheduler alone: no torch, no HTTP, a fake clock and a fake executor."""

from __future__ import annotations

import random

import pytest

from service.scheduler import QueueFull, SchedulePlan, Scheduler, SchedulerConfig


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_scheduler(clock=None, **overrides) -> Scheduler:
    config = dict(num_stages=2, max_batch_sizes=(4, 4), max_wait_s=(0.01, 0.01), max_queue_size=64)
    config.update(overrides)
    return Scheduler(SchedulerConfig(**config), clock=clock or FakeClock(), check_invariants=True)


def make_requests(scheduler: Scheduler, n: int, start: int = 0, threshold=0.5, deadline=None) -> list[int]:
    ids = list(range(start, start + n))
    for request_id in ids:
        scheduler.add(request_id, threshold, deadline)
    return ids


CONFIDENT, UNSURE = 1.0, 0.0  # with the usual thresholds in (0, 1): exits, goes on


def run(scheduler: Scheduler, plan: SchedulePlan, exits) -> tuple[int, ...]:
    """The fake executor: ``exits`` is a set of ids that are confident at this stage, or a bool for
    all; returns the requests that finished."""
    sure = [exits if isinstance(exits, bool) else r in exits for r in plan.request_ids]
    return scheduler.update(plan, [CONFIDENT if s else UNSURE for s in sure]).finished


# ---------------------------------------------------------------------------------- batching


def test_full_batch_runs_without_waiting():
    scheduler = make_scheduler()
    ids = make_requests(scheduler, 4)
    plan = scheduler.schedule()
    assert plan.stage == 0 and plan.request_ids == tuple(ids)


def test_partial_batch_waits_until_max_wait():
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    make_requests(scheduler, 2)
    plan = scheduler.schedule()
    assert plan.stage is None and plan.next_due_s == pytest.approx(0.01)
    clock.advance(0.004)
    assert scheduler.schedule().next_due_s == pytest.approx(0.006)
    clock.advance(0.006)
    assert scheduler.schedule().request_ids == (0, 1)


def test_max_wait_zero_runs_any_request_at_once():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    make_requests(scheduler, 1)
    assert scheduler.schedule().request_ids == (0,)


def test_batch_is_capped_and_fifo():
    scheduler = make_scheduler()
    make_requests(scheduler, 10)
    batches = [scheduler.schedule().request_ids for _ in range(2)]
    assert batches == [(0, 1, 2, 3), (4, 5, 6, 7)]


def test_per_stage_max_batch_size():
    clock = FakeClock()
    scheduler = make_scheduler(clock, max_batch_sizes=(2, 3))
    for start in (0, 2):
        make_requests(scheduler, 2, start=start)
        run(scheduler, scheduler.schedule(), exits=False)
    plan = scheduler.schedule()
    assert plan.stage == 1 and plan.request_ids == (0, 1, 2)


def test_empty_scheduler_plans_nothing():
    plan = make_scheduler().schedule()
    assert plan == SchedulePlan(None)


def test_plan_carries_thresholds_and_queue_wait():
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    scheduler.add(7, 0.25)
    clock.advance(0.003)
    scheduler.add(8, 0.75)
    clock.advance(0.01)
    plan = scheduler.schedule()
    assert plan.thresholds == (0.25, 0.75)
    assert plan.queue_wait_s == pytest.approx((0.013, 0.01))


# ---------------------------------------------------------------------------------- exits and re-queueing


def test_exited_requests_finish_and_the_rest_move_on():
    scheduler = make_scheduler()
    make_requests(scheduler, 4)
    finished = run(scheduler, scheduler.schedule(), exits={1, 3})
    assert finished == (1, 3)
    assert scheduler.num_waiting(1) == 2 and set(scheduler.requests) == {0, 2}


def test_last_stage_finishes_everyone():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    make_requests(scheduler, 2)
    run(scheduler, scheduler.schedule(), exits=False)
    plan = scheduler.schedule()
    assert plan.stage == 1
    assert run(scheduler, plan, exits=False) == (0, 1)
    assert not scheduler.requests


def test_survivors_of_several_batches_share_a_later_batch():
    clock = FakeClock()
    scheduler = make_scheduler(clock, max_batch_sizes=(4, 4))
    make_requests(scheduler, 8)
    run(scheduler, scheduler.schedule(), exits={0, 1})  # 2, 3 go on
    run(scheduler, scheduler.schedule(), exits={4, 5})  # 6, 7 go on
    plan = scheduler.schedule()
    assert plan.stage == 1 and plan.request_ids == (2, 3, 6, 7)


def test_three_stages_walk_through_every_queue():
    scheduler = make_scheduler(num_stages=3, max_batch_sizes=(2, 2, 2), max_wait_s=(0, 0, 0))
    make_requests(scheduler, 2)
    stages = []
    while scheduler.requests:
        plan = scheduler.schedule()
        stages.append(plan.stage)
        run(scheduler, plan, exits=False)
    assert stages == [0, 1, 2]


def test_update_rejects_wrong_confidence_count():
    scheduler = make_scheduler()
    make_requests(scheduler, 4)
    with pytest.raises(ValueError, match="confidences for a batch of"):
        scheduler.update(scheduler.schedule(), [CONFIDENT])


# ---------------------------------------------------------------------------------- explain=all (run_all)


def test_exit_stages_name_the_stage_each_request_left_at():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    make_requests(scheduler, 2)
    assert scheduler.update(scheduler.schedule(), [CONFIDENT, UNSURE]).exit_stages == {0: 0}
    assert scheduler.update(scheduler.schedule(), [UNSURE]).exit_stages == {1: 1}


def test_run_all_request_goes_on_though_confident_and_keeps_its_exit_stage():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    scheduler.add(0, threshold=0.5, run_all=True)
    first = scheduler.update(scheduler.schedule(), [CONFIDENT])
    assert first.finished == () and first.moved_on == (0,)
    plan = scheduler.schedule()
    assert plan.stage == 1
    last = scheduler.update(plan, [UNSURE])
    assert last.finished == (0,) and last.exit_stages == {0: 0}  # where its threshold let it go


def test_run_all_request_that_never_meets_its_threshold_exits_at_the_last_stage():
    scheduler = make_scheduler(num_stages=3, max_batch_sizes=(2, 2, 2), max_wait_s=(0, 0, 0))
    scheduler.add(0, threshold=0.5, run_all=True)
    updates = [scheduler.update(scheduler.schedule(), [UNSURE]) for _ in range(3)]
    assert [u.moved_on for u in updates] == [(0,), (0,), ()]
    assert updates[-1].exit_stages == {0: 2}


def test_run_all_first_confident_stage_counts_not_a_later_one():
    scheduler = make_scheduler(num_stages=3, max_batch_sizes=(2, 2, 2), max_wait_s=(0, 0, 0))
    scheduler.add(0, threshold=0.5, run_all=True)
    for confidence in (UNSURE, CONFIDENT, CONFIDENT):
        update = scheduler.update(scheduler.schedule(), [confidence])
    assert update.finished == (0,) and update.exit_stages == {0: 1}


def test_run_all_request_shares_batches_with_plain_ones():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    scheduler.add(0, threshold=0.5, run_all=True)
    make_requests(scheduler, 1, start=1)
    assert run(scheduler, scheduler.schedule(), exits=True) == (1,)  # the plain one leaves
    plan = scheduler.schedule()
    assert plan.request_ids == (0,)
    assert scheduler.update(plan, [UNSURE]).exit_stages == {0: 0}


def test_aborted_run_all_request_is_dropped_not_finished():
    scheduler = make_scheduler(max_wait_s=(0.0, 0.0))
    scheduler.add(0, threshold=0.5, run_all=True)
    plan = scheduler.schedule()
    scheduler.abort(0)
    update = scheduler.update(plan, [CONFIDENT])
    assert update.finished == () and update.exit_stages == {}
    assert scheduler.schedule().aborted == (0,)


# ---------------------------------------------------------------------------------- policy


def test_due_later_stage_goes_before_full_first_stage():
    scheduler = make_scheduler(max_batch_sizes=(2, 2))
    make_requests(scheduler, 2)
    run(scheduler, scheduler.schedule(), exits=False)  # stage-1 queue: 0, 1 (full)
    make_requests(scheduler, 2, start=2)  # stage-0 queue full too
    assert scheduler.schedule().stage == 1


def test_later_stage_that_waited_its_max_goes_first():
    clock = FakeClock()
    scheduler = make_scheduler(clock, max_batch_sizes=(2, 4))
    make_requests(scheduler, 2)
    run(scheduler, scheduler.schedule(), exits={0})  # stage-1 queue: 1 (partial)
    make_requests(scheduler, 2, start=2)  # stage-0 queue full
    assert scheduler.schedule().stage == 0  # stage 1 not due yet: the full queue goes
    make_requests(scheduler, 2, start=4)
    clock.advance(0.01)
    assert scheduler.schedule().stage == 1


def test_partial_later_stage_does_not_block_a_full_first_stage():
    scheduler = make_scheduler(max_batch_sizes=(2, 4))
    make_requests(scheduler, 2)
    run(scheduler, scheduler.schedule(), exits={0})
    make_requests(scheduler, 2, start=2)
    plan = scheduler.schedule()
    assert plan.stage == 0 and plan.request_ids == (2, 3)


def test_fullest_due_queue_goes_when_no_later_stage_is_due():
    clock = FakeClock()
    config = dict(num_stages=3, max_batch_sizes=(4, 8, 8), max_wait_s=(0.01, 1.0, 1.0))
    scheduler = make_scheduler(clock, **config)
    make_requests(scheduler, 3)
    clock.advance(0.01)
    assert scheduler.schedule().stage == 0  # the only due queue, though partial


def test_fullest_of_two_due_later_stages_goes():
    clock = FakeClock()
    config = dict(num_stages=3, max_batch_sizes=(8, 4, 4), max_wait_s=(0.0, 1.0, 1.0))
    scheduler = make_scheduler(clock, **config)
    make_requests(scheduler, 3)
    run(scheduler, scheduler.schedule(), exits=False)
    clock.advance(1.0)
    run(scheduler, scheduler.schedule(), exits={0})  # stage 2 queue: 1, 2
    make_requests(scheduler, 4, start=10)
    run(scheduler, scheduler.schedule(), exits=False)  # stage 1 queue: 10..13, full
    clock.advance(1.0)  # both later queues due
    assert scheduler.num_waiting(1) == 4 and scheduler.num_waiting(2) == 2
    assert scheduler.schedule().stage == 1


def test_no_request_starves_under_constant_first_stage_load():
    """Stage-0 queue always full; survivors still get through once they waited their max."""
    clock = FakeClock()
    scheduler = make_scheduler(clock, max_batch_sizes=(4, 4), max_wait_s=(0.01, 0.01))
    make_requests(scheduler, 4)
    run(scheduler, scheduler.schedule(), exits={0, 1, 2})  # request 3 goes on
    next_id = 100
    for _ in range(3):
        make_requests(scheduler, 4, start=next_id)
        next_id += 4
        clock.advance(0.004)
        plan = scheduler.schedule()
        if plan.stage == 1:
            break
        run(scheduler, plan, exits=True)
    assert plan.stage == 1 and plan.request_ids == (3,)


# ---------------------------------------------------------------------------------- deadlines


def test_expired_requests_are_dropped_and_reported():
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    scheduler.add(0, 0.5, deadline=clock.now + 0.005)
    scheduler.add(1, 0.5, deadline=clock.now + 1.0)
    clock.advance(0.01)
    plan = scheduler.schedule()
    assert plan.expired == (0,) and plan.request_ids == (1,)
    assert 0 not in scheduler.requests


def test_requests_expire_in_later_stage_queues():
    clock = FakeClock()
    scheduler = make_scheduler(clock, max_wait_s=(0.0, 1.0))
    scheduler.add(0, 0.5, deadline=clock.now + 0.5)
    run(scheduler, scheduler.schedule(), exits=False)
    clock.advance(0.6)
    plan = scheduler.schedule()
    assert plan.expired == (0,) and plan.stage is None and not scheduler.requests


def test_requests_without_deadline_never_expire():
    clock = FakeClock()
    scheduler = make_scheduler(clock)
    make_requests(scheduler, 1)
    clock.advance(1e6)
    assert scheduler.schedule().request_ids == (0,)


# ---------------------------------------------------------------------------------- cancellation


def test_abort_waiting_request_removes_it_and_reports_it_once():
    scheduler = make_scheduler()
    make_requests(scheduler, 3)
    assert scheduler.abort(1)
    plan = scheduler.schedule()
    assert 1 not in plan.request_ids and plan.aborted == (1,)
    assert scheduler.schedule().aborted == ()


def test_abort_running_request_drops_it_at_update():
    scheduler = make_scheduler()
    make_requests(scheduler, 4)
    plan = scheduler.schedule()
    assert scheduler.abort(2)
    finished = run(scheduler, plan, exits={0})
    assert finished == (0,)
    assert 2 not in scheduler.requests and scheduler.num_waiting(1) == 2
    assert scheduler.schedule().aborted == (2,)


def test_abort_unknown_or_twice_returns_false():
    scheduler = make_scheduler()
    make_requests(scheduler, 4)
    plan = scheduler.schedule()
    assert not scheduler.abort(99)
    assert scheduler.abort(0) and not scheduler.abort(0)
    run(scheduler, plan, exits=True)
    assert not scheduler.abort(1)  # finished


def test_abort_in_later_stage_queue():
    scheduler = make_scheduler(max_wait_s=(0.0, 1.0))
    make_requests(scheduler, 2)
    run(scheduler, scheduler.schedule(), exits=False)
    assert scheduler.abort(0)
    assert scheduler.num_waiting(1) == 1 and scheduler.schedule().aborted == (0,)


# ---------------------------------------------------------------------------------- failures


def test_failed_batch_finishes_its_requests_only():
    scheduler = make_scheduler()
    make_requests(scheduler, 6)
    plan = scheduler.schedule()
    scheduler.abort(1)
    assert scheduler.fail(plan) == (0, 2, 3)
    assert set(scheduler.requests) == {4, 5}
    assert scheduler.schedule().aborted == (1,)


def test_update_of_an_unplanned_request_is_an_error():
    scheduler = make_scheduler()
    make_requests(scheduler, 2)
    with pytest.raises(ValueError, match="not in a running batch"):
        scheduler.update(SchedulePlan(0, request_ids=(0,), thresholds=(0.5,)), [CONFIDENT])


# ---------------------------------------------------------------------------------- bounded queue


def test_queue_full_refuses_new_requests():
    scheduler = make_scheduler(max_queue_size=3)
    make_requests(scheduler, 3)
    with pytest.raises(QueueFull):
        scheduler.add(3, 0.5)
    assert scheduler.num_waiting() == 3


def test_running_requests_do_not_count_against_the_queue():
    scheduler = make_scheduler(max_queue_size=4)
    make_requests(scheduler, 4)
    scheduler.schedule()
    make_requests(scheduler, 4, start=4)
    with pytest.raises(QueueFull):
        scheduler.add(8, 0.5)


def test_survivors_are_requeued_even_when_the_queue_is_full():
    scheduler = make_scheduler(max_queue_size=4)
    make_requests(scheduler, 4)
    plan = scheduler.schedule()
    make_requests(scheduler, 4, start=4)
    run(scheduler, plan, exits=False)
    assert scheduler.num_waiting() == 8


def test_duplicate_id_is_an_error():
    scheduler = make_scheduler()
    scheduler.add(1, 0.5)
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add(1, 0.5)


@pytest.mark.parametrize(
    "overrides",
    [dict(max_batch_sizes=(0, 4)), dict(max_wait_s=(-1, 0)), dict(max_queue_size=0), dict(max_wait_s=(0,))],
)
def test_config_is_validated(overrides):
    with pytest.raises(ValueError):
        make_scheduler(**overrides)


# ---------------------------------------------------------------------------------- invariants


def test_random_workload_keeps_every_request_accounted_for():
    """Random arrivals, exits, aborts and expiries: every request ends exactly once."""
    rng = random.Random(0)
    clock = FakeClock()
    scheduler = make_scheduler(
        clock, num_stages=3, max_batch_sizes=(5, 3, 2), max_wait_s=(0.002, 0.004, 0.004), max_queue_size=20
    )
    admitted, ended, next_id = set(), [], 0
    for _ in range(400):
        for _ in range(rng.randint(0, 3)):
            try:
                scheduler.add(next_id, rng.random(), deadline=clock.now + rng.uniform(0.001, 0.05),
                              run_all=rng.random() < 0.2)
                admitted.add(next_id)
            except QueueFull:
                pass
            next_id += 1
        if scheduler.requests and rng.random() < 0.1:
            request_id = rng.choice(list(scheduler.requests))
            scheduler.abort(request_id)
        clock.advance(rng.uniform(0, 0.005))
        plan = scheduler.schedule()
        ended += plan.expired + plan.aborted
        if plan.stage is not None:
            confidences = [rng.random() for _ in plan.request_ids]
            if rng.random() < 0.05:
                ended += scheduler.fail(plan)
            else:
                ended += scheduler.update(plan, confidences).finished
        assert len(set(ended)) == len(ended), "a request ended twice"
        live = set(scheduler.requests) | set(scheduler._aborted)
        assert live == admitted - set(ended)
    while scheduler.requests:
        clock.advance(1.0)
        plan = scheduler.schedule()
        ended += plan.expired + plan.aborted
    ended += scheduler.schedule().aborted
    assert sorted(ended) == sorted(admitted)
