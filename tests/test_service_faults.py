"""Faults injected inside stage batches through the before_batch hook, never by editing the model.

An exception fails only its batch; a batch that runs out of device memory is retried in halves,
so everyone is answered when the halves fit; an image that does not fit even alone fails alone.
Each test queues requests behind a held worker in a known order (request ids 1..n), so the
batches are known, then injects the fault and checks every answer and that nothing leaks.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.conftest import WorkerGate, metric_value
from tests.test_service_limits import assert_error, post_image

TIMEOUT_S = 60
Fault = Callable[[int, tuple[int, ...]], None]  # raises to fail the batch, may block


class FaultyDevice(WorkerGate):
    """WorkerGate's recording, plus holding the next batch on demand and running an injected fault."""

    def __init__(self):
        super().__init__()
        self.fault: Fault | None = None
        self._hold_next, self._held = threading.Event(), threading.Event()

    def hold_next_batch(self) -> None:
        self._hold_next.set()

    def wait_held(self) -> None:
        assert self._held.wait(TIMEOUT_S), "the worker never started the held batch"

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        self._wait_for(predicate, what)

    def _before_batch(self, stage: int, request_ids) -> None:
        if self._hold_next.is_set():
            self._hold_next.clear()
            self._held.set()
            assert self._released.wait(TIMEOUT_S), "the test never released the worker"
        with self._changed:
            self.batches.append((stage, tuple(request_ids)))
        if self.fault is not None:
            self.fault(stage, tuple(request_ids))


@pytest.fixture
def background():
    with ThreadPoolExecutor(16) as pool:
        yield pool


@pytest.fixture
def device():
    return FaultyDevice()


@pytest.fixture
def server(start_server, device):
    """Batches of 4 at every stage, no max wait: queued requests form full batches in order."""
    return start_server(device.hooks(), max_batch_size=[4], max_wait_ms=[0.0])


def reference_answers(server, images: list[bytes], threshold: float) -> list[dict]:
    """Each image answered alone, before any fault."""
    answers = []
    for image in images:
        response = post_image(server.url, image, threshold=threshold, top_k=3)
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def queue_behind_held_worker(server, device, background, images, threshold):
    """A blocker request holds the worker; then ``images`` are admitted one by one, in order.

    Returns the blocker's future, the futures of ``images`` and their request ids.
    """
    device.hold_next_batch()
    blocker = background.submit(post_image, server.url, images[0], threshold=threshold, top_k=3)
    device.wait_held()
    futures, first = [], len(device.admitted)
    for image in images:
        futures.append(background.submit(post_image, server.url, image, threshold=threshold, top_k=3))
        admitted = first + len(futures)
        device.wait_for(lambda n=admitted: len(device.admitted) >= n, f"request {admitted} admitted")
    return blocker, futures, device.admitted[first:]


def same_answer(response: httpx.Response, reference: dict) -> bool:
    answer = response.json()
    return (answer["class_index"], answer["exit_stage"]) == (
        reference["class_index"], reference["exit_stage"],
    ) and answer["confidence"] == pytest.approx(reference["confidence"], abs=1e-6)  # fmt: skip


def assert_idle_and_serving(server, image: bytes) -> None:
    engine = server.app.state.runtime.engine
    device_idle = engine.worker.submit(lambda: None)  # every release submitted before it has run
    device_idle.result(TIMEOUT_S)
    assert engine.in_flight() == {"futures": 0, "scheduled": 0, "waiting": 0, "carried": 0}
    assert post_image(server.url, image).status_code == 200


