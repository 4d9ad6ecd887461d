"""Limits and failure behaviour over real HTTP: bad input, 429, 504, disconnects, faults.

Queue states are made deterministic by pausing the engine core (``EngineProbe``: requests queue
up, aborts are still taken in) and waiting on its admission and abort events, never on sleeps.
"""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from tests.conftest import metric_value, png_bytes


def post_image(url: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(
        f"{url}/classify", params=params, files={"file": ("a.png", data, "image/png")}, timeout=60
    )


def assert_error(response: httpx.Response, status: int, reason: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["status"] == status and error["message"]
    if reason:
        assert error["reason"] == reason
    return error


@pytest.fixture
def background():
    with ThreadPoolExecutor(8) as pool:
        yield pool


# ---------------------------------------------------------------------------------- bad input


BAD_PARAMS = [
    {"threshold": ""}, {"threshold": "nan"}, {"threshold": "-0.1"}, {"threshold": "1.5"},
    {"threshold": "abc"}, {"threshold": "inf"}, {"top_k": ""}, {"top_k": "0"}, {"top_k": "-1"},
    {"top_k": "x"}, {"top_k": "11"}, {"timeout_ms": "-5"}, {"timeout_ms": "nan"},
]  # fmt: skip


def test_bad_inputs_are_4xx_and_do_not_disturb_the_server(start_server, test_images):
    server = start_server(max_body_bytes=4096, max_image_pixels=32 * 32)
    url, good = server.url, test_images[0]
    truncated = good[: len(good) // 2]
    large = png_bytes(np.zeros((40, 40), dtype=np.uint8))  # over the pixel cap, tiny on the wire
    for data in (b"", b"this is not an image", truncated, large):
        assert_error(post_image(url, data), 422, "invalid_image")
    for params in BAD_PARAMS:
        error = assert_error(post_image(url, good, **params), 422, "invalid_parameter")
        assert next(iter(params)) in error["message"]
    assert_error(post_image(url, b"\0" * 5000), 413, "body_too_large")
    chunked = httpx.post(
        f"{url}/classify", content=iter([b"\0" * 3000, b"\0" * 3000]), headers={"content-type": "image/png"}
    )
    assert_error(chunked, 413, "body_too_large")
    for headers in ({"content-type": "text/plain"}, {"content-type": "application/json"}):
        assert_error(
            httpx.post(f"{url}/classify", content=good, headers=headers), 415, "unsupported_media_type"
        )
    # untyped raw bodies (curl --data-binary, most HTTP libraries): the bytes decide
    for headers in ({"content-type": "application/octet-stream"}, {}):
        assert httpx.post(f"{url}/classify", content=good, headers=headers).json()["label"]
        not_image = httpx.post(f"{url}/classify", content=b"just some bytes", headers=headers)
        assert "PNG" in assert_error(not_image, 415, "unsupported_media_type")["message"]
    misspelt = assert_error(post_image(url, good, treshold=0.5, colour="red"), 422, "unknown_parameter")
    assert "colour, treshold" in misspelt["message"] and "threshold" in misspelt["message"].split("known:")[1]
    assert_error(httpx.get(f"{url}/v1/model", params={"target_accuracy": 2}), 422, "invalid_parameter")
    text_only = b'--b\r\nContent-Disposition: form-data; name="field"\r\n\r\nvalue\r\n--b--\r\n'
    no_file = httpx.post(
        f"{url}/classify", content=text_only, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert_error(no_file, 422, "invalid_body")
    garbled = httpx.post(
        f"{url}/classify", content=b"garbage", headers={"content-type": "multipart/form-data"}
    )
    assert_error(garbled, 422, "invalid_body")
    two = httpx.post(f"{url}/classify", files=[("file", ("a.png", good)), ("file", ("b.png", good))])
    assert_error(two, 422, "invalid_body")
    assert_error(httpx.get(f"{url}/no/such/route"), 404, "not_found")
    assert_error(httpx.get(f"{url}/classify"), 405)
    assert post_image(url, good, threshold=0.5).status_code == 200
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "thinkingvit_requests_total", outcome="error") == 0
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="invalid_image") == 4
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="unsupported_media_type") == 4
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="unknown_parameter") == 1
    # /v1/model's bad parameter is refused, but it is not a classification that failed
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="invalid_parameter") == len(BAD_PARAMS)


