"""The Open Inference Protocol routes (KServe v2) over real HTTP to a real server, driven by Triton's
own client (``tritonclient``) and load generator (``perf_analyzer``); bad inputs by plain httpx.

One server for the module, with a bearer token (so every infer also proves the token is checked)
and small limits; the queue and deadline test starts its own, with an ``EngineProbe``.
"""

from __future__ import annotations

import base64
import io
import json
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

tritonclient_http = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

from bench.perf_analyzer import run as run_perf_analyzer  # noqa: E402
from bench.perf_analyzer import write_input_data  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from service.images import decode_image  # noqa: E402
from tests.conftest import TINY_CLASSES, launch_server, metric_value  # noqa: E402

TOKEN = "oip-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # copied into each call: tritonclient adds its own headers to the dict it gets
MAX_IMAGES = 8
OUTPUTS = ["probabilities", "label", "class_index", "confidence", "exit_stage", "gmacs"]
PRINTED = 5e-5  # /classify prints numbers to 4 significant digits


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    running = launch_server(checkpoint=tiny_checkpoint, api_token=TOKEN, max_batch_images=MAX_IMAGES,
                            max_body_bytes=64 * 1024)  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def name(tiny_checkpoint) -> str:
    return Path(tiny_checkpoint).stem


@pytest.fixture
def client(server):
    with tritonclient_http.InferenceServerClient(server.url.removeprefix("http://")) as c:
        yield c


def classify(url: str, images: list[bytes], **params) -> list[dict]:
    """/classify's answers, one request per image."""
    answers = []
    for data in images:
        response = httpx.post(f"{url}/classify", params=params, content=data,
                              headers={"content-type": "image/png", **AUTH}, timeout=60)  # fmt: skip
        assert response.status_code == 200, response.text
        answers.append(response.json())
    return answers


def image_input(images: list[bytes], binary: bool):
    """The ``image`` input, [B]: raw bytes in binary, base64 strings in JSON."""
    tensor = tritonclient_http.InferInput("image", [len(images)], "BYTES")
    values = images if binary else [base64.b64encode(b) for b in images]
    tensor.set_data_from_numpy(np.array(values, dtype=np.object_), binary_data=binary)
    return tensor


def assert_same_answers(result, expected: list[dict]) -> None:
    """An infer result's per-image outputs against /classify's answers for the same images."""
    assert list(result.as_numpy("class_index")) == [a["class_index"] for a in expected]
    labels = [s.decode() if isinstance(s, bytes) else s for s in result.as_numpy("label")]  # binary: bytes
    assert labels == [a["label"] for a in expected]
    assert list(result.as_numpy("exit_stage")) == [a["exit_stage"] for a in expected]
    assert result.as_numpy("confidence") == pytest.approx([a["confidence"] for a in expected], abs=PRINTED)
    assert result.as_numpy("gmacs") == pytest.approx([a["gmacs"] for a in expected], rel=1e-3)


# ---------------------------------------------------------------------------------- metadata


def test_server_and_model_metadata_and_readiness(client, name):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    server = client.get_server_metadata()
    assert server["name"] == "thinkingvit-serve" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata(name)
    assert model == client.get_model_metadata(name, model_version="1")
    assert model["name"] == name and model["versions"] == ["1"]
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["inputs"]} == {
        "image": ("BYTES", [-1, 1]), "pixel_values": ("FP32", [-1, 1, 16, 16]),
    }  # fmt: skip
    assert {t["name"]: (t["datatype"], t["shape"]) for t in model["outputs"]} == {
        "probabilities": ("FP32", [-1, 10]), "label": ("BYTES", [-1]), "class_index": ("INT64", [-1]),
        "confidence": ("FP32", [-1]), "exit_stage": ("INT32", [-1]), "gmacs": ("FP32", [-1]),
    }  # fmt: skip
    config = client.get_model_config(name)
    assert config["max_batch_size"] == MAX_IMAGES
    assert {i["name"]: (i["data_type"], i["dims"], i["optional"]) for i in config["input"]} == {
        "image": ("TYPE_STRING", [1], True), "pixel_values": ("TYPE_FP32", [1, 16, 16], True),
    }  # fmt: skip
    assert [o["name"] for o in config["output"]] == OUTPUTS