def batch_failures(server, stage: int, cause: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return metric_value(text, "thinkingvit_batch_failures_total", stage=str(stage), cause=cause)


# ---------------------------------------------------------------------------------- exceptions


@pytest.mark.parametrize("stage", [0, 1])
def test_an_exception_in_a_stage_batch_fails_only_that_batch(server, device, background, test_images, stage):
    images = test_images[:8]
    reference = reference_answers(server, images, threshold=1.0)  # every image runs both stages
    blocker, futures, ids = queue_behind_held_worker(server, device, background, images, threshold=1.0)
    failing = set(ids[:4])  # the first full batch after the blocker, at every stage

    def fault(batch_stage, batch_ids):
        if batch_stage == stage and failing & set(batch_ids):
            raise RuntimeError(f"injected fault at stage {stage}")

    device.fault = fault
    device.release()
    assert blocker.result().status_code == 200
    for request_id, future, ref in zip(ids, futures, reference):
        response = future.result()
        if request_id in failing:
            error = assert_error(response, 500, "error")
            assert f"injected fault at stage {stage}" in error["message"]
        else:
            assert response.status_code == 200 and same_answer(response, ref)
    assert (stage, tuple(ids[:4])) in device.batches
    assert batch_failures(server, stage, "error") == 1
    assert_idle_and_serving(server, images[0])


# ---------------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("stage", [0, 1])
def test_out_of_memory_batches_are_retried_in_halves(server, device, background, test_images, stage):
    """The device fits one image at a time: every batch of 4 is split 4 -> 2 + 2 -> 1 + 1 + 1 + 1,
    and every request is answered exactly as without the fault."""
    images = test_images[:8]
    reference = reference_answers(server, images, threshold=1.0)
    blocker, futures, ids = queue_behind_held_worker(server, device, background, images, threshold=1.0)

    def fault(batch_stage, batch_ids):
        if batch_stage == stage and len(batch_ids) > 1:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    device.fault = fault
    device.release()
    assert blocker.result().status_code == 200
    for future, ref in zip(futures, reference):
        response = future.result()
        assert response.status_code == 200, response.text
        assert same_answer(response, ref)
    at_stage = [batch for s, batch in device.batches if s == stage and set(batch) <= set(ids)]
    assert sorted(len(b) for b in at_stage) == [1] * 8 + [2] * 4 + [4] * 2
    assert batch_failures(server, stage, "out_of_memory") == 2 + 4  # each batch of 4 and its halves
    assert_idle_and_serving(server, images[0])


@pytest.mark.parametrize("stage", [0, 1])
def test_an_image_that_does_not_fit_alone_fails_alone(server, device, background, test_images, stage):
    images = test_images[:4]
    reference = reference_answers(server, images, threshold=1.0)
    blocker, futures, ids = queue_behind_held_worker(server, device, background, images, threshold=1.0)
    victim = ids[1]

    def fault(batch_stage, batch_ids):
        if batch_stage == stage and victim in batch_ids:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")

    device.fault = fault
    device.release()
    assert blocker.result().status_code == 200
    for request_id, future, ref in zip(ids, futures, reference):
        response = future.result()
        if request_id == victim:
            assert_error(response, 503, "out_of_memory")
            assert "retry-after" in response.headers
        else:
            assert response.status_code == 200 and same_answer(response, ref)
    assert_idle_and_serving(server, images[0])


def test_a_request_cancelled_during_a_retry_is_not_computed(server, device, background, test_images):
    """Batch [1, 2, 3, 4] runs out of memory; while its first half runs, the client of request 4
    hangs up. The second half then runs request 3 only, and nothing of request 4 is left."""
    images = test_images[:4]
    blocker, futures, ids = queue_behind_held_worker(server, device, background, images[:3], threshold=1.0)
    port = int(server.url.rsplit(":", 1)[1])
    client = socket.create_connection(("127.0.0.1", port))
    head = (
        "POST /classify?threshold=1 HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(images[3])}\r\n\r\n"
    )
    admitted_before = len(device.admitted)
    client.sendall(head.encode() + images[3])
    device.wait_for(lambda: len(device.admitted) > admitted_before, "the raw client admitted")
    victim = device.admitted[-1]
    first_half_running, cancelled = threading.Event(), threading.Event()

    def fault(stage, batch_ids):
        if stage == 0 and len(batch_ids) == 4:
            raise torch.OutOfMemoryError("injected: CUDA out of memory")
        if stage == 0 and batch_ids == tuple(ids[:2]):
            first_half_running.set()
            assert cancelled.wait(TIMEOUT_S)

    device.fault = fault
    device.release()
    assert first_half_running.wait(TIMEOUT_S)
    client.close()
    device.wait_for(lambda: victim in device.aborted, "the raw client's request aborted")
    cancelled.set()
    assert blocker.result().status_code == 200
    assert [f.result().status_code for f in futures] == [200, 200, 200]
    after_oom = device.batches[device.batches.index((0, (*ids, victim))) + 1 :]
    assert [batch for stage, batch in after_oom if stage == 0] == [tuple(ids[:2]), (ids[2],)]
    assert all(victim not in batch for _, batch in after_oom)
    assert_idle_and_serving(server, images[0])
