"""/docs and /redoc draw offline: every script, style sheet and icon comes from the server itself."""
from __future__ import annotations

import asyncio
import re

import httpx
import pytest

from service.app import create_app
from service.settings import Settings


def get_all(app, paths: list[str]) -> list[httpx.Response]:
    """GETs through the ASGI app itself; the lifespan (model loading) never runs."""

    async def fetch() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return [await client.get(p) for p in paths]

    return asyncio.run(fetch())


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    # the routes under test need no engine: the lifespan, which connects to it, does not run here
    return create_app(Settings(checkpoint=tiny_checkpoint), model=None, device="cpu", engine_address="ipc://unused")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_page_references_no_external_host_and_its_assets_are_served(app, page):
    (html,) = get_all(app, [page])
    assert html.status_code == 200
    assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", html.text), "an external URL in the page"
    assets = re.findall(r'(?:src|href)=["\']([^"\']+)["\']', html.text) + re.findall(r"url: ?'([^']+)'", html.text)
    assert any(a.endswith(".js") for a in assets) and "/openapi.json" in html.text
    for asset, response in zip(assets, get_all(app, assets)):
        assert asset.startswith("/") and response.status_code == 200, asset
        if asset.endswith(".js"):
            assert len(response.content) > 100_000 and "javascript" in response.headers["content-type"]


def test_swagger_ui_supports_openapi_3_1(app):
    """FastAPI emits OpenAPI 3.1; Swagger UI 4 cannot render it, 5 can."""
    (bundle,) = get_all(app, ["/docs-assets/swagger-ui-bundle.js"])
    version = re.search(r'PACKAGE_VERSION:"(\d+)\.', bundle.text)
    assert version and int(version.group(1)) >= 5


def test_openapi_descriptions_are_markdown_not_rst(app):
    """Swagger UI renders descriptions as Markdown: a docstring's RST ``code`` would show its backticks."""
    (schema,) = get_all(app, ["/openapi.json"])
    assert "``" not in schema.text
    assert "`file`" in schema.json()["paths"]["/classify"]["post"]["description"]