def test_an_unknown_model_or_version_is_404_in_the_protocols_format(server, client, name):
    assert not client.is_model_ready("resnet50")
    for call, named in ((lambda: client.get_model_metadata("resnet50"), "'resnet50'"),
                        (lambda: client.get_model_config(name, "2"), "version '2'")):  # fmt: skip
        with pytest.raises(InferenceServerException) as raised:
            call()
        assert raised.value.status() == "404" and named in raised.value.message()
    response = httpx.post(f"{server.url}/v2/models/resnet50/infer", json={"inputs": []}, headers=dict(AUTH))
    assert response.status_code == 404 and set(response.json()) == {"error"}


# ---------------------------------------------------------------------------------- infer


@pytest.mark.parametrize("threshold", [0.0, 1.0, None])
def test_infer_with_binary_images_answers_as_classify(server, client, name, test_images, threshold):
    images = test_images[:MAX_IMAGES]
    parameters = {} if threshold is None else {"threshold": threshold}
    result = client.infer(name, [image_input(images, binary=True)], parameters=parameters, headers=dict(AUTH))
    expected = classify(server.url, images, **parameters)
    assert_same_answers(result, expected)
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (len(images), len(TINY_CLASSES))
    for probs, answer in zip(probabilities, expected, strict=True):
        for top in answer["top_k"]:
            assert probs[top["class_index"]] == pytest.approx(top["probability"], rel=1e-3)


def test_infer_with_json_images_and_top_k_answers_as_classify(server, client, name, test_images):
    """JSON data both ways; top_k makes probabilities Triton's classification strings."""
    images = test_images[8:12]
    outputs = [tritonclient_http.InferRequestedOutput(n, binary_data=False) for n in OUTPUTS]
    result = client.infer(name, [image_input(images, binary=False)], outputs=outputs,
                          parameters={"threshold": 0.0, "top_k": 3}, headers=dict(AUTH))  # fmt: skip
    expected = classify(server.url, images, threshold=0.0, top_k=3)
    assert_same_answers(result, expected)
    assert all("data" in o for o in result.get_response()["outputs"])  # JSON, no binary part
    for row, answer in zip(result.as_numpy("probabilities"), expected, strict=True):
        fields = [s.split(":", 2) for s in row]
        assert [(int(i), label) for _, i, label in fields] == [(t["class_index"], t["label"]) for t in answer["top_k"]]
        assert [float(p) for p, _, _ in fields] == pytest.approx([t["probability"] for t in answer["top_k"]], rel=1e-3)


