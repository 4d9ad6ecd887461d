"""Shared request dependencies: the API server's state, the bearer token and the classify parameters.

Every dependency is ``async def``: FastAPI runs a plain ``def`` dependency in a thread pool, and
those thread hops cost more than the work they do. Nothing here blocks.
"""

from __future__ import annotations

import functools
import hmac
import math
import time
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import QueryParams

from service.engine_client import EngineClient
from service.errors import invalid, unauthorized
from service.metrics import ApiMetrics
from service.served_model import ServedModel, cheapest_threshold
from service.settings import Settings
from service.transport import Explain

Q = TypeVar("Q", bound=msgspec.Struct)


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
        return self.readiness() == "ready"

    def readiness(self) -> str:
        """'ready', or why not: 'starting', 'dead', 'draining' or 'stalled' (each checked once)."""
        if self.engine is None:
            return "starting"
        if not self.engine.engine_alive:
            return "dead"
        if self.draining_since is not None:
            return "draining"
        return "stalled" if self.stalled else "ready"

    @property
    def stalled(self) -> bool:
        """The engine core lives but has not turned its loop for ``engine_stall_s`` while work waits."""
        return self.engine is not None and self.engine.stalled_s() >= self.settings.engine_stall_s


def get_api(request: Request) -> ApiState:
    return request.app.state.api


ApiDep = Annotated[ApiState, Depends(get_api)]
bearer = HTTPBearer(auto_error=False, description="THINKINGVIT_API_TOKEN, when the server sets one")


async def require_token(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
) -> None:
    """The FastAPI dependency of ``check_token``; ``credentials`` declares the bearer scheme in the
    OpenAPI schema."""
    check_token(request)


def check_token(request: Request) -> None:
    """401 unless the request carries the server's bearer token (compared in constant time).

    Runs before the body is read, so an unauthenticated client cannot make the server buffer it.
    The header is read as ``HTTPBearer`` reads it: scheme ``Bearer`` in any case, then the token.
    """
    expected = request.app.state.api.settings.api_token.get_secret_value().encode()
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    if not hmac.compare_digest(given, expected):
        raise unauthorized()


@dataclass(frozen=True)
class ClassifyParams:
    threshold: float
    top_k: int
    timeout_s: float
    started: float  # perf_counter when the handler began: total_ms and the drain rule count from it
    min_threshold: float = 0.0  # the floor a latency SLO may lower ``threshold`` to
    explain: Explain = Explain.NONE


