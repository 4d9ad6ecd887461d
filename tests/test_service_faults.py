"""Faults injected inside the engine core process, in its stage batches, never by editing the model.

An exception fails only its batch; a batch that runs out of device memory (a real
``torch.OutOfMemoryError``, raised by the probe's hook inside the engine) is retried in halves, so
everyone is answered when the halves fit; an image that does not fit even alone fails alone. Each
test queues requests behind a paused engine in a known order, so the batches are known, then sets
the fault, and checks every answer and that nothing is left inside the engine.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import metric_value
from tests.test_service_limits import assert_error, post_image, wait_for_metric

@pytest.fixture
def background():
    with ThreadPoolExecutor(16) as pool:
        yield pool


@pytest.fixture
def server(start_server, probe):
    """Batches of 4 at every stage, no max wait: queued requests form full batches in order."""
    return start_server(probe, max_batch_size=[4], max_wait_ms=[0.0])


def reference_answers(server, images: list[bytes], threshold: float) -> list[dict]:
    """Each image answered alone, before any fault."""
    answers = []
    for image in images:
        response = post_image(server.url, image, threshold=threshold, top_k=3)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def queue_behind_paused_engine(server, probe, background, images, threshold):
    """The engine is paused while ``images`` are admitted one by one, in order (so the batches are
    known); it runs again once the test has set its fault. Returns the futures and request ids."""
    probe.pause()
    futures, first = [], len(probe.admitted)
    for image in images:
        futures.append(background.submit(post_image, server.url, image, threshold=threshold, top_k=3))
        probe.wait_admitted(first + len(futures))
    return futures, probe.admitted[first:]


def same_answer(response: httpx.Response, reference: dict) -> bool:
    answer = response.json()
    return (answer["class_index"], answer["exit_stage"]) == (
        reference["class_index"], reference["exit_stage"],
    ) and answer["confidence"] == pytest.approx(reference["confidence"], abs=1e-6)  # fmt: skip


def assert_idle_and_serving(server, probe, image: bytes) -> None:
    """Nothing is left inside the engine core process, and it still answers."""
    probe.wait_idle()
    assert post_image(server.url, image).status_code == 200


def batch_failures(server, stage: int, cause: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "thinkingvit_batch_failures_total", stage=str(stage), cause=cause)


# ---------------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize("stage", [0, 1])
def test_an_exception_in_a_stage_batch_fails_only_that_batch(server, probe, background, test_images, stage):
    images = test_images[:8]
    reference = reference_answers(server, images, threshold=1.0)  # every image runs both stages
    futures, ids = queue_behind_paused_engine(server, probe, background, images, threshold=1.0)
    failing = set(ids[:4])  # the first full batch, at every stage
    probe.add_rule(action="raise", stage=stage, ids_any=sorted(failing), message=f"injected fault at stage {stage}")
    probe.resume()
    for request_id, future, ref in zip(ids, futures, reference):
        response = future.result()
        if request_id in failing:
            error = assert_error(response, 500, "error")
            assert f"injected fault at stage {stage}" in error["message"]
        else:
            assert response.status_code == 200 and same_answer(response, ref)
    assert (stage, tuple(ids[:4])) in probe.batches
    assert batch_failures(server, stage, "error") == 1
    assert_idle_and_serving(server, probe, images[0])


# ---------------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("stage", [0, 1])
def test_out_of_memory_batches_are_retried_in_halves(server, probe, background, test_images, stage):
    """The device fits one image at a time: every batch of 4 is split 4 -> 2 + 2 -> 1 + 1 + 1 + 1,
    and every request is answered exactly as without the fault."""
    images = test_images[:8]
    reference = reference_answers(server, images, threshold=1.0)
    futures, ids = queue_behind_paused_engine(server, probe, background, images, threshold=1.0)
    probe.add_rule(action="oom", stage=stage, min_size=2)  # a real torch.OutOfMemoryError
    probe.resume()
    for future, ref in zip(futures, reference):
        response = future.result()
        assert response.status_code == 200, response.text
        assert same_answer(response, ref)
    at_stage = [batch for s, batch in probe.batches if s == stage and set(batch) <= set(ids)]
    assert sorted(len(b) for b in at_stage) == [1] * 8 + [2] * 4 + [4] * 2
    assert batch_failures(server, stage, "out_of_memory") == 2 + 4  # each batch of 4 and its halves
    assert_idle_and_serving(server, probe, images[0])


@pytest.mark.parametrize("stage", [0, 1])
def test_an_image_that_does_not_fit_alone_fails_alone(server, probe, background, test_images, stage):
    images = test_images[:4]
    reference = reference_answers(server, images, threshold=1.0)
    futures, ids = queue_behind_paused_engine(server, probe, background, images, threshold=1.0)
    victim = ids[1]
    probe.add_rule(action="oom", stage=stage, ids_any=[victim])
    probe.resume()
    for request_id, future, ref in zip(ids, futures, reference):
        response = future.result()
        if request_id == victim:
            assert_error(response, 503, "out_of_memory")
            assert "retry-after" in response.headers
        else:
            assert response.status_code == 200 and same_answer(response, ref)
    assert_idle_and_serving(server, probe, images[0])


def test_a_request_cancelled_during_a_retry_is_not_computed(server, probe, background, test_images):
    """Batch [1, 2, 3, 4] runs out of memory; while its first half is held inside the engine, the
    client of request 4 hangs up. The second half then runs request 3 only, and nothing of request
    4 is left."""
    images = test_images[:4]
    futures, ids = queue_behind_paused_engine(server, probe, background, images[:3], threshold=1.0)
    port = int(server.url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /classify?threshold=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(images[3])}\r\n\r\n"
    )
    client.sendall(head.encode() + images[3])
    probe.wait_admitted(4)
    victim = probe.admitted[-1]
    probe.add_rule(action="oom", stage=0, min_size=4)
    probe.add_rule(action="hold", stage=0, ids_equal=ids[:2])
    probe.resume()
    probe.wait_held()
    client.close()
    # the API server counts the cancel after it has sent the abort to the engine
    wait_for_metric(server.url, "thinkingvit_requests_total", 1, outcome="cancelled")
    probe.release()
    assert [f.result().status_code for f in futures] == [200, 200, 200]
    probe.wait_aborted(1)
    assert probe.aborted == [victim]
    after_oom = probe.batches[probe.batches.index((0, (*ids, victim))) + 1 :]
    assert [batch for stage, batch in after_oom if stage == 0] == [tuple(ids[:2]), (ids[2],)]
    assert all(victim not in batch for _, batch in after_oom)
    assert_idle_and_serving(server, probe, images[0])


# ---------------------------------------------------------------------------------- a wedged engine


def readiness(url: str) -> tuple[int, str]:
    response = httpx.get(f"{url}/readyz")
    return response.status_code, response.json()["status"]


def wait_readiness(url: str, expected: tuple[int, str]) -> None:
    """Ask /readyz until it answers ``expected``; bounded by a count of round trips, no sleep."""
    with httpx.Client(base_url=url) as client:
        for _ in range(20_000):
            response = client.get("/readyz")
            if (response.status_code, response.json()["status"]) == expected:
                return
    raise AssertionError(f"/readyz never answered {expected}: last {readiness(url)}")


def test_a_wedged_engine_fails_readiness_and_its_requests_time_out(start_server, probe, test_images, background):
    """A batch blocks inside the live engine: once requests have waited ``engine_stall_s`` with no
    loop turn, /readyz answers 503 "stalled" (a balancer takes the server out) while /healthz stays
    200 (nothing to restart yet); the waiting requests get 504 at their deadline, not a hang; once
    the batch ends the server is ready again and answers. Stalled stays stalled after the waiting
    requests gave up: the engine still holds its batch, and a balancer must not send new ones."""
    server = start_server(probe, engine_stall_s=0.5, max_batch_size=[1], max_wait_ms=[0.0])
    assert readiness(server.url) == (200, "ready"), "an idle engine is not stalled, however long idle"
    probe.hold_next_batch()
    stuck = [background.submit(post_image, server.url, image, timeout_ms=3000) for image in test_images[:3]]
    probe.wait_held()
    wait_readiness(server.url, (503, "stalled"))
    assert httpx.get(f"{server.url}/healthz").status_code == 200
    for future in stuck:
        assert_error(future.result(), 504, "timeout")
    assert readiness(server.url) == (503, "stalled"), "still wedged once nobody waits: still out"
    probe.release()
    wait_readiness(server.url, (200, "ready"))
    assert_idle_and_serving(server, probe, test_images[0])
