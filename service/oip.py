"""The Open Inference Protocol (KServe v2) routes, so Triton's clients and perf_analyzer talk to us.

``GET /v2`` (server metadata), ``GET /v2/models/{name}[/versions/1]`` (model metadata),
``.../ready``, ``.../config`` (the Triton-style configuration perf_analyzer reads) and
``POST .../infer``. The model's name is the served checkpoint's file name without its suffix; its
only version is "1". The wire format lives in ``service.oip_codec``.

Infer takes either ``image`` (BYTES [B]: encoded files, exactly what ``/classify`` accepts) or
``pixel_values`` (FP32 [B, C, H, W], already preprocessed), and every image takes the classify
routes' own path: the same parameters and validation (``classify_params``), admission, limits,
engine call and metrics (``routes.check_admission``, ``routes.classify_image``). Only the shape
of errors differs: the protocol's ``{"error": "message"}``, with 400 for any bad input.
"""

from __future__ import annotations

import asyncio
import time
from importlib import metadata
from pathlib import Path

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.routing import APIRoute
from msgspec.json import encode as json_encode
from pydantic import BaseModel, ConfigDict

from service.deps import ApiState, ClassifyParams, ClassifyQuery, parse_query, resolve_params
from service.errors import ServiceError, invalid
from service.images import ImageError, decode_image
from service.oip_codec import (
    HEADER_LENGTH, InferRequest, ProtocolError, Selected, TensorSpec, encode_response, parse_request,
    select_outputs,
)  # fmt: skip
from service.routes import check_admission, classify_image, top_classes, until_disconnect
from service.served_model import ServedModel
from service.transport import Answer
from service.uploads import read_body

VERSION = "1"
PROTOCOL_PARAMETERS = ("binary_data_output",)  # request parameters of the protocol itself
TRITON_TYPES = {"FP32": "TYPE_FP32", "INT32": "TYPE_INT32", "INT64": "TYPE_INT64", "BYTES": "TYPE_STRING"}


# ---------------------------------------------------------------------------------- errors


class ProtocolRoute(APIRoute):
    """A route whose ServiceErrors answer in the protocol's shape, ``{"error": "message"}``, with
    the status and headers the classify routes give them (the app's handler would send our own
    ``{"error": {...}}`` shape, which Triton's clients cannot read)."""

    counted = False  # whether a failure counts as a classification's, in requests_total

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as e:
                if self.counted:
                    request.app.state.api.metrics.record_failure(e.outcome, e.reason)
                return protocol_error(e)

        return route


class InferRoute(ProtocolRoute):
    counted = True  # as on the classify routes: every refused request, every image's outcome


def protocol_error(error: ServiceError) -> Response:
    return Response(json_encode({"error": error.message}), error.status, error.headers, "application/json")


class ErrorBody(BaseModel):
    error: str


def documented(*codes: int) -> dict:
    return {code: {"model": ErrorBody} for code in codes}


UNAUTHORIZED = {401: {
    "model": ErrorBody, "description": "Missing or wrong bearer token (only when the server sets one)",
    "headers": {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
}}  # fmt: skip


meta_router = APIRouter(tags=["open inference protocol"], route_class=ProtocolRoute)
infer_router = APIRouter(tags=["open inference protocol"], route_class=InferRoute)


# ---------------------------------------------------------------------------------- the model's tensors


def model_name(model: ServedModel) -> str:
    return Path(model.checkpoint).stem


def input_specs(model: ServedModel) -> dict[str, TensorSpec]:
    """``image`` is [B, 1] in the metadata, as Triton shows config dims [1] (perf_analyzer needs
    a dimension besides the batch's), and [B] is accepted too."""
    c, s = model.config.in_chans, model.config.img_size
    return {
        "image": TensorSpec("image", "BYTES", ((-1, 1), (-1,))),
        "pixel_values": TensorSpec("pixel_values", "FP32", ((-1, c, s, s),)),
    }


def output_specs(model: ServedModel) -> dict[str, TensorSpec]:
    per_image = ((-1,),)
    return {
        "probabilities": TensorSpec("probabilities", "FP32", ((-1, model.config.num_classes),)),
        "label": TensorSpec("label", "BYTES", per_image),
        "class_index": TensorSpec("class_index", "INT64", per_image),
        "confidence": TensorSpec("confidence", "FP32", per_image),
        "exit_stage": TensorSpec("exit_stage", "INT32", per_image),
        "gmacs": TensorSpec("gmacs", "FP32", per_image),
    }


def check_model(api: ApiState, name: str, version: str | None) -> None:
    """404 unless ``name`` (and ``version``, if given) is the served model."""
    served = model_name(api.model)
    if name != served or version not in (None, VERSION):
        what = f"model {name!r}" + (f" version {version!r}" if version is not None else "")
        raise ServiceError(404, f"unknown {what}; this server serves {served!r} version {VERSION}",
                           outcome="invalid", reason="unknown_model")  # fmt: skip


# ---------------------------------------------------------------------------------- metadata


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


def tensors_metadata(specs: dict[str, TensorSpec]) -> list[dict]:
    return [{"name": s.name, "datatype": s.datatype, "shape": list(s.shapes[0])} for s in specs.values()]


@meta_router.get("/v2", response_model=ServerMetadata)
async def server_metadata() -> Response:
    """The server's name, version and protocol extensions."""
    body = {
        "name": "thinkingvit-serve",
        "version": metadata.version("thinkingvit-serve"),
        "extensions": ["binary_tensor_data", "classification", "model_configuration", "parameters"],
    }
    return Response(json_encode(body), media_type="application/json")


@meta_router.get("/v2/models/{name}", response_model=ModelMetadata, responses=documented(404))
@meta_router.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses=documented(404))
async def model_metadata(request: Request, name: str, version: str | None = None) -> Response:
    """The model's inputs (`image` or `pixel_values`) and outputs."""
    api: ApiState = request.app.state.api
    check_model(api, name, version)
    body = {
        "name": name,
        "versions": [VERSION],
        "platform": "pytorch",
        "inputs": tensors_metadata(input_specs(api.model)),
        "outputs": tensors_metadata(output_specs(api.model)),
    }
    return Response(json_encode(body), media_type="application/json")