class ClassifyQuery(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The classify routes' query parameters, declared once for parsing, validation and the OpenAPI
    schema (``openapi_parameters``).

    msgspec parses them in microseconds; FastAPI's dependency solving of the first three as ``Query``
    parameters cost about 130 µs of CPU per request, a tenth of the API server's whole budget.
    The examples (one consistent request; target_accuracy excludes threshold) show in /docs and
    are the fuzzer's explicit case.
    """

    threshold: Annotated[float, Meta(ge=0, le=1, examples=[0.8], description="exit threshold; default: the server's")] | None = None
    top_k: Annotated[int, Meta(ge=1, examples=[3], description="classes to return; default: the server's")] | None = None
    timeout_ms: Annotated[
        float, Meta(ge=1, examples=[5000], description="deadline in ms (>= 1); may only shorten the server's")
    ] | None = None  # fmt: skip
    target_accuracy: Annotated[float, Meta(ge=0, le=1, description=(
        "instead of threshold: the cheapest threshold whose calibrated accuracy (a fraction) reaches this, "
        "as GET /v1/model?target_accuracy= says"))] | None = None  # fmt: skip
    min_threshold: Annotated[float, Meta(ge=0, le=1, examples=[0.5], description=(
        "in [0, threshold]: the lowest threshold the server may use under load (latency_slo_ms); "
        "default: the server's min_threshold"))] | None = None  # fmt: skip
    explain: Annotated[
        Literal["stages", "all"],
        Meta(examples=["stages"], description="stages: also report every stage that ran; all: run every stage whatever the "
             "threshold (costs the full model) and report each, with where it would have exited"),
    ] | None = None  # fmt: skip

    def __post_init__(self) -> None:
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number")


def parse_query(given: Mapping[str, object], query_type: type[Q]) -> Q:
    """``given`` (a query string, or the parameters of an inference request) as ``query_type``;
    a ServiceError (422) naming unknown or invalid parameters.

    A misspelt parameter (?treshold=0.5) is refused rather than silently answered at the default.
    """
    known = query_type.__struct_fields__
    if unknown := sorted(set(given) - set(known)):
        listed = ", ".join(sorted(known))
        raise invalid(422, "unknown_parameter", f"unknown query parameter {', '.join(unknown)}; known: {listed}")
    try:
        return msgspec.convert(dict(given), query_type, strict=False)
    except msgspec.ValidationError as e:
        raise invalid(422, "invalid_parameter", validation_message(str(e))) from None


TYPE_WORDS = {"`float | null`": "a number", "`int | null`": "an integer", "`float`": "a number", "`int`": "an integer"}


def validation_message(text: str) -> str:
    """msgspec's "Expected `int` >= 1 - at `$.top_k`" as "top_k: expected an integer >= 1"."""
    for code, words in TYPE_WORDS.items():
        text = text.replace(code, words)
    if " - at `$." not in text:
        return text
    message, _, where = text.rpartition(" - at `$.")
    return f"{where.rstrip('`')}: {message[:1].lower()}{message[1:]}"


def openapi_parameters(query_type: type[msgspec.Struct]) -> list[dict]:
    """OpenAPI ``parameters`` for a query Struct, from msgspec's own JSON schema of it."""
    (definition,) = msgspec.json.schema_components([query_type])[1].values()
    parameters = []
    for name, schema in definition["properties"].items():
        branch = next(s for s in schema.get("anyOf", [schema]) if s.get("type") != "null")
        described = {k: v for k, v in branch.items() if k != "description"}
        parameters.append({"name": name, "in": "query", "required": name in definition.get("required", ()),
                           "description": branch.get("description", ""), "schema": described})  # fmt: skip
    return parameters


def classify_params(request: Request) -> ClassifyParams:
    """The classify routes' parameters with the server's defaults filled in (called by the route
    itself: no FastAPI dependency, see ``ClassifyQuery``)."""
    started = time.perf_counter()
    return resolve_params(request.app.state.api, classify_query(request.scope["query_string"]), started)


@functools.lru_cache(maxsize=1024)
def classify_query(query_string: bytes) -> ClassifyQuery:
    """A classify query string, parsed once per distinct string (frozen: the parsed query is shared).

    Clients repeat theirs (``?threshold=0.8`` on every request), and under wrk load parsing took
    about a tenth of an API server's busy samples (py-spy), most of it Starlette building its
    ``QueryParams``. A refused string raises each time (exceptions are not cached); the cache holds
    at most 1,024 strings, the least recently used going first.
    """
    return parse_query(QueryParams(query_string), ClassifyQuery)


def resolve_params(api: ApiState, query: ClassifyQuery, started: float) -> ClassifyParams:
    """The checks that need the model and the settings, and the server's defaults."""
    settings, num_classes = api.settings, api.model.config.num_classes
    if query.top_k is not None and query.top_k > num_classes:
        raise invalid(422, "invalid_parameter", f"top_k: must be <= {num_classes}, the number of classes")
    timeout_s = settings.request_timeout_s
    if query.timeout_ms is not None:
        timeout_s = min(timeout_s, query.timeout_ms / 1000)
    threshold, min_threshold = query.threshold, query.min_threshold
    if query.target_accuracy is not None:
        if threshold is not None:
            raise invalid(422, "invalid_parameter", "give threshold or target_accuracy, not both")
        threshold = threshold_for_target(api.model, query.target_accuracy)
    threshold = settings.default_threshold if threshold is None else threshold
    if min_threshold is not None and min_threshold > threshold:
        raise invalid(422, "invalid_parameter", f"min_threshold: must be <= the threshold ({threshold:g})")
    return ClassifyParams(
        threshold=threshold,
        top_k=min(num_classes, settings.default_top_k) if query.top_k is None else query.top_k,
        timeout_s=timeout_s,
        started=started,
        min_threshold=min(settings.min_threshold, threshold) if min_threshold is None else min_threshold,
        explain=Explain.NONE if query.explain is None else Explain(query.explain),
    )


def threshold_for_target(model: ServedModel, target_accuracy: float) -> float:
    """The threshold ``GET /v1/model?target_accuracy=`` recommends (one rule: cheapest_threshold),
    or a 422 saying why there is none."""
    rows = (model.calibration or {}).get("rows")
    if not rows:
        raise invalid(422, "invalid_parameter", f"target_accuracy: the checkpoint {model.checkpoint} has no "
                      "calibration profile; give a threshold instead")  # fmt: skip
    row = cheapest_threshold(model.calibration, target_accuracy)
    if row is None:
        best = max(rows, key=lambda r: r["accuracy"])
        raise invalid(422, "invalid_parameter", f"target_accuracy: {target_accuracy:g} is above what the model "
                      f"reaches: at best {best['accuracy']:g} (threshold {best['threshold']:g})")  # fmt: skip
    return row["threshold"]

