"""Security basics: the optional bearer token, limits, no path from a request to the filesystem,
and checkpoints that cannot run code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.conftest import metric_value, png_bytes
from tests.test_service_limits import assert_error, post_image

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cret-token-for-tests"
OPEN_ROUTES = ["/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/v1/model"]


def classify(url: str, image: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{url}/classify", files={"file": ("a.png", image, "image/png")}, headers=headers)


# ---------------------------------------------------------------------------------- bearer token


def test_no_token_by_default(start_server, test_images):
    server = start_server()
    assert classify(server.url, test_images[0]).status_code == 200
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "security" not in schema["paths"]["/classify"]["post"]
    assert "401" not in schema["paths"]["/classify"]["post"]["responses"]


def test_token_is_required_for_classify_only(start_server, test_images):
    server = start_server(api_token=TOKEN)
    url, image = server.url, test_images[0]
    for headers in (None, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {TOKEN}"},
                    {"authorization": f"Bearer {TOKEN}x"}, {"authorization": "Bearer"}):  # fmt: skip
        response = classify(url, image, headers)
        assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
    batch = httpx.post(f"{url}/classify/batch", files=[("files", ("a.png", image, "image/png"))])
    assert_error(batch, 401, "unauthorized")
    good = {"authorization": f"Bearer {TOKEN}"}
    assert classify(url, image, good).status_code == 200
    batch = httpx.post(f"{url}/classify/batch", files=[("files", ("a.png", image))], headers=good)
    assert batch.status_code == 200 and batch.json()["results"][0]["result"]
    for route in OPEN_ROUTES:
        assert httpx.get(f"{url}{route}").status_code == 200, route
    metrics = httpx.get(f"{url}/metrics").text
    assert metric_value(metrics, "thinkingvit_rejections_total", reason="unauthorized") == 6


def test_token_is_checked_before_the_body_is_read(start_server):
    """An unauthenticated client gets 401, not 413: the server never buffers its body."""
    server = start_server(api_token=TOKEN, max_body_bytes=1024)
    response = httpx.post(
        f"{server.url}/classify", content=b"\0" * 100_000, headers={"content-type": "image/png"}
    )
    assert_error(response, 401, "unauthorized")


def test_token_appears_in_the_schema_when_set(start_server):
    server = start_server(api_token=TOKEN)
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    for path in ("/classify", "/classify/batch"):
        operation = schema["paths"][path]["post"]
        assert operation["security"] == [{"HTTPBearer": []}] and "401" in operation["responses"]
    assert "security" not in schema["paths"]["/v1/model"]["get"]


def test_token_setting(monkeypatch, tiny_checkpoint):
    monkeypatch.setenv("THINKINGVIT_API_TOKEN", TOKEN)
    settings = Settings(checkpoint=tiny_checkpoint)
    assert settings.api_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in str(settings.model_dump())
    for blank in ("", "  "):
        with pytest.raises(ValidationError, match="empty"):
            Settings(checkpoint=tiny_checkpoint, api_token=blank)


# ---------------------------------------------------------------------------------- limits


def test_body_and_pixel_limits(start_server, test_images):
    server = start_server(max_body_bytes=2000, max_image_pixels=100 * 100)
    assert_error(post_image(server.url, b"\0" * 3000), 413, "body_too_large")
    big = png_bytes(np.zeros((101, 100), dtype=np.uint8))  # 10,100 pixels, a few hundred bytes
    error = assert_error(post_image(server.url, big), 422, "invalid_image")
    assert "limit" in error["message"] and "10000 pixels" in error["message"]
    assert post_image(server.url, png_bytes(np.zeros((100, 100), dtype=np.uint8))).status_code == 200


def test_only_allowed_image_formats_are_decoded(start_server):
    """Formats outside the allow-list (here EPS, which Pillow would hand to Ghostscript, and
    the PPM that Pillow reads fine) are refused before any decoder runs."""
    server = start_server()
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    ppm = b"P5 16 16 255\n" + bytes(256)
    for data in (eps, ppm):
        error = assert_error(post_image(server.url, data), 422, "invalid_image")
        assert "PNG" in error["message"]


# ---------------------------------------------------------------------------------- filesystem


def test_no_path_from_a_request_reaches_the_filesystem(start_server, test_images, tmp_path):
    """File names are echoed as data, never used as paths; nothing appears where they point."""
    server = start_server()
    tmp_path = tmp_path / "sandbox"  # the server's log lives beside it
    tmp_path.mkdir()
    target = tmp_path / "written-by-a-request"
    names = [str(target), f"../../../../..{target}", "/etc/passwd", "C:\\Windows\\win.ini", "a\0b.png"]
    files = [("files", (name, test_images[0], "image/png")) for name in names]
    results = httpx.post(f"{server.url}/classify/batch", files=files).json()["results"]
    assert [r["filename"] for r in results][:3] == names[:3]  # the multipart parser keeps them as sent
    assert all(r["result"] for r in results)
    assert not target.exists() and list(tmp_path.iterdir()) == []
    for path in ("/etc/passwd", "/../../etc/passwd", "/%2e%2e/%2e%2e/etc/passwd", "/static/../etc/passwd"):
        response = httpx.get(f"{server.url}{path}")
        assert response.status_code == 404 and "root:" not in response.text


# ---------------------------------------------------------------------------------- checkpoints


class RunsCode:
    """A pickle payload: unpickling it would create ``path``."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_would_run_code_is_refused_at_startup(tmp_path):
    import torch

    marker, checkpoint = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"state_dict": RunsCode(marker)}, checkpoint)
    torch.load(checkpoint, weights_only=False)  # the payload is live: a plain load runs it
    assert marker.exists()
    marker.unlink()
    serve = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert serve.returncode == 3, serve.stderr[-3000:]
    assert "the engine core could not start" in serve.stderr
    assert "not a checkpoint" in serve.stderr or "refused" in serve.stderr
    assert not marker.exists()
