"""An API server process: the FastAPI app in front of the engine core.

It parses, decodes, hands over and answers; the model, the scheduler and the exit rule live in the
engine core process (``service.engine_core``). Several API server processes can share one
listening socket (``api_servers``); ``service.launcher`` starts them once the engine is ready.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.routing import APIRoute
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from service.deps import ApiState, check_token, require_token
from service.docs_assets import mount_offline_docs
from service.engine_client import EngineClient
from service.errors import ServiceError, invalid
from service.images import pillow_pixel_limit
from service.oip import UNAUTHORIZED as INFER_UNAUTHORIZED
from service.oip import infer_router, meta_router
from service.page import mount_page
from service.routes import CLASSIFY_TAG, UNAUTHORIZED, classify_router, health_router, model_router
from service import processes
from service.served_model import ServedModel
from service.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings, model: ServedModel, device: str, engine_address: str, published=None) -> FastAPI:
    """A new API server app; the lifespan connects it to the engine core at ``engine_address``."""
    app = FastAPI(
        title="ThinkingViT serve",
        summary="Image classification with stage-aware early exit",
        lifespan=lambda app: lifespan(app, engine_address, published),
        docs_url=None,  # mount_offline_docs serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    mount_offline_docs(app)
    mount_page(app)  # GET / and GET /v1/live
    app.state.api = ApiState(settings, model, device)
    # With a token set, the classify routes require it (and the OpenAPI schema says so);
    # the model, health and metrics routes stay open for probes and scrapers.
    auth = [Depends(require_token)] if settings.api_token is not None else []
    app.include_router(classify_router, dependencies=auth, responses=UNAUTHORIZED if auth else None)
    app.include_router(infer_router, dependencies=auth, responses=INFER_UNAUTHORIZED if auth else None)
    for router in (model_router, health_router, meta_router):
        app.include_router(router)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    direct = [route for route in classify_router.routes if isinstance(route, APIRoute)]
    app.add_middleware(DirectRoutes, routes=direct, auth=bool(auth))
    if model is not None:
        limit_top_k_in_schema(app, model.config.num_classes)
    return app


def limit_top_k_in_schema(app: FastAPI, num_classes: int) -> None:
    """The OpenAPI schema states top_k's upper bound, the served model's class count (the query
    Struct cannot: it is the same for every model), so clients and fuzzers see the real range."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == "top_k" and parameter["in"] == "query":
                    parameter["schema"]["maximum"] = num_classes
        return schema

    app.openapi = openapi


@asynccontextmanager
async def lifespan(app: FastAPI, engine_address: str, published) -> AsyncIterator[None]:
    api: ApiState = app.state.api
    api.engine = EngineClient(engine_address, published)
    await api.engine.start()
    api.metrics.ready.set(1 if api.ready else 0)
    processes.freeze_startup_heap()
    log.info("API server %d ready", os.getpid())
    try:
        with pillow_pixel_limit(api.settings.max_image_pixels):
            yield
    finally:
        api.metrics.ready.set(0)
        await api.engine.close()


class DirectRoutes:
    """The classify routes called straight from the ASGI scope, past FastAPI's routing layers.

    Under wrk load, the exception wrappers, router, dependency solving and request-response adapter
    that FastAPI puts around a route took about 30 % of an API server's CPU at threshold 0 (py-spy,
    ``python -m bench.profile``): every resume of a request's coroutine passes through all of them.
    The routes stay declared on the app, for OpenAPI and ``/docs``; this middleware, inside the
    app's server-error handler (an unexpected exception is still a 500 from ``unexpected_error``),
    only finds their method and path first and handles the rest as their FastAPI route would: the
    bearer token before the body, ``ServiceError`` as its JSON error. Anything else goes on to FastAPI.
    """

    def __init__(self, app: ASGIApp, routes: list[APIRoute], auth: bool):
        self.app, self.auth = app, auth
        self.routes = {(method, route.path): route for route in routes for method in route.methods}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = self.routes.get((scope.get("method"), scope["path"])) if scope["type"] == "http" else None
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # as the router sets it: ``classifies`` reads its tags
        request = Request(scope, receive)
        try:
            if self.auth:
                check_token(request)
            response = await route.endpoint(request)
        except ServiceError as error:
            response = await service_error(request, error)
        await response(scope, receive, send)


# ---------------------------------------------------------------------------------- errors


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers)


async def service_error(request: Request, error: ServiceError) -> JSONResponse:
    if classifies(request):  # a bad /v1/model parameter is not a failed classification
        request.app.state.api.metrics.record_failure(error.outcome, error.reason)
    return error_response(error)


def classifies(request: Request) -> bool:
    """Whether the request was routed to a classification route (tagged "classify"), the only
    requests that ``thinkingvit_requests_total`` counts."""
    route = request.scope.get("route")
    return CLASSIFY_TAG in getattr(route, "tags", ())


async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{e['loc'][-1]}: {e['msg']}" for e in error.errors())
    return await service_error(request, invalid(422, "invalid_parameter", problems))


async def http_error(request: Request, error: HTTPException) -> JSONResponse:
    reason = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
    body = {"error": {"status": error.status_code, "reason": reason, "message": str(error.detail)}}
    return JSONResponse(body, status_code=error.status_code, headers=error.headers)


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    body = {"error": {"status": 500, "reason": "internal", "message": f"{type(error).__name__}: {error}"}}
    return JSONResponse(body, status_code=500)


# ---------------------------------------------------------------------------------- the process


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: SIGTERM marks the API server draining (readiness off; requests that started
    before it are still answered, later ones get 503), a repeated signal does not cut the drain
    short, and a drained shutdown exits with status 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        api: ApiState = self.app.state.api
        if api.draining_since is not None:
            return  # already draining: the launcher and an orchestrator may both send SIGTERM
        api.draining_since = time.perf_counter()
        api.metrics.ready.set(0)
        log.info("API server %d draining: %d requests in flight finish", os.getpid(), api.engine.pending())
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # not re-raised after the drain: the exit is a clean one


def serve_api_server(settings: Settings, sockets, model: ServedModel, device: str, engine_address: str,
                     published, cpus, index: int) -> None:  # fmt: skip
    """Process entry of one API server: serve HTTP on the shared ``sockets`` until SIGTERM."""
    processes.become_child(f"api-server-{index}", cpus)
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = create_app(settings, model, device, engine_address, published)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_grace_s,
        timeout_keep_alive=settings.keep_alive_s,  # above the balancer's idle timeout (settings)
        access_log=False,
    )
    server = DrainingServer(config, app)
    server.run(sockets=sockets)
    processes.skip_final_collection()
    raise SystemExit(0 if server.started else 3)
