"""The page to try the model (``GET /``) and the live panel's figures (``GET /v1/live``).

The page is plain HTML, CSS and JavaScript in ``service/page/`` (no build step, nothing from a
CDN): it calls the same public API as any client (``/v1/model``, ``/classify`` with ``explain``,
``/classify/batch``, ``/v1/live``), with ``threshold`` or, when the checkpoint has a calibration
profile, ``target_accuracy``. With an API token set, the classify routes need it: the page
asks the person for it and keeps it in the tab's sessionStorage; the server never writes it into
a page. ``create_app`` calls ``mount_page``.
"""

from __future__ import annotations

import time
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

from service.deps import ApiDep
from service.live import LiveWindow, read_snapshot

PAGE_DIR = Path(__file__).parent / "page"
PAGE_URL = "/page"  # the page's scripts, styles and sample images

page_router = APIRouter(tags=["page"])


@page_router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(PAGE_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@page_router.get("/v1/live")
async def live(api: ApiDep, request: Request) -> dict:
    """Requests/s, exit shares, compute per request and p50 / p99 latency over the last minutes
    (see `service.live`), from the server's own metrics; and whether classify needs a token."""
    state = request.app.state
    if state.live is None:  # at the first call: create_app may run without a model (schema tools)
        state.live = LiveWindow(api.model.num_stages, started=state.live_started)
    summary = state.live.summary(read_snapshot(api.model.num_stages))
    return summary | {
        "full_gmacs": api.model.exit_gmacs[-1],
        "token_required": api.settings.api_token is not None,
    }


def mount_page(app: FastAPI) -> None:
    app.state.live = None  # the LiveWindow of this API server, made at the first GET /v1/live
    app.state.live_started = time.monotonic()
    app.mount(PAGE_URL, StaticFiles(directory=PAGE_DIR), name="page")
    app.include_router(page_router)
