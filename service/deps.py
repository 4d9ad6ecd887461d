"""Shared request dependencies: the API server's state, the bearer token and the classify parameters.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a thread pool, and
those thread hops cost more than the work they do. Nothing here blocks.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.engine_client import EngineClient
from service.errors import invalid, unauthorized
from service.metrics import ApiMetrics
from service.served_model import ServedModel
from service.settings import Settings
from service.transport import Explain


@dataclass
class ApiState:
    """What one API server process holds while it runs (``app.state.api``)."""

    settings: Settings
    model: ServedModel
    device: str  # where the engine core runs the model
    metrics: ApiMetrics = field(default_factory=ApiMetrics)
    engine: EngineClient | None = None  # connected by the lifespan
    draining_since: float | None = None  # perf_counter of SIGTERM; requests that started before it are served

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.engine.engine_alive and self.draining_since is None


def get_api(request: Request) -> ApiState:
    return request.app.state.api


ApiDep = Annotated[ApiState, Depends(get_api)]
bearer = HTTPBearer(auto_error=False, description="THINKINGVIT_API_TOKEN, when the server sets one")


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """401 unless the request carries the server's bearer token (compared in constant time).

    Runs before the body is read, so an unauthenticated client cannot make the server buffer it.
    """
    expected = request.app.state.api.settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, expected):
        raise unauthorized()


@dataclass(frozen=True)
class ClassifyParams:
    threshold: float
    top_k: int
    timeout_s: float
    started: float  # perf_counter when the handler began: total_ms and the drain rule count from it
    explain: Explain = Explain.NONE


async def classify_params(
    request: Request,
    threshold: Annotated[
        float | None,
        Query(ge=0, le=1, allow_inf_nan=False, description="exit threshold; default: the server's"),
    ] = None,
    top_k: Annotated[int | None, Query(ge=1, description="classes to return; default: the server's")] = None,
    timeout_ms: Annotated[
        float | None,
        Query(ge=1, allow_inf_nan=False, description="deadline in ms (>= 1); may only shorten the server's"),
    ] = None,
    explain: Annotated[
        Literal["stages", "all"] | None,
        Query(description="stages: also report every stage that ran; all: run every stage whatever "
              "the threshold (costs the full model) and report each, with where it would have exited"),
    ] = None,
) -> ClassifyParams:
    started = time.perf_counter()
    api: ApiState = request.app.state.api
    settings, num_classes = api.settings, api.model.config.num_classes
    if top_k is not None and top_k > num_classes:
        raise invalid(422, "invalid_parameter", f"top_k: must be <= {num_classes}, the number of classes")
    timeout_s = settings.request_timeout_s
    if timeout_ms is not None:
        timeout_s = min(timeout_s, timeout_ms / 1000)
    return ClassifyParams(
        threshold=settings.default_threshold if threshold is None else threshold,
        top_k=min(num_classes, settings.default_top_k) if top_k is None else top_k,
        timeout_s=timeout_s,
        started=started,
        explain=Explain.NONE if explain is None else Explain(explain),
    )


ParamsDep = Annotated[ClassifyParams, Depends(classify_params)]