NOT_READY = {503: {"model": ModelReady, "description": "Draining, or the engine core died"}}


@meta_router.get("/v2/models/{name}/ready", response_model=ModelReady, responses=documented(404) | NOT_READY)
@meta_router.get(
    "/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, responses=documented(404) | NOT_READY
)
async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
    """200 while the server accepts work (as `/v2/health/ready`), 503 otherwise."""
    api: ApiState = request.app.state.api
    check_model(api, name, version)
    body = json_encode({"name": name, "ready": api.ready})
    return Response(body, 200 if api.ready else 503, media_type="application/json")


@meta_router.get("/v2/models/{name}/config", response_model=dict, responses=documented(404))
@meta_router.get("/v2/models/{name}/versions/{version}/config", response_model=dict, responses=documented(404))
async def model_config(request: Request, name: str, version: str | None = None) -> Response:
    """Triton's model configuration: `max_batch_size` (images per request), inputs and outputs
    with `data_type` and `dims` (without the batch dimension), both inputs optional (a
    request gives one of them). perf_analyzer reads it."""
    api: ApiState = request.app.state.api
    check_model(api, name, version)
    return Response(json_encode(triton_config(api, name)), media_type="application/json")


def triton_config(api: ApiState, name: str) -> dict:
    def entry(spec: TensorSpec) -> dict:
        dims = list(spec.shapes[0][1:])
        # a value per image has dims [1] in Triton's config, reshaped to none: [B] on the wire
        shape = {"dims": dims} if dims else {"dims": [1], "reshape": {"shape": []}}
        return {"name": spec.name, "data_type": TRITON_TYPES[spec.datatype]} | shape

    return {
        "name": name,
        "platform": "pytorch",
        "max_batch_size": api.settings.max_batch_images,
        "input": [entry(s) | {"optional": True} for s in input_specs(api.model).values()],
        "output": [entry(s) for s in output_specs(api.model).values()],
        "dynamic_batching": {"max_queue_delay_microseconds": round(1000 * api.settings.max_wait_ms[0])},
    }


# ---------------------------------------------------------------------------------- infer