def test_batch_limits(start_server, test_images):
    server = start_server(max_batch_images=2)
    files = [("files", (f"{i}.png", test_images[i], "image/png")) for i in range(3)]
    assert_error(httpx.post(f"{server.url}/classify/batch", files=files), 422, "invalid_body")
    raw = httpx.post(
        f"{server.url}/classify/batch", content=test_images[0], headers={"content-type": "image/png"}
    )
    assert_error(raw, 415)


# ---------------------------------------------------------------------------------- capacity and time


API_SERVERS = pytest.mark.parametrize("api_servers", [1, 2])


@API_SERVERS
def test_queue_full_is_429_with_retry_after(start_server, probe, test_images, background, api_servers):
    server = start_server(probe, api_servers=api_servers, max_queue_size=2, max_batch_size=[1],
                          max_wait_ms=[0.0], retry_after_s=3)  # fmt: skip
    probe.pause()
    queued = [background.submit(post_image, server.url, image) for image in test_images[:2]]
    probe.wait_admitted(2)  # the queue holds 2: full
    refused = post_image(server.url, test_images[3])
    assert_error(refused, 429, "queue_full")
    assert refused.headers["retry-after"] == "3"
    probe.resume()
    assert [f.result().status_code for f in queued] == [200, 200]
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="queue_full") == 1
    assert probe.admitted == [0, 1], "the refused request never reached a queue"


@API_SERVERS
def test_timeout_is_504_and_the_request_is_never_computed(start_server, probe, test_images, background,
                                                          api_servers):  # fmt: skip
    server = start_server(probe, api_servers=api_servers, max_batch_size=[1], max_wait_ms=[0.0])
    probe.pause()
    first = background.submit(post_image, server.url, test_images[0])
    probe.wait_admitted(1)
    assert_error(post_image(server.url, test_images[1], timeout_ms=50), 504, "timeout")
    probe.wait_aborted(1)
    assert probe.aborted == [1]
    probe.resume()
    assert first.result().status_code == 200
    assert post_image(server.url, test_images[2]).status_code == 200  # request 2
    assert probe.computed() == {0, 2}
    probe.wait_idle()
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_queue_depth", stage="0") == 0


def test_timeout_ms_cannot_lengthen_the_server_deadline(start_server, probe, test_images):
    server = start_server(probe, request_timeout_s=0.2, max_batch_size=[1], max_wait_ms=[0.0])
    probe.pause()
    error = assert_error(post_image(server.url, test_images[0], timeout_ms=60_000), 504, "timeout")
    assert "0.2 s" in error["message"]
    probe.resume()


@API_SERVERS
def test_client_disconnect_cancels_the_request(start_server, probe, test_images, background, api_servers):
    server = start_server(probe, api_servers=api_servers, max_batch_size=[1], max_wait_ms=[0.0])
    probe.pause()
    first = background.submit(post_image, server.url, test_images[0])
    probe.wait_admitted(1)
    with raw_upload(server.url, test_images[1]):
        probe.wait_admitted(2)
    probe.wait_aborted(1)  # the abort crossed from the API server into the engine process
    probe.resume()
    assert first.result().status_code == 200
    assert post_image(server.url, test_images[2]).status_code == 200
    assert probe.aborted == [1] and probe.computed() == {0, 2}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert metric_value(metrics, "thinkingvit_requests_total", outcome="cancelled") == 1


def test_a_client_that_hangs_up_while_sending_its_body_is_never_admitted(start_server, probe, test_images):
    server = start_server(probe, max_batch_size=[1], max_wait_ms=[0.0])
    with raw_upload(server.url, test_images[1], send_fraction=0.5):
        pass  # half the body sent, then the connection closes
    wait_for_metric(server.url, "thinkingvit_requests_total", 1, outcome="cancelled")
    assert post_image(server.url, test_images[2]).status_code == 200
    assert probe.admitted == [0], "only the complete request reached the engine"