@pytest.mark.parametrize("binary", [True, False])
def test_infer_with_pixel_values_answers_as_classify(server, client, name, tiny_checkpoint, test_images, binary):
    """Pixels preprocessed by the client, the way the server would, give the same answers."""
    images = test_images[12:16]
    preprocess = load_checkpoint(tiny_checkpoint).preprocess
    pixels = np.stack([decode_image(data, preprocess, 10**6) for data in images])  # (B, 1, 16, 16)
    tensor = tritonclient_http.InferInput("pixel_values", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    result = client.infer(name, [tensor], parameters={"threshold": 1.0}, headers=dict(AUTH))
    assert_same_answers(result, classify(server.url, images, threshold=1.0))


# ---------------------------------------------------------------------------------- bad input


def tensor(name: str, datatype: str, shape: list[int], raw: bytes | None = None, **extra) -> tuple[dict, bytes | None]:
    head = {"name": name, "datatype": datatype, "shape": shape, **extra}
    if raw is not None:
        head["parameters"] = {"binary_data_size": len(raw)}
    return head, raw


def binary_body(inputs: list[tuple[dict, bytes | None]], header_length=None, tail: bytes = b"", **request) -> tuple[bytes, dict]:
    """An infer body in the binary extension: JSON, then every binary input's bytes."""
    head = json.dumps({"inputs": [h for h, _ in inputs], **request}).encode()
    body = head + b"".join(raw for _, raw in inputs if raw is not None) + tail
    length = str(len(head)) if header_length is None else header_length
    return body, {"Inference-Header-Content-Length": length, **AUTH}


def strings(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


@pytest.fixture(scope="module")
def png(test_images) -> bytes:
    return test_images[0]


PIXELS = np.zeros((1, 1, 16, 16), np.float32)
NAN_PIXELS = PIXELS.copy()
NAN_PIXELS[0, 0, 3, 3] = np.nan

BAD_BODIES = {
    "wrong datatype": lambda png: binary_body([tensor("image", "FP32", [1], data=[1.0])]),
    "wrong shape": lambda png: binary_body([tensor("pixel_values", "FP32", [1, 3, 16, 16], np.zeros(768, np.float32).tobytes())]),
    "shape and count disagree": lambda png: binary_body([tensor("image", "BYTES", [2], strings(png))]),
    "JSON count disagrees": lambda png: binary_body([tensor("pixel_values", "FP32", [1, 1, 16, 16], data=[0.0] * 10)]),
    "strings as pixels": lambda png: binary_body([tensor("pixel_values", "FP32", [1, 1, 1, 1], data=["1"])]),
    "undecodable bytes": lambda png: binary_body([tensor("image", "BYTES", [1], strings(b"not an image"))]),
    "cut-off BYTES element": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png)[:-5])]),
    "not base64": lambda png: binary_body([tensor("image", "BYTES", [1], data=["%%%"])]),
    "not ASCII base64": lambda png: binary_body([tensor("image", "BYTES", [1], data=["é"])]),
    "JSON pixels past FP32": lambda png: binary_body([tensor("pixel_values", "FP32", [1, 1, 16, 16], data=[1e39] * 256)]),
    "non-finite pixels": lambda png: binary_body([tensor("pixel_values", "FP32", [1, 1, 16, 16], NAN_PIXELS.tobytes())]),
    "header length past the body": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], header_length="99999"),
    "header length inside the JSON": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], header_length="20"),
    "header length not a number": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], header_length="-3"),
    "binary size past the body": lambda png: binary_body([({"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 10**6}}, strings(png))]),
    "bytes after the tensors": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], tail=b"extra"),
    "too many images": lambda png: binary_body([tensor("image", "BYTES", [MAX_IMAGES + 1], strings(*[png] * (MAX_IMAGES + 1)))]),
    "no image": lambda png: binary_body([tensor("image", "BYTES", [0], b"")]),
    "both inputs": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png)), tensor("pixel_values", "FP32", [1, 1, 16, 16], PIXELS.tobytes())]),
    "unknown input": lambda png: binary_body([tensor("picture", "BYTES", [1], strings(png))]),
    "no inputs": lambda png: binary_body([]),
    "threshold out of range": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], parameters={"threshold": 2}),
    "threshold true": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], parameters={"threshold": True}),
    "top_k above the classes": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], parameters={"top_k": 11}),
    "unknown parameter": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], parameters={"treshold": 0.5}),
    "unknown output": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], outputs=[{"name": "logits"}]),
    "classification on label": lambda png: binary_body([tensor("image", "BYTES", [1], strings(png))], outputs=[{"name": "label", "parameters": {"classification": 2}}]),
    "not JSON": lambda png: (b"hello", AUTH),
}  # fmt: skip


def test_bad_inputs_are_400_in_the_protocols_format_and_counted(server, name, png):
    url = f"{server.url}/v2/models/{name}/infer"
    before = httpx.get(f"{server.url}/metrics").text
    for case, build in BAD_BODIES.items():
        body, headers = build(png)
        response = httpx.post(url, content=body, headers=headers, timeout=60)
        assert response.status_code == 400, f"{case}: {response.status_code} {response.text}"
        error = response.json()
        assert set(error) == {"error"} and isinstance(error["error"], str) and error["error"], case
    after = httpx.get(f"{server.url}/metrics").text
    invalid = metric_value(after, "thinkingvit_requests_total", outcome="invalid")
    assert invalid - metric_value(before, "thinkingvit_requests_total", outcome="invalid") == len(BAD_BODIES)
    body, headers = binary_body([tensor("image", "BYTES", [1], strings(png))])
    assert httpx.post(url, content=body, headers=headers, timeout=60).status_code == 200  # still serving


