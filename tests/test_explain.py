"""``explain=stages|all`` on /classify and /classify/batch, over real HTTP to a real server."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import Server, metric_value

PLAIN_KEYS = [
    "label", "class_index", "confidence", "stage_confidences", "top_k", "exit_stage", "stages_run",
    "heads_used", "gmacs", "threshold", "requested_threshold", "degraded", "timings",
]  # fmt: skip


def classify(url: str, image: bytes, **params) -> dict:
    response = httpx.post(f"{url}/classify", params=params, files={"file": ("x.png", image, "image/png")})
    assert response.status_code == 200, response.text
    return response.json()


def without_timings(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("timings", "explain")}


@pytest.fixture(scope="module")
def server(module_server: Server) -> Server:
    return module_server


@pytest.fixture(scope="module")
def model_info(server) -> dict:
    return httpx.get(f"{server.url}/v1/model").json()


def gmacs(model_info: dict, stage: int):
    """A stage's exit compute as answers print it (4 significant digits)."""
    return pytest.approx(model_info["stages"][stage]["exit_gmacs"], rel=1e-3)


def split_threshold(confidences: list[float]) -> float:
    """A threshold in the widest gap near the median stage-0 confidence: some exit, some go on."""
    c = sorted(confidences)
    i = len(c) // 2
    j = max(range(i - 3, i + 3), key=lambda k: c[k + 1] - c[k])
    assert c[j + 1] - c[j] > 1e-2 * c[j + 1], "no threshold far from every (printed) confidence"
    return (c[j] + c[j + 1]) / 2


def test_without_explain_the_body_is_unchanged(server, test_images):
    body = classify(server.url, test_images[0], threshold=0.5)
    assert list(body) == PLAIN_KEYS


def test_explain_stages_reports_every_stage_that_ran(server, model_info, test_images):
    heads = [s["heads"] for s in model_info["stages"]]
    for threshold in (0.0, 1.0):
        for image in test_images[:4]:
            plain = classify(server.url, image, threshold=threshold)
            body = classify(server.url, image, threshold=threshold, explain="stages", top_k=3)
            assert list(body) == PLAIN_KEYS + ["explain"]
            explain = body["explain"]
            assert explain["mode"] == "stages" and explain["full_gmacs"] == gmacs(model_info, -1)
            assert len(explain["stages"]) == body["stages_run"] == plain["stages_run"]
            for s, stage in enumerate(explain["stages"]):
                assert stage["stage"] == s and stage["heads"] == heads[s]
                assert stage["confidence"] == body["stage_confidences"][s]
                assert len(stage["top_k"]) == 3
                assert stage["exit"] == (s == body["exit_stage"])
                assert stage["exit_gmacs"] == gmacs(model_info, s)
            assert explain["stages"][-1]["top_k"] == body["top_k"]
            assert body["exit_stage"] == plain["exit_stage"] and body["label"] == plain["label"]


def test_explain_all_runs_every_stage_and_reports_the_real_exit(server, model_info, test_images):
    images = test_images[:16]
    first = [classify(server.url, image, threshold=1.0, explain="all")["stage_confidences"][0] for image in images]
    threshold = split_threshold(first)
    full = gmacs(model_info, -1)
    exits = []
    for image, confidence in zip(images, first):
        plain = classify(server.url, image, threshold=threshold)
        body = classify(server.url, image, threshold=threshold, explain="all")
        stages = body["explain"]["stages"]
        assert body["stages_run"] == len(stages) == len(model_info["stages"])  # every stage ran
        assert body["gmacs"] == full  # and cost the full model
        assert body["exit_stage"] == plain["exit_stage"] == (0 if confidence >= threshold else 1)
        assert without_timings(body) | {"stages_run": 0, "gmacs": 0, "stage_confidences": []} == (
            without_timings(plain) | {"stages_run": 0, "gmacs": 0, "stage_confidences": []}
        )  # the same answer as without explain
        assert [s["exit"] for s in stages] == [s == plain["exit_stage"] for s in range(len(stages))]
        assert stages[plain["exit_stage"]]["top_k"] == plain["top_k"]
        last = classify(server.url, image, threshold=1.0)  # what the last stage says
        assert stages[-1]["top_k"] == last["top_k"] and stages[-1]["confidence"] == last["confidence"]
        exits.append(body["exit_stage"])
    assert set(exits) == {0, 1}, "the threshold should split the images"


def test_explain_all_counts_the_exit_and_the_full_compute(server, model_info, test_images):
    before = httpx.get(f"{server.url}/metrics").text
    classify(server.url, test_images[0], threshold=0.0, explain="all")
    after = httpx.get(f"{server.url}/metrics").text
    exits = [metric_value(after, "thinkingvit_exits_total", stage=s) - metric_value(before, "thinkingvit_exits_total", stage=s)
             for s in ("0", "1")]  # fmt: skip
    assert exits == [1, 0]  # it answered at stage 0 ...
    spent = metric_value(after, "thinkingvit_request_gmacs_sum") - metric_value(before, "thinkingvit_request_gmacs_sum")
    assert spent == pytest.approx(model_info["stages"][-1]["exit_gmacs"], rel=1e-3)  # ... and paid for both


def test_explain_on_batch_explains_each_item(server, test_images):
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(test_images[:3])]
    response = httpx.post(f"{server.url}/classify/batch", params={"explain": "all", "threshold": 0}, files=files)
    results = response.json()["results"]
    assert [len(r["result"]["explain"]["stages"]) for r in results] == [2, 2, 2]
    assert [r["result"]["exit_stage"] for r in results] == [0, 0, 0]
    plain = httpx.post(f"{server.url}/classify/batch", files=files).json()["results"]
    assert all("explain" not in r["result"] for r in plain)


def test_explain_is_validated(server, test_images):
    for value in ("yes", "", "ALL", "stage"):
        response = httpx.post(
            f"{server.url}/classify", params={"explain": value}, files={"file": ("x.png", test_images[0], "image/png")}
        )
        assert response.status_code == 422, value
        error = response.json()["error"]
        assert error["reason"] == "invalid_parameter" and "explain" in error["message"]