def raw_upload(url: str, body: bytes, send_fraction: float = 1.0) -> socket.socket:
    """A raw-socket POST /classify that sends ``send_fraction`` of its body and never reads; closing
    the returned socket is the client hanging up."""
    client = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    head = (
        "POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    client.sendall(head.encode() + body[: int(len(body) * send_fraction)])
    return client


def wait_for_metric(url: str, name: str, value: float, **labels) -> None:
    """Scrape until the metric reaches ``value`` (the server counts after it answers)."""
    with httpx.Client(base_url=url) as client:
        for _ in range(600):  # bounded: one scrape per round trip, no sleep
            if metric_value(client.get("/metrics").text, name, **labels) >= value:
                return
    raise AssertionError(f"{name}{labels} never reached {value}")


# ---------------------------------------------------------------------------------- faults


def test_exception_in_a_batch_fails_only_that_batch(start_server, probe, test_images, background):
    server = start_server(probe, max_batch_size=[1], max_wait_ms=[0.0])
    probe.pause()
    requests = []
    for image in test_images[:3]:  # one at a time, so the first batch is the first request's
        requests.append(background.submit(post_image, server.url, image))
        probe.wait_admitted(len(requests))
    probe.add_rule(action="raise", once=True, message="injected fault")
    probe.resume()
    error = assert_error(requests[0].result(), 500, "error")
    assert "injected fault" in error["message"]
    assert [f.result().status_code for f in requests[1:]] == [200, 200]
    assert post_image(server.url, test_images[3]).status_code == 200
    probe.wait_idle()  # nothing carried or queued is left inside the engine


def test_no_carried_tokens_leak(start_server, probe, test_images):
    server = start_server(probe)
    files = [("files", (f"{i}.png", image, "image/png")) for i, image in enumerate(test_images[:8])]
    assert httpx.post(f"{server.url}/classify/batch", params={"threshold": 1}, files=files).status_code == 200
    assert {stage for stage, _ in probe.batches} == {0, 1}
    probe.wait_idle()


# ---------------------------------------------------------------------------------- batch items


def batch_post(url: str, images: list[bytes], **params) -> httpx.Response:
    files = [("files", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    return httpx.post(f"{url}/classify/batch", params=params, files=files, timeout=60)


def item_statuses(response: httpx.Response) -> list[int]:
    assert response.status_code == 200, response.text
    items = response.json()["results"]
    for item in items:
        assert (item["result"] is None) != (item["error"] is None), item  # exactly one of them
    return [200 if item["error"] is None else item["error"]["status"] for item in items]


def test_batch_items_carry_429_500_and_504_inside_a_200(start_server, probe, test_images, background):
    server = start_server(probe, max_queue_size=1, max_batch_size=[1], max_wait_ms=[0.0])
    probe.pause()
    full = background.submit(batch_post, server.url, test_images[:3])
    probe.wait_admitted(1)  # one fits the queue; the other two are refused,
    # and counted as each is refused: only then may the queue empty (else a late one gets in)
    wait_for_metric(server.url, "thinkingvit_rejections_total", 2, reason="queue_full")
    probe.add_rule(action="raise", once=True, message="injected fault")
    probe.resume()
    assert sorted(item_statuses(full.result())) == [429, 429, 500]
    probe.pause()  # the engine published an empty queue before it answered
    assert item_statuses(batch_post(server.url, test_images[3:4], timeout_ms=50)) == [504]
    probe.resume()
    probe.wait_idle()


def test_an_idle_keep_alive_connection_is_closed_after_keep_alive_s(start_server):
    """``keep_alive_s`` reaches uvicorn: a connection left idle after an answer is closed by the
    server once it passes, not at the default 75 s (the read below would time out first)."""
    server = start_server(keep_alive_s=1.0)
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):  # the JSON body is one object
            chunk = conn.recv(4096)
            assert chunk, f"the server closed the connection before its answer was whole: {answer!r}"
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200")
        assert b"connection: close" not in answer.lower(), "the answer itself keeps the connection open"
        assert conn.recv(4096) == b"", "the server closes the idle connection (a timeout here: it did not)"
