"""Served answers against the offline model, over real HTTP to a real server (every process) on loopback."""

from __future__ import annotations

import asyncio
import io
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint, save_checkpoint
from model.compute import cumulative_gmacs
from model.inference import adaptive_inference
from model.preprocess import preprocess_image
from model.thinkingvit import confidence
from service.served_model import cheapest_threshold
from tests.conftest import TINY_CLASSES, metric_value

CONF_TOLERANCE = 1e-6  # batch composition changes float rounding (~1e-7 here)
PRINTED = 5e-5  # answers print confidences to 4 significant digits


@pytest.fixture(scope="module")
def offline(tiny_checkpoint, test_images):
    """The reference: the model's own preprocessing and adaptive_inference on one batch."""
    loaded = load_checkpoint(tiny_checkpoint)
    images = torch.stack(
        [preprocess_image(Image.open(io.BytesIO(b)), loaded.preprocess) for b in test_images]
    )
    return loaded.model, images


def offline_answers(offline, thresholds: list[float]) -> list[tuple[int, int, float]]:
    model, images = offline
    result = adaptive_inference(model, images, torch.tensor(thresholds))
    classes = result.logits.argmax(-1).tolist()
    return list(zip(classes, result.exit_stage.tolist(), result.confidence.tolist()))


@pytest.fixture(scope="module")
def mixed_thresholds(offline) -> list[float]:
    """Thresholds 0, 1 and three between stage-0 confidences (mid-gap, far from every value),
    so some images exit at stage 0 and others go on to stage 1."""
    model, images = offline
    with torch.inference_mode():
        conf = sorted(confidence(model.forward_stage(0, model.embed(images)).logits).tolist())
    cuts = []
    for quantile in (0.25, 0.5, 0.75):
        i = int(quantile * len(conf))
        j = max(range(i - 3, i + 3), key=lambda k: conf[k + 1] - conf[k])  # widest nearby gap
        assert conf[j + 1] - conf[j] > 2 * CONF_TOLERANCE, "no threshold far enough from every confidence"
        cuts.append((conf[j] + conf[j + 1]) / 2)
    choices = [0.0, 1.0, *cuts]
    return [choices[i % len(choices)] for i in range(len(images))]


def assert_matches(served: list[dict], expected: list[tuple[int, int, float]]) -> None:
    for answer, (class_index, stage, conf) in zip(served, expected, strict=True):
        assert answer["class_index"] == class_index
        assert answer["label"] == TINY_CLASSES[class_index]
        assert answer["exit_stage"] == stage and answer["stages_run"] == stage + 1
        assert answer["confidence"] == pytest.approx(conf, abs=PRINTED)
        assert answer["stage_confidences"][-1] == answer["confidence"]
        assert len(answer["stage_confidences"]) == stage + 1


def batch_files(images: list[bytes]) -> list:
    return [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]


async def classify_concurrently(url: str, images: list[bytes], thresholds: list[float]) -> list[dict]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        responses = await asyncio.gather(*(
            client.post("/classify", params={"threshold": t}, files={"file": ("x.png", data, "image/png")})
            for data, t in zip(images, thresholds)
        ))  # fmt: skip
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


@pytest.mark.parametrize("api_servers", [1, 2])
def test_concurrent_mixed_thresholds_equal_offline(start_server, probe, test_images, offline, mixed_thresholds,
                                                   api_servers):  # fmt: skip
    """Many clients at once; the engine is held until all are queued, so batches mix thresholds
    and stage-1 batches gather survivors of several stage-0 batches (and, with two API servers,
    requests that came through different processes)."""
    server = start_server(probe, api_servers=api_servers, max_batch_size=[8], max_wait_ms=[1000.0, 20.0])
    probe.pause()
    releaser = asyncio.to_thread(lambda: (probe.wait_admitted(len(test_images)), probe.resume()))

    async def scenario():
        served, _ = await asyncio.gather(
            classify_concurrently(server.url, test_images, mixed_thresholds), releaser
        )
        return served

    served = asyncio.run(scenario())
    expected = offline_answers(offline, mixed_thresholds)
    assert_matches(served, expected)
    stages = [stage for _, stage, _ in expected]
    assert 0 < stages.count(1) < len(stages), "the thresholds should split the images between stages"
    stage1_batches = [ids for stage, ids in probe.batches if stage == 1]
    assert sum(map(len, stage1_batches)) == stages.count(1)
    probe.wait_idle()

    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_batch_size_bucket", stage="0", le="1.0") < metric_value(
        metrics, "thinkingvit_batch_size_count", stage="0"
    ), "under concurrency some stage-0 batch must hold more than one image"
    for stage in (0, 1):
        assert metric_value(metrics, "thinkingvit_exits_total", stage=str(stage)) == stages.count(stage)
    assert metric_value(metrics, "thinkingvit_requests_total", outcome="ok") == len(test_images)


