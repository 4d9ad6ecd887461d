"""Shared request dependencies: the runtime the lifespan built, and the classify parameters."""

from __future__ import annotations

import hmac
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine import Engine
from service.errors import invalid, unauthorized
from service.metrics import ServiceMetrics
from service.served_model import ServedModel
from service.settings import Settings


@dataclass(frozen=True)
class Runtime:
    """What the lifespan owns while the server runs."""

    settings: Settings
    metrics: ServiceMetrics
    model: ServedModel
    engine: Engine
    decode_pool: ThreadPoolExecutor  # bounded: image decoding never runs on the event loop


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
bearer = HTTPBearer(auto_error=False, description="THINKINGVIT_API_TOKEN, when the server sets one")


def require_token(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """401 unless the request carries the server's bearer token (compared in constant time).

    Runs before the body is read, so an unauthenticated client cannot make the server buffer it.
    """
    expected = runtime.settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise unauthorized()


@dataclass(frozen=True)
class ClassifyParams:
    threshold: float
    top_k: int
    timeout_s: float


def classify_params(
    runtime: RuntimeDep,
    threshold: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="exit threshold; default: the server's"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="classes to return; default: the server's")] = None,
    timeout_ms: Annotated[
        float | None,
        Query(ge=1, allow_inf_nan=False, description="deadline in ms (>= 1); may only shorten the server's"),
    ] = None,
) -> ClassifyParams:
    settings, num_classes = runtime.settings, runtime.model.config.num_classes
    if top_k is not None and top_k > num_classes:
        raise invalid(422, "invalid_parameter", f"top_k: must be <= {num_classes}, the number of classes")
    timeout_s = settings.request_timeout_s
    if timeout_ms is not None:
        timeout_s = min(timeout_s, timeout_ms / 1000)
    return ClassifyParams(
        threshold=settings.default_threshold if threshold is None else threshold,
        top_k=min(num_classes, settings.default_top_k) if top_k is None else top_k,
        timeout_s=timeout_s,
    )


ParamsDep = Annotated[ClassifyParams, Depends(classify_params)]
