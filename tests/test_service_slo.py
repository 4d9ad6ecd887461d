"""target_accuracy, min_threshold and the latency SLO over real HTTP, on real servers.

Bursts are made deterministic with the EngineProbe: the engine is paused until every request of the
burst is queued, so with a 1 ms SLO every one of them has waited far past it when the engine
resumes; nothing waits on sleeps.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.settings import DEFAULT_CHECKPOINT
from tests.conftest import metric_value
from tests.test_service_limits import assert_error, post_image


def burst(server, images: list[bytes], params: list[dict]) -> list[dict]:
    """Pause the engine, queue one request per params, resume; the answers, in order."""
    probe = server.probe
    admitted = len(probe.admitted)
    probe.pause()
    with ThreadPoolExecutor(len(params)) as pool:
        futures = [pool.submit(post_image, server.url, images[i % len(images)], **p) for i, p in enumerate(params)]
        probe.wait_admitted(admitted + len(params))
        probe.resume()
        responses = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


# ---------------------------------------------------------------------------------- parameters


@pytest.fixture(scope="module")
def shipped_server(tmp_path_factory):
    """The shipped checkpoint (its calibration profile in fractions), no SLO, engine probe attached."""
    from tests.conftest import launch_server
    from tests.engine_probe import EngineProbe

    probe = EngineProbe()
    server = launch_server(probe, tmp_path_factory.mktemp("logs"), checkpoint=DEFAULT_CHECKPOINT)
    yield server
    server.stop()
    probe.close()


BAD = [
    ({"threshold": 0.5, "target_accuracy": 0.9}, "not both"),
    ({"target_accuracy": 0.99}, "at best 0.913 (threshold 0.85)"),  # the shipped profile's best row
    ({"threshold": 0.5, "min_threshold": 0.6}, "min_threshold: must be <= the threshold (0.5)"),
    ({"min_threshold": 0.9}, "min_threshold: must be <= the threshold (0.8)"),  # the default threshold
    ({"target_accuracy": 0.9, "min_threshold": 0.5}, "min_threshold: must be <= the threshold (0)"),
    ({"target_accuracy": 1.5}, "target_accuracy"),
    ({"target_accuracy": "nan"}, "target_accuracy"),
    ({"min_threshold": -0.1}, "min_threshold"),
    ({"min_threshold": "x"}, "min_threshold"),
]


@pytest.mark.parametrize(("params", "message"), BAD)
def test_bad_target_and_floor_combinations_are_422(shipped_server, test_images, params, message):
    error = assert_error(post_image(shipped_server.url, test_images[0], **params), 422)
    assert message in error["message"]


@pytest.mark.parametrize("target", [0.5, 0.9016, 0.905, 0.91, 0.912])
def test_target_accuracy_picks_the_threshold_v1_model_recommends(shipped_server, test_images, target):
    recommended = httpx.get(f"{shipped_server.url}/v1/model", params={"target_accuracy": target}).json()
    threshold = recommended["recommended"]["threshold"]
    answer = post_image(shipped_server.url, test_images[0], target_accuracy=target).json()
    assert answer["requested_threshold"] == answer["threshold"] == threshold
    files = [("files", ("a.png", test_images[1], "image/png"))] * 2
    batch = httpx.post(f"{shipped_server.url}/classify/batch", params={"target_accuracy": target}, files=files)
    assert [r["result"]["threshold"] for r in batch.json()["results"]] == [threshold] * 2


def test_without_an_slo_nothing_is_degraded(shipped_server, test_images):
    answers = burst(shipped_server, test_images, [{"threshold": 1, "min_threshold": 0}] * 24)
    assert all(not a["degraded"] and a["threshold"] == a["requested_threshold"] == 1 for a in answers)
    assert all(a["exit_stage"] == 1 for a in answers)
    metrics = httpx.get(f"{shipped_server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_latency_slo_seconds") == 0
    assert metric_value(metrics, "thinkingvit_degraded_answers_total", cause="lowered") == 0
    assert metric_value(metrics, "thinkingvit_degraded_answers_total", cause="cut_short") == 0


def test_target_accuracy_needs_a_calibration_profile(start_server, test_images):
    server = start_server()  # the tiny random checkpoint has none
    error = assert_error(post_image(server.url, test_images[0], target_accuracy=0.5), 422)
    assert "no calibration profile" in error["message"]


# ---------------------------------------------------------------------------------- the SLO


def test_a_burst_over_a_tiny_slo_is_answered_degraded_above_every_floor(start_server, probe, test_images):
    server = start_server(probe, latency_slo_ms=1, min_threshold=0.3)
    first = post_image(server.url, test_images[0], threshold=1).json()  # gives the engine its estimates
    assert first["exit_stage"] == 1
    floors = [0.0, None, 0.5]  # None: the server's min_threshold
    params = [{"threshold": 1} | ({} if f is None else {"min_threshold": f}) for f in floors] * 8
    answers = burst(server, test_images, params)
    for p, a in zip(params, answers):
        floor = p.get("min_threshold", 0.3)
        assert a["requested_threshold"] == 1 and floor <= a["threshold"] <= 1
        if floor == 0:  # any stage-1 answer is allowed, and every one is late
            assert a["degraded"] and a["exit_stage"] == 0
        else:  # the random model's confidences (~0.002) are under these floors: no early answer
            assert not a["degraded"] and a["exit_stage"] == 1
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_latency_slo_seconds") == 0.001
    degraded = sum(metric_value(metrics, "thinkingvit_degraded_answers_total", cause=c) for c in ("lowered", "cut_short"))
    assert degraded == sum(a["degraded"] for a in answers) == 8
    assert metric_value(metrics, "thinkingvit_effective_threshold_count") == len(answers) + 1