def test_token_and_body_limit_as_on_classify(server, name, png):
    url = f"{server.url}/v2/models/{name}/infer"
    body, headers = binary_body([tensor("image", "BYTES", [1], strings(png))])
    refused = httpx.post(url, content=body, headers={k: v for k, v in headers.items() if k != "Authorization"})
    assert refused.status_code == 401 and "Bearer" in refused.headers["www-authenticate"]
    assert set(refused.json()) == {"error"}
    assert httpx.get(f"{server.url}/v2/models/{name}").status_code == 200  # metadata stays open
    large = png + b"\0" * (64 * 1024)  # over max_body_bytes
    body, headers = binary_body([tensor("image", "BYTES", [1], strings(large))])
    too_large = httpx.post(url, content=body, headers=headers)
    assert too_large.status_code == 413 and set(too_large.json()) == {"error"}


def test_queue_full_is_429_and_a_deadline_504_as_on_classify(start_server, probe, test_images, tiny_checkpoint):
    server = start_server(probe, max_queue_size=1, max_batch_size=[1], max_wait_ms=[0.0], retry_after_s=3)
    url = f"{server.url}/v2/models/{Path(tiny_checkpoint).stem}/infer"

    def infer(data: bytes, **parameters) -> httpx.Response:
        body, headers = binary_body([tensor("image", "BYTES", [1], strings(data))], parameters=parameters)
        return httpx.post(url, content=body, headers=headers, timeout=60)

    with ThreadPoolExecutor(2) as background:
        probe.pause()
        first = background.submit(infer, test_images[0])
        probe.wait_admitted(1)  # the queue holds 1: full
        refused = infer(test_images[1])
        assert refused.status_code == 429 and refused.headers["retry-after"] == "3"
        assert set(refused.json()) == {"error"}
        probe.resume()
        assert first.result().status_code == 200
    probe.pause()
    late = infer(test_images[2], timeout_ms=50)
    assert late.status_code == 504 and set(late.json()) == {"error"}
    probe.wait_aborted(1)
    probe.resume()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="queue_full") == 1
    assert metric_value(metrics, "thinkingvit_requests_total", outcome="timeout") == 1
    assert metric_value(metrics, "thinkingvit_requests_total", outcome="ok") == 1
    assert probe.computed() == {0}, "neither the refused nor the late request was computed"


# ---------------------------------------------------------------------------------- perf_analyzer


def test_perf_analyzer_drives_infer_with_fashion_mnist_pngs(server, name, tmp_path):
    """NVIDIA's load generator reads our metadata and config and sends real PNGs for a few
    seconds at two concurrencies; the server answered every request it counted, none refused."""
    from PIL import Image

    from model.data import load_fashion_mnist

    pngs = []
    for image in load_fashion_mnist("test").subset(32).images:  # (1, 28, 28) uint8
        buffer = io.BytesIO()
        Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())
    data = write_input_data(pngs, tmp_path / "input.json")
    before = httpx.get(f"{server.url}/metrics").text
    points = run_perf_analyzer(server.url, name, data, [1, 2], window_ms=1000, max_trials=3, workdir=tmp_path,
                               headers=dict(AUTH), timeout_s=120)  # fmt: skip
    after = httpx.get(f"{server.url}/metrics").text
    assert [p.concurrency for p in points] == [1, 2]
    assert all(p.requests > 0 and p.infer_per_s > 0 and 0 < p.p50_ms <= p.p99_ms for p in points)

    def delta(outcome: str) -> float:
        return (metric_value(after, "thinkingvit_requests_total", outcome=outcome)
                - metric_value(before, "thinkingvit_requests_total", outcome=outcome))  # fmt: skip

    assert delta("ok") >= sum(p.requests for p in points)  # measured requests, plus the warm-up's
    assert delta("invalid") == delta("rejected") == delta("error") == 0
