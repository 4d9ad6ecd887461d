"""HTTP routes, one router per resource: classification, model description, health, metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Annotated, TypeVar

import numpy as np
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from msgspec.json import encode as json_encode
from prometheus_client import CONTENT_TYPE_LATEST

from service.deps import ApiDep, ApiState, ClassifyParams, ClassifyQuery, classify_params, openapi_parameters
from service.engine_client import EngineError
from service.errors import ServiceError, client_gone, from_engine, invalid, refused
from service.images import ImageError, decode_image
from service.metrics import exposition
from service.schemas import BatchResponse, Classification, ErrorResponse, ModelInfo
from service.served_model import ServedModel, cheapest_threshold
from service.transport import Answer, Explain
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
    503: ("Draining, the engine core died, or out of device memory even alone", RETRY_AFTER),
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
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
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
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
                    },
                    "required": ["files"],
                }
            }
        },
    }
}

CLASSIFY_TAG = "classify"  # the routes whose requests the metrics count
QUERY = {"parameters": openapi_parameters(ClassifyQuery)}
classify_router = APIRouter(tags=[CLASSIFY_TAG])
model_router = APIRouter(tags=["model"])
health_router = APIRouter(tags=["health"])


# ---------------------------------------------------------------------------------- classify


@classify_router.post(
    "/classify", response_model=Classification, responses=CLASSIFY_ERRORS, openapi_extra=IMAGE_BODY | QUERY
)
async def classify(request: Request) -> Response:
    """Classify one image: a multipart part `file` or a raw image/* body."""
    params = classify_params(request)
    api: ApiState = request.app.state.api
    (upload,) = await read_uploads(request, api.settings.max_body_bytes, max_files=1, raw_allowed=True)
    result = await until_disconnect(request, answer(api, upload, params))
    return json_response(result)


@classify_router.post(
    "/classify/batch", response_model=BatchResponse, responses=BATCH_ERRORS, openapi_extra=BATCH_BODY | QUERY
)
async def classify_batch(request: Request) -> Response:
    """Classify several images (every file part, in order); each is answered independently."""
    params = classify_params(request)
    api: ApiState = request.app.state.api
    uploads = await read_uploads(
        request, api.settings.max_body_bytes, max_files=api.settings.max_batch_images, raw_allowed=False
    )
    items = [batch_item(api, i, u, params) for i, u in enumerate(uploads)]
    return json_response({"results": await until_disconnect(request, asyncio.gather(*items))})


async def batch_item(api: ApiState, index: int, upload: Upload, params: ClassifyParams) -> dict:
    item = {"index": index, "filename": upload.filename, "result": None, "error": None}  # BatchItem
    try:
        return item | {"result": await answer(api, upload, params)}
    except ServiceError as e:
        api.metrics.record_failure(e.outcome, e.reason)
        return item | e.to_json()


async def answer(api: ApiState, upload: Upload, params: ClassifyParams) -> dict:
    """Admit, decode inline, hand over to the engine core, and build the response body.

    A small image decodes in tens of microseconds, less than a thread hop costs under load, so
    decoding runs on the event loop; the API server is one of several processes, so a large image
    holds up only its own process's other requests.
    """
    check_admission(api, params)
    try:
        image = decode_image(upload.data, api.model.preprocess, api.settings.max_image_pixels)
    except ImageError as e:
        raise invalid(422, "invalid_image", str(e)) from None
    result, total_s = await classify_image(api, image, params)
    return to_response(api.model, result, params, total_s)


async def classify_image(api: ApiState, image: np.ndarray, params: ClassifyParams) -> tuple[Answer, float]:
    """The engine path of every image of every route (admission already checked): hand the
    preprocessed (C, H, W) float32 image to the engine core, await its answer, count it.
    Returns the answer and the seconds since the request began; raises ServiceError."""
    try:
        waited_s = time.perf_counter() - params.started
        result = await api.engine.classify(image, params.threshold, params.timeout_s, params.min_threshold, waited_s,
                                           params.explain)  # fmt: skip
    except EngineError as e:
        raise from_engine(e, api.settings.retry_after_s) from None
    total_s = time.perf_counter() - params.started
    api.metrics.record_success(total_s)
    return result, total_s


def check_admission(api: ApiState, params: ClassifyParams) -> None:
    """Refuse before decoding: a request that arrived after SIGTERM (503), a dead engine (503), or
    a full queue as the engine last published it (429; the engine enforces the bound exactly)."""
    settings = api.settings
    if api.draining_since is not None and params.started > api.draining_since:
        raise refused(503, "draining", "the server is shutting down", settings.retry_after_s)
    try:
        api.engine.check_alive()
    except EngineError as e:
        raise from_engine(e, settings.retry_after_s) from None
    if (waiting := api.engine.queue_depth()) >= settings.max_queue_size:
        raise refused(429, "queue_full", f"queue full: {waiting} requests waiting", settings.retry_after_s)


def to_response(model: ServedModel, result: Answer, params: ClassifyParams, total_s: float) -> dict:
    """The Classification body as plain data, numbers rounded to what a person reads.

    The answer is the exit stage's; ``stages_run`` and ``gmacs`` count what ran, which is more
    than the exit stage only with explain=all. Without explain the body has no ``explain`` key.
    """
    probs = np.frombuffer(result.probabilities, dtype=np.float32)
    top = top_entries(model.class_names, probs, params.top_k)
    stage, ran = result.exit_stage, len(result.confidences)
    body = {
        "label": top[0]["label"],
        "class_index": top[0]["class_index"],
        "confidence": readable(result.confidences[stage]),
        "stage_confidences": [readable(c) for c in result.confidences],
        "top_k": top,
        "exit_stage": stage,
        "stages_run": ran,
        "heads_used": model.config.stages[stage],
        "gmacs": readable(model.exit_gmacs[ran - 1]),
        "threshold": params.threshold if result.threshold is None else result.threshold,
        "requested_threshold": params.threshold,
        "degraded": result.degraded,
        "timings": {
            "queue_ms": readable(1000 * result.queue_s),
            "compute_ms": readable(1000 * result.compute_s),
            "total_ms": readable(1000 * total_s),
        },
    }
    if params.explain is not Explain.NONE:
        body["explain"] = explanation(model, result, params)
    return body


def explanation(model: ServedModel, result: Answer, params: ClassifyParams) -> dict:
    """Every stage that ran: its top-k, confidence and heads, and whether the image left there."""
    stages = []
    for s, (confidence, row) in enumerate(zip(result.confidences, result.stage_probabilities)):
        probs = np.frombuffer(row, dtype=np.float32)
        stages.append({
            "stage": s,
            "heads": model.config.stages[s],
            "confidence": readable(confidence),
            "top_k": top_entries(model.class_names, probs, params.top_k),
            "exit": s == result.exit_stage,
            "exit_gmacs": readable(model.exit_gmacs[s]),
        })  # fmt: skip
    return {"mode": params.explain.value, "stages": stages, "full_gmacs": readable(model.exit_gmacs[-1])}


def top_entries(names: list[str], probs: np.ndarray, k: int) -> list[dict]:
    """The response's ``top_k`` entries for a (classes,) softmax."""
    return [{"label": names[i], "class_index": i, "probability": readable(probs[i])} for i in top_classes(probs, k)]


def top_classes(probs: np.ndarray, k: int) -> list[int]:
    """The k most probable class indices of one image's (classes,) probabilities, most probable
    first; ties: the lower index first."""
    return np.argsort(-probs, kind="stable")[:k].tolist()


def readable(x: float) -> float:
    """Four significant digits: 0.045906336000000006 -> 0.04591."""
    return float(f"{x:.4g}")


def json_response(body: dict) -> Response:
    """Serialised once, by msgspec, without a second validation pass through the response model."""
    return Response(json_encode(body), media_type="application/json")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` in this task; if the client disconnects first, cancel it, which aborts its
    requests. One watcher task per request: the work itself needs no task of its own, nor an
    ``asyncio.wait`` over both."""
    handler = asyncio.current_task()
    gone = False

    async def watch() -> None:
        nonlocal gone
        await _disconnected(request)
        gone = True
        handler.cancel()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled from elsewhere (the server stopping)
        handler.uncancel()
        raise client_gone() from None
    finally:
        watcher.cancel()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away; the body must already be read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---------------------------------------------------------------------------------- model


@model_router.get("/v1/model", responses=error_responses(422))
async def describe_model(
    api: ApiDep,
    target_accuracy: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="also pick the cheapest threshold reaching it"),
    ] = None,
) -> ModelInfo:
    """Preset, stages, heads, classes, preprocessing and the calibration profile (if any)."""
    info = api.model.describe() | {
        "default_threshold": api.settings.default_threshold,
        "device": api.device,
        "autocast": api.settings.autocast,
    }
    if target_accuracy is not None:
        info["recommended"] = cheapest_threshold(api.model.calibration, target_accuracy)
    return ModelInfo(**info)


# ---------------------------------------------------------------------------------- health


NOT_READY = {503: {"description": "Starting, draining, the engine core stalled or died", "content": {"application/json": {"schema": {"type": "object"}}}}}
DEAD = {503: {"description": "The engine core process died", "content": {"application/json": {"schema": {"type": "object"}}}}}


@health_router.get("/healthz", responses=DEAD)
async def healthz(api: ApiDep) -> JSONResponse:
    """Alive: this API server answers and the engine core still runs (a liveness probe then
    restarts a server whose engine died)."""
    if not api.engine.engine_alive:
        return JSONResponse({"status": "dead", "reason": "the engine core process is gone"}, status_code=503)
    return JSONResponse({"status": "alive"})


@health_router.get("/readyz", responses=NOT_READY)
async def readyz(api: ApiDep) -> JSONResponse:
    """Ready: model loaded, every stage warmed up, the engine core alive and not stalled (requests
    waiting while it finished no loop turn for `engine_stall_s`), not draining."""
    if not api.engine.engine_alive:
        return JSONResponse({"status": "dead"}, status_code=503)
    status = api.readiness()
    return JSONResponse({"status": status}, status_code=200 if status == "ready" else 503)


@health_router.get("/v2/health/live")
async def kserve_live(api: ApiDep) -> JSONResponse:
    alive = api.engine.engine_alive
    return JSONResponse({"live": alive}, status_code=200 if alive else 503)


@health_router.get("/v2/health/ready", responses=NOT_READY)
async def kserve_ready(api: ApiDep) -> JSONResponse:
    return JSONResponse({"ready": api.ready}, status_code=200 if api.ready else 503)


@health_router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics() -> Response:
    """Prometheus metrics of every process of the server (see docs/serving.md for the list)."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)
