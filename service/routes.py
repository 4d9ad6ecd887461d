"""HTTP routes, one router per resource: classification, model description, health, metrics."""

from __future__ import annotations

import asyncio
import heapq
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ClassifyParams, ParamsDep, Runtime, RuntimeDep
from service.engine import Answer
from service.errors import ServiceError, client_gone, invalid
from service.images import ImageError, decode_image
from service.schemas import (
    BatchItem,
    BatchResponse,
    Classification,
    ErrorDetail,
    ErrorResponse,
    ModelInfo,
    Timings,
    TopClass,
)
from service.served_model import cheapest_threshold
from service.uploads import Upload, read_uploads

T = TypeVar("T")
RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}
ERROR_DOCS = {
    401: ("Missing or wrong bearer token (only when the server sets one)", {
        "WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    413: ("Body over max_body_bytes", None),
    415: ("Neither multipart/form-data nor (for /classify) image/*", None),
    422: ("Invalid parameter, body or image", None),
    429: ("Queue full", RETRY_AFTER),
    500: ("The batch this image ran in failed", None),
    503: ("Draining, not ready, or out of device memory even alone", RETRY_AFTER),
    504: ("No answer before the deadline", None),
}  # fmt: skip


def error_responses(*codes: int) -> dict:
    """OpenAPI responses for these error statuses, all with the ErrorResponse body."""
    docs = {code: ERROR_DOCS[code] for code in codes}
    return {
        code: {"model": ErrorResponse, "description": text} | ({"headers": headers} if headers else {})
        for code, (text, headers) in docs.items()
    }


CLASSIFY_ERRORS = error_responses(413, 415, 422, 429, 500, 503, 504)
BATCH_ERRORS = error_responses(413, 415, 422)  # per-image failures are items of the 200 body
UNAUTHORIZED = error_responses(401)
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            }
        },
    }
}

classify_router = APIRouter(tags=["classify"])
model_router = APIRouter(tags=["model"])
health_router = APIRouter(tags=["health"])


# ---------------------------------------------------------------------------------- classify


@classify_router.post("/classify", responses=CLASSIFY_ERRORS, openapi_extra=IMAGE_BODY)
async def classify(request: Request, params: ParamsDep, runtime: RuntimeDep) -> Classification:
    """Classify one image: a multipart part ``file`` or a raw image/* body."""
    started = time.perf_counter()
    settings = runtime.settings
    (upload,) = await read_uploads(request, settings.max_body_bytes, max_files=1, raw_allowed=True)
    return await until_disconnect(request, answer(runtime, upload, params, started))


@classify_router.post("/classify/batch", responses=BATCH_ERRORS, openapi_extra=BATCH_BODY)
async def classify_batch(request: Request, params: ParamsDep, runtime: RuntimeDep) -> BatchResponse:
    """Classify several images (every file part, in order); each is answered independently."""
    started = time.perf_counter()
    settings = runtime.settings
    uploads = await read_uploads(
        request, settings.max_body_bytes, max_files=settings.max_batch_images, raw_allowed=False
    )
    items = [batch_item(runtime, i, u, params, started) for i, u in enumerate(uploads)]
    return BatchResponse(results=await until_disconnect(request, asyncio.gather(*items)))


async def batch_item(runtime: Runtime, index: int, upload: Upload, params: ClassifyParams, started: float):
    try:
        result = await answer(runtime, upload, params, started)
        return BatchItem(index=index, filename=upload.filename, result=result)
    except ServiceError as e:
        runtime.metrics.record_failure(e.outcome, e.reason)
        return BatchItem(index=index, filename=upload.filename, error=ErrorDetail(**e.to_json()["error"]))


async def answer(runtime: Runtime, upload: Upload, params: ClassifyParams, started: float) -> Classification:
    """Decode off the event loop, wait for the engine, and build the response."""
    settings, model = runtime.settings, runtime.model
    runtime.engine.check_admission()  # refuse overload before spending a decode on it
    loop = asyncio.get_running_loop()
    try:
        image = await loop.run_in_executor(
            runtime.decode_pool, decode_image, upload.data, model.preprocess, settings.max_image_pixels
        )
    except ImageError as e:
        raise invalid(422, "invalid_image", str(e)) from None
    result = await runtime.engine.classify(image, params.threshold, params.timeout_s)
    total_s = time.perf_counter() - started
    runtime.metrics.record_success(total_s)
    return to_response(runtime, result, params, total_s)


def to_response(runtime: Runtime, result: Answer, params: ClassifyParams, total_s: float) -> Classification:
    names, probs = runtime.model.class_names, result.probabilities
    best = heapq.nlargest(params.top_k, range(len(probs)), key=probs.__getitem__)
    stage = result.exit_stage
    return Classification(
        label=names[best[0]],
        class_index=best[0],
        confidence=result.confidence,
        top_k=[TopClass(label=names[i], class_index=i, probability=probs[i]) for i in best],
        exit_stage=stage,
        stages_run=stage + 1,
        heads_used=runtime.model.config.stages[stage],
        gmacs=result.gmacs,
        threshold=params.threshold,
        timings=Timings(
            queue_ms=1000 * result.queue_s, compute_ms=1000 * result.compute_s, total_ms=1000 * total_s
        ),
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it, which aborts its requests."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise client_gone()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away; the body must already be read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------- model


@model_router.get("/v1/model", responses=error_responses(422))
async def describe_model(
    runtime: RuntimeDep,
    target_accuracy: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="also pick the cheapest threshold reaching it"),
    ] = None,
) -> ModelInfo:
    """Preset, stages, heads, classes, preprocessing and the calibration profile (if any)."""
    info = runtime.model.describe() | {
        "default_threshold": runtime.settings.default_threshold,
        "device": str(runtime.engine.worker.device),
        "autocast": runtime.settings.autocast,
    }
    if target_accuracy is not None:
        info["recommended"] = cheapest_threshold(runtime.model.calibration, target_accuracy)
    return ModelInfo(**info)


# ---------------------------------------------------------------------------------- health


NOT_READY = {503: {"description": "Starting or draining", "content": {"application/json": {"schema": {"type": "object"}}}}}
DEAD = {503: {"description": "The model process died", "content": {"application/json": {"schema": {"type": "object"}}}}}


@health_router.get("/healthz", responses=DEAD)
async def healthz(request: Request) -> JSONResponse:
    """Alive: the process serves HTTP and, once loaded, its model worker still runs (a liveness
    probe then restarts a server whose model process died)."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is not None and not runtime.engine.worker.alive():
        return JSONResponse({"status": "dead", "reason": "the model worker is gone"}, status_code=503)
    return JSONResponse({"status": "alive"})


@health_router.get("/readyz", responses=NOT_READY)
async def readyz(runtime: RuntimeDep) -> JSONResponse:
    """Ready: model loaded, every stage warmed up, not draining."""
    engine = runtime.engine
    if not engine.worker.alive():
        return JSONResponse({"status": "dead"}, status_code=503)
    status = "ready" if engine.ready else ("draining" if engine.draining else "starting")
    return JSONResponse({"status": status}, status_code=200 if engine.ready else 503)


@health_router.get("/v2/health/live")
async def kserve_live() -> dict:
    return {"live": True}


@health_router.get("/v2/health/ready", responses=NOT_READY)
async def kserve_ready(runtime: RuntimeDep) -> JSONResponse:
    ready = runtime.engine.ready and runtime.engine.worker.alive()
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


@health_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics (see docs/serving.md for the list)."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