class InferOutput(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    datatype: str
    shape: list[int]


class InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[InferOutput]


def inline_schema(model: type[BaseModel]) -> dict:
    """A model's JSON schema with its ``$defs`` written in place: OpenAPI reads refs elsewhere."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[1]])
            return {k: resolve(v) for k, v in node.items()}
        return [resolve(v) for v in node] if isinstance(node, list) else node

    return resolve(schema)


INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": f"JSON, or JSON followed by binary tensors with the header {HEADER_LENGTH}",
        "content": {
            "application/json": {"schema": inline_schema(InferRequest)},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
INFER_RESPONSES = {
    200: {
        "description": f"JSON, or (when an output asks binary_data) JSON then binary tensors; "
        f"the header {HEADER_LENGTH} gives the JSON part's length",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
    **documented(400, 404, 413, 429, 500, 503, 504),
}


@infer_router.post("/v2/models/{name}/infer", response_model=InferResponse, responses=INFER_RESPONSES, openapi_extra=INFER_BODY)
@infer_router.post(
    "/v2/models/{name}/versions/{version}/infer", response_model=InferResponse, responses=INFER_RESPONSES,
    openapi_extra=INFER_BODY,
)  # fmt: skip
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    """Classify B images given as `image` (BYTES [B], encoded files) or `pixel_values` (FP32
    [B, C, H, W]). Parameters `threshold`, `top_k`, `timeout_ms` as on `/classify`;
    `top_k` makes `probabilities` the top k as "probability:index:label" (Triton's
    classification, also asked per output). Outputs: `probabilities`, `label`,
    `class_index`, `confidence`, `exit_stage`, `gmacs`."""
    started = time.perf_counter()
    api: ApiState = request.app.state.api
    check_model(api, name, version)
    body = await read_body(request, api.settings.max_body_bytes)
    try:
        parsed, tensors = parse_request(body, request.headers.get(HEADER_LENGTH), input_specs(api.model))
        params, top_k = await infer_params(request, parsed.parameters, started)
        selected = select_outputs(parsed, output_specs(api.model), top_k)
    except ProtocolError as e:
        raise invalid(400, "invalid_body", str(e)) from None
    check_admission(api, params)
    images = to_images(api, tensors)
    settled = await until_disconnect(request, asyncio.gather(*(settle(api, image, params) for image in images)))
    failures = [s for s in settled if isinstance(s, ServiceError)]
    if failures:  # each image was counted as it settled, so the request is not counted again
        return protocol_error(failures[0])
    header = {"model_name": name, "model_version": VERSION} | ({"id": parsed.id} if parsed.id is not None else {})
    content, json_length = encode_response(header, outputs(api.model, settled, selected))
    if json_length is None:
        return Response(content, media_type="application/json")
    return Response(content, headers={HEADER_LENGTH: str(json_length)}, media_type="application/octet-stream")


async def infer_params(request: Request, parameters: dict, started: float) -> tuple[ClassifyParams, int | None]:
    """The request's parameters checked as ``/classify`` checks its query, by the same
    ``ClassifyQuery`` (400 instead of 422); also returns ``top_k`` when the request gave it."""
    ours = {k: v for k, v in parameters.items() if k not in PROTOCOL_PARAMETERS}
    if flags := sorted(k for k, v in ours.items() if isinstance(v, bool)):
        raise invalid(400, "invalid_parameter", f"{', '.join(flags)}: a number, not true or false")
    try:
        query = parse_query(ours, ClassifyQuery)
        params = resolve_params(request.app.state.api, query, started)
    except ServiceError as e:
        message = e.message.replace("query parameter", "parameter")
        if e.reason == "unknown_parameter":
            message += f"; or the protocol's: {', '.join(PROTOCOL_PARAMETERS)}"
        raise invalid(400, e.reason or "invalid_parameter", message) from None
    return params, query.top_k


def to_images(api: ApiState, tensors: dict) -> list[np.ndarray]:
    """One (C, H, W) float32 array per image, from whichever input the request gave: encoded files
    decoded exactly as ``/classify`` decodes them, or pixel values that must be finite."""
    if len(tensors) != 1:
        raise invalid(400, "invalid_body", "give exactly one input: image (encoded files) or pixel_values (preprocessed)")
    ((name, values),) = tensors.items()
    limit = api.settings.max_batch_images
    if not 1 <= len(values) <= limit:
        raise invalid(400, "invalid_body", f"{len(values)} images; a request takes 1 to {limit} (max_batch_size)")
    if name == "pixel_values":
        if not np.isfinite(values).all():
            raise invalid(400, "invalid_image", "pixel_values holds NaN or infinite values")
        return list(np.ascontiguousarray(values, np.float32))  # B arrays (C, H, W)
    images = []
    for i, data in enumerate(values):
        try:
            images.append(decode_image(data, api.model.preprocess, api.settings.max_image_pixels))
        except ImageError as e:
            raise invalid(400, "invalid_image", f"image {i}: {e}") from None
    return images


async def settle(api: ApiState, image: np.ndarray, params: ClassifyParams) -> Answer | ServiceError:
    """One image's answer, or its failure counted as ``/classify/batch`` counts a failed item."""
    try:
        answer, _ = await classify_image(api, image, params)
        return answer
    except ServiceError as e:
        api.metrics.record_failure(e.outcome, e.reason)
        return e


def outputs(model: ServedModel, answers: list[Answer], selected: list[Selected]) -> list[tuple]:
    """(what was asked, datatype, values) for each selected output, from the B answers."""
    probs = np.stack([np.frombuffer(a.probabilities, np.float32) for a in answers])  # (B, classes)
    best = probs.argmax(axis=1)  # (B,): the first of equals, as /classify's top class
    stages = np.array([a.exit_stage for a in answers], np.int32)  # (B,)
    names = model.class_names
    values = {
        "probabilities": ("FP32", probs),
        "label": ("BYTES", [names[i] for i in best]),
        "class_index": ("INT64", best.astype(np.int64)),
        "confidence": ("FP32", np.array([a.confidences[-1] for a in answers], np.float32)),
        "exit_stage": ("INT32", stages),
        "gmacs": ("FP32", np.array([model.exit_gmacs[s] for s in stages], np.float32)),
    }
    chosen = []
    for s in selected:
        datatype, value = values[s.name]
        if s.classification is not None:  # Triton's classification: [B, k] of "probability:index:label"
            datatype = "BYTES"
            value = [[f"{p[i]:f}:{i}:{names[i]}" for i in top_classes(p, s.classification)] for p in probs]
        chosen.append((s, datatype, value))
    return chosen