def test_threshold_zero_exits_every_image_at_stage_0(start_server, test_images, offline):
    server = start_server()
    response = httpx.post(
        f"{server.url}/classify/batch", params={"threshold": 0}, files=batch_files(test_images)
    )
    served = [item["result"] for item in response.json()["results"]]
    assert {a["exit_stage"] for a in served} == {0}
    assert {a["heads_used"] for a in served} == {2}
    assert_matches(served, offline_answers(offline, [0.0] * len(test_images)))


def test_threshold_one_runs_every_stage(start_server, test_images, offline, tiny_checkpoint):
    server = start_server()
    response = httpx.post(
        f"{server.url}/classify/batch", params={"threshold": 1}, files=batch_files(test_images)
    )
    served = [item["result"] for item in response.json()["results"]]
    gmacs = cumulative_gmacs(offline[0].config)
    assert {a["exit_stage"] for a in served} == {1}
    assert {a["heads_used"] for a in served} == {4}
    assert [a["gmacs"] for a in served] == pytest.approx([gmacs[1]] * len(served), rel=5e-4)  # 4 digits
    assert_matches(served, offline_answers(offline, [1.0] * len(test_images)))


def test_response_fields_and_defaults(start_server, test_images):
    server = start_server(default_threshold=0.3, default_top_k=3)
    answer = httpx.post(
        f"{server.url}/classify", files={"file": ("a.png", test_images[0], "image/png")}
    ).json()
    assert answer["threshold"] == 0.3
    assert len(answer["top_k"]) == 3
    assert answer["top_k"][0]["class_index"] == answer["class_index"]
    probabilities = [c["probability"] for c in answer["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)
    timings = answer["timings"]
    assert timings["total_ms"] >= timings["compute_ms"] > 0 and timings["queue_ms"] >= 0


def test_raw_body_equals_multipart(start_server, test_images):
    server = start_server()
    params = {"threshold": 1, "top_k": 10}
    raw = httpx.post(
        f"{server.url}/classify", params=params, content=test_images[1], headers={"content-type": "image/png"}
    )
    multipart = httpx.post(f"{server.url}/classify", params=params, files={"file": ("a.png", test_images[1])})
    assert raw.status_code == multipart.status_code == 200
    for key in ("class_index", "exit_stage", "top_k"):
        assert raw.json()[key] == multipart.json()[key]


def test_batch_answers_each_image_independently(start_server, test_images):
    server = start_server()
    files = batch_files(test_images[:2]) + [("files", ("bad.png", b"not an image", "image/png"))]
    results = httpx.post(f"{server.url}/classify/batch", files=files).json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert results[0]["result"] and results[1]["result"]
    assert results[0]["error"] is None and results[2]["result"] is None  # both keys, always
    assert results[2]["error"]["status"] == 422 and results[2]["filename"] == "bad.png"


def test_model_description(start_server):
    server = start_server()
    info = httpx.get(f"{server.url}/v1/model").json()
    assert info["preset"] == "tiny-test" and info["class_names"] == TINY_CLASSES
    assert [s["heads"] for s in info["stages"]] == [2, 4]
    assert info["preprocess"]["size"] == 16 and info["calibration"] is None


def test_model_description_returns_calibration(start_server, tiny_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_checkpoint)
    calibration = {"split": "test", "rows": [
        {"threshold": 0.5, "accuracy": 0.80, "exit_share": [0.9, 0.1], "expected_gmacs": 0.2},
        {"threshold": 0.9, "accuracy": 0.90, "exit_share": [0.5, 0.5], "expected_gmacs": 0.4},
        {"threshold": 1.0, "accuracy": 0.91, "exit_share": [0.0, 1.0], "expected_gmacs": 0.7},
    ]}  # fmt: skip
    path = tmp_path / "calibrated.safetensors"
    save_checkpoint(path, loaded.model, {**loaded.metadata, "calibration": calibration})
    server = start_server(checkpoint=path)
    info = httpx.get(f"{server.url}/v1/model", params={"target_accuracy": 0.85}).json()
    assert info["calibration"] == calibration
    assert info["recommended"]["threshold"] == 0.9


def test_cheapest_threshold_picks_least_compute_reaching_target():
    rows = [
        {"threshold": 0.9, "accuracy": 0.90, "expected_gmacs": 0.4},
        {"threshold": 0.7, "accuracy": 0.92, "expected_gmacs": 0.3},
        {"threshold": 0.5, "accuracy": 0.80, "expected_gmacs": 0.1},
    ]
    assert cheapest_threshold({"rows": rows}, 0.9)["threshold"] == 0.7
    assert cheapest_threshold({"rows": rows}, 0.99) is None
    assert cheapest_threshold(None, 0.5) is None


def test_health_and_docs(start_server):
    server = start_server()
    with httpx.Client(base_url=server.url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/v2/health/live").json() == {"live": True}
        assert client.get("/v2/health/ready").json() == {"ready": True}
        assert "/classify" in client.get("/openapi.json").json()["paths"]
        assert client.get("/docs").status_code == 200


def test_metrics_pass_promtool(start_server, test_images):
    server = start_server()
    httpx.post(f"{server.url}/classify", files={"file": ("a.png", test_images[0])})
    httpx.post(f"{server.url}/classify", content=b"x", headers={"content-type": "text/plain"})
    text = httpx.get(f"{server.url}/metrics").text
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in (
        "thinkingvit_exits_total", "thinkingvit_requests_total", "thinkingvit_request_latency_seconds",
        "thinkingvit_queue_wait_seconds", "thinkingvit_batch_size", "thinkingvit_stage_compute_seconds",
        "thinkingvit_queue_depth", "thinkingvit_gmacs_total", "thinkingvit_request_gmacs",
        "thinkingvit_rejections_total",
    ):  # fmt: skip
        assert f"# TYPE {name.removesuffix('_total')} " in text or f"# TYPE {name} " in text, name
    assert metric_value(text, "thinkingvit_rejections_total", reason="unsupported_media_type") == 1
    assert metric_value(text, "thinkingvit_gmacs_total") > 0


def test_requests_from_two_api_servers_meet_in_one_stage_batch(start_server, probe, test_images):
    """With the engine paused, requests arrive on fresh connections until both API server processes
    have handed some over; the first batch then holds requests of both."""
    server = start_server(probe, api_servers=2, max_batch_size=[64], max_wait_ms=[0.0])
    probe.pause()
    post = lambda data: httpx.post(f"{server.url}/classify", files={"file": ("x.png", data)}, timeout=60)
    with ThreadPoolExecutor(32) as pool:
        futures = []
        for wave in range(10):  # each request on its own connection: the kernel hands them to either process
            futures += [pool.submit(post, data) for data in test_images[:3]]
            probe.wait_admitted(3 * (wave + 1))
            if len(set(probe.sender.values())) == 2:
                break
        assert len(set(probe.sender.values())) == 2, "every request went through one API server"
        probe.resume()
        assert [f.result().status_code for f in futures] == [200] * len(futures)
    first_batch = next(ids for stage, ids in probe.batches if stage == 0)
    assert set(first_batch) == set(probe.admitted)
    probe.wait_idle()
