"""The FastAPI application: ``create_app(settings)`` and ``run_server(settings)``.

The lifespan owns everything with a lifetime: it loads the checkpoint, builds the scheduler, the
worker and the engine, warms up every stage (only then is the server ready) and stops them on exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from types import FrameType

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from model.checkpoint import load_checkpoint
from service.deps import Runtime, require_token
from service.docs_assets import mount_offline_docs
from service.engine import Engine, Hooks
from service.errors import ServiceError, invalid
from service.images import pillow_pixel_limit
from service.metrics import ServiceMetrics
from service.routes import UNAUTHORIZED, classify_router, health_router, model_router
from service.scheduler import Scheduler, SchedulerConfig
from service.served_model import ServedModel
from service.settings import Settings
from service.worker import Worker, resolve_device

log = logging.getLogger(__name__)


def create_app(settings: Settings, hooks: Hooks | None = None) -> FastAPI:
    """A new app with its own metrics registry; nothing is loaded until the lifespan starts."""
    hooks = hooks or Hooks()
    app = FastAPI(
        title="ThinkingViT serve",
        summary="Image classification with stage-aware early exit",
        lifespan=lambda app: lifespan(app, settings, hooks),
        docs_url=None,  # mount_offline_docs serves /docs and /redoc without a CDN
        redoc_url=None,
    )
    mount_offline_docs(app)
    app.state.metrics = ServiceMetrics()
    # With a token set, the classify routes require it (and the OpenAPI schema says so);
    # the model, health and metrics routes stay open for probes and scrapers.
    auth = [Depends(require_token)] if settings.api_token is not None else []
    app.include_router(classify_router, dependencies=auth, responses=UNAUTHORIZED if auth else None)
    for router in (model_router, health_router):
        app.include_router(router)
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI, settings: Settings, hooks: Hooks) -> AsyncIterator[None]:
    metrics: ServiceMetrics = app.state.metrics
    engine, model = await asyncio.to_thread(build_engine, settings, metrics, hooks)
    decode_pool = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="thinkingvit-decode")
    app.state.runtime = Runtime(settings, metrics, model, engine, decode_pool)
    engine.start()
    log.info("serving %s on %s: ready", settings.checkpoint.name, engine.worker.device)
    try:
        with pillow_pixel_limit(settings.max_image_pixels):
            yield
    finally:
        await engine.stop()
        decode_pool.shutdown(wait=False, cancel_futures=True)


def build_engine(settings: Settings, metrics: ServiceMetrics, hooks: Hooks) -> tuple[Engine, ServedModel]:
    """Load, warm up every stage, and wire scheduler, worker and engine (blocking; off the loop)."""
    device = resolve_device(settings.device)
    loaded = load_checkpoint(settings.checkpoint, preset=settings.preset, device=device)
    loaded.model.set_attention_backend(settings.attention_backend)
    model = ServedModel.from_checkpoint(settings.checkpoint.name, loaded)
    num_stages = model.num_stages
    config = SchedulerConfig(
        num_stages=num_stages,
        max_batch_sizes=settings.per_stage("max_batch_size", num_stages),
        max_wait_s=tuple(ms / 1000 for ms in settings.per_stage("max_wait_ms", num_stages)),
        max_queue_size=settings.max_queue_size,
    )
    worker = Worker(loaded.model, device, settings.autocast, hooks.before_batch, isolate=settings.model_process)
    worker.submit(worker.warm_up, config.max_batch_sizes).result()
    metrics.init_stages(num_stages)
    engine = Engine(
        Scheduler(config), worker, metrics, model.exit_gmacs, model.stage_gmacs,
        retry_after_s=settings.retry_after_s, hooks=hooks,
    )  # fmt: skip
    metrics.track_in_flight(engine.in_flight)
    return engine, model


# ---------------------------------------------------------------------------------- errors


def error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_json(), status_code=error.status, headers=error.headers)


async def service_error(request: Request, error: ServiceError) -> JSONResponse:
    request.app.state.metrics.record_failure(error.outcome, error.reason)
    return error_response(error)


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


# ---------------------------------------------------------------------------------- server


class DrainingServer(uvicorn.Server):
    """uvicorn, plus: the first SIGTERM/SIGINT turns readiness off and refuses new work at once,
    and a drained shutdown exits with status 0 (uvicorn would re-raise the signal and die by it,
    which supervisors report as a crash)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        runtime: Runtime | None = getattr(self.app.state, "runtime", None)
        if runtime is not None:
            runtime.engine.begin_drain_threadsafe()
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # not re-raised after the drain: the exit is a clean one


def run_server(settings: Settings, app: FastAPI | None = None) -> bool:
    """Serve until SIGTERM; in-flight requests get ``drain_grace_s`` to finish. The process entry:
    it configures logging for the ``service`` loggers too. False if the app never started (the
    checkpoint could not be loaded, the port was taken)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    app = app or create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.drain_grace_s,
    )
    server = DrainingServer(config, app)
    server.run()
    return server.started
