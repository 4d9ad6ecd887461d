"""The Open Inference Protocol's (KServe v2) wire format for ``infer``, without HTTP or the engine.

A request body is JSON, or JSON followed by raw tensors: Triton's binary tensor data extension,
which ``tritonclient`` and ``perf_analyzer`` use by default. The header ``Inference-Header-Content-
Length`` says where the JSON ends; each binary input says its size in ``parameters.binary_data_size``
and the tensors follow in the order of ``inputs``. A BYTES tensor in binary is each element as a
4-byte little-endian length and its bytes; in JSON data it is a list of strings (base64 here: an
encoded image is not UTF-8 text). Answers go back the same two ways, chosen per output.

Everything a client can get wrong is a ``ProtocolError`` naming what (the route answers 400), so
no malformed body reaches the engine or raises anything else.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from msgspec.json import encode as json_encode
from pydantic import BaseModel, ConfigDict, Field, ValidationError

HEADER_LENGTH = "Inference-Header-Content-Length"
Scalar = bool | int | float | str  # a parameter's value, as the protocol allows
NUMPY = {"FP32": np.dtype("<f4"), "INT32": np.dtype("<i4"), "INT64": np.dtype("<i8")}  # BYTES: list[bytes]


class ProtocolError(ValueError):
    """The request does not follow the protocol or the model's inputs; the message says how."""


# ---------------------------------------------------------------------------------- the JSON header


class InputTensor(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    shape: list[Annotated[int, Field(ge=0)]]
    datatype: str
    parameters: dict[str, Scalar] = {}
    data: list | None = Field(None, description="the values, flat or nested; BYTES as base64 strings")


class RequestedOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    parameters: dict[str, Scalar] = Field(
        {}, description="binary_data (bool); on probabilities, classification (int): the top k as text"
    )


class InferRequest(BaseModel):
    """The JSON part of an infer request (the OpenAPI schema of the route's JSON body)."""

    model_config = ConfigDict(extra="forbid")
    id: str | None = None
    parameters: dict[str, Scalar] = Field(
        {}, description="threshold, top_k, timeout_ms (as the classify routes' query), binary_data_output"
    )
    inputs: list[InputTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = Field(None, description="default: every output")


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of the model: its datatype and the shapes it may have (-1: any size)."""

    name: str
    datatype: str
    shapes: tuple[tuple[int, ...], ...]  # the first is the one metadata shows

    def accepts(self, shape: list[int]) -> bool:
        return any(
            len(shape) == len(allowed) and all(a in (-1, s) for a, s in zip(allowed, shape))
            for allowed in self.shapes
        )


def problems(error: ValidationError) -> str:
    """pydantic's errors in one line: 'inputs.0.shape: Input should be a valid list; ...'."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in error.errors())


# ---------------------------------------------------------------------------------- requests


def parse_request(body: bytes, header_length: str | None, specs: dict[str, TensorSpec]) -> tuple[InferRequest, dict]:
    """The request's JSON part and its inputs by name: FP32 as arrays of their shape, BYTES as
    lists of bytes. Checks each input against ``specs`` before decoding it."""
    head, binary = split_body(body, header_length)
    try:
        request = InferRequest.model_validate_json(head)
    except ValidationError as e:
        raise ProtocolError(f"bad infer request: {problems(e)}") from None
    tensors, offset = {}, 0
    for tensor in request.inputs:
        spec = specs.get(tensor.name)
        if spec is None:
            raise ProtocolError(f"unknown input {tensor.name!r}; the model's inputs are {', '.join(specs)}")
        if tensor.name in tensors:
            raise ProtocolError(f"input {tensor.name!r} given twice")
        check_tensor(tensor, spec)
        size = tensor.parameters.get("binary_data_size")
        if size is None:
            tensors[tensor.name] = from_json(tensor)
            continue
        if type(size) is not int or size < 0 or tensor.data is not None:
            raise ProtocolError(f"input {tensor.name!r}: binary_data_size must be a byte count and come without data")
        if offset + size > len(binary):
            raise ProtocolError(
                f"input {tensor.name!r}: binary_data_size {size} runs past the body's "
                f"{len(binary) - offset} remaining binary bytes"
            )
        tensors[tensor.name] = from_binary(tensor, binary[offset : offset + size])
        offset += size
    if offset != len(binary):
        raise ProtocolError(
            f"{len(binary) - offset} bytes after the last binary input: {HEADER_LENGTH} or a "
            "binary_data_size is wrong"
        )
    return request, tensors


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON part, binary part); a header length that is not a length within the body is refused."""
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) <= len(body):
        raise ProtocolError(f"{HEADER_LENGTH} {header_length!r} is not a length within the {len(body)}-byte body")
    return body[: int(text)], body[int(text) :]


def check_tensor(tensor: InputTensor, spec: TensorSpec) -> None:
    if tensor.datatype != spec.datatype:
        raise ProtocolError(f"input {tensor.name!r} must be {spec.datatype}, not {tensor.datatype}")
    if not spec.accepts(tensor.shape):
        wanted = " or ".join(str(list(s)).replace("-1", "B") for s in spec.shapes)
        raise ProtocolError(f"input {tensor.name!r} has shape {tensor.shape}; the model takes {wanted}")


def from_binary(tensor: InputTensor, raw: bytes) -> np.ndarray | list[bytes]:
    count = math.prod(tensor.shape)
    if tensor.datatype == "BYTES":
        items = list(split_bytes(raw, tensor.name))
        if len(items) != count:
            raise ProtocolError(f"input {tensor.name!r}: {len(items)} elements, its shape {tensor.shape} says {count}")
        return items
    dtype = NUMPY[tensor.datatype]
    if len(raw) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {tensor.name!r}: {len(raw)} bytes, its shape {tensor.shape} of "
            f"{tensor.datatype} takes {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype).reshape(tensor.shape)


def split_bytes(raw: bytes, name: str) -> Iterator[bytes]:
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then that many bytes."""
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element's 4-byte length is cut off")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ProtocolError(f"input {name!r}: a BYTES element says {length} bytes, {len(raw) - offset} remain")
        yield raw[offset : offset + length]
        offset += length


def from_json(tensor: InputTensor) -> np.ndarray | list[bytes]:
    if tensor.data is None:
        raise ProtocolError(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
    values = list(flatten(tensor.data))
    count = math.prod(tensor.shape)
    if len(values) != count:
        raise ProtocolError(f"input {tensor.name!r}: {len(values)} values, its shape {tensor.shape} says {count}")
    if tensor.datatype == "BYTES":
        if not all(isinstance(v, str) for v in values):
            raise ProtocolError(f"input {tensor.name!r}: BYTES data must be strings (base64)")
        try:
            return [base64.b64decode(v, validate=True) for v in values]
        except ValueError as e:  # binascii.Error, or a string with non-ASCII characters
            raise ProtocolError(f"input {tensor.name!r}: not base64 ({e})") from None
    if not all(type(v) in (int, float) for v in values):  # bool is an int subclass, and not a number here
        raise ProtocolError(f"input {tensor.name!r}: {tensor.datatype} data must be numbers")
    try:
        with np.errstate(over="ignore"):  # FP32: a huge number becomes inf, which the route refuses
            return np.array(values, dtype=NUMPY[tensor.datatype]).reshape(tensor.shape)
    except OverflowError:  # an integer datatype
        raise ProtocolError(f"input {tensor.name!r}: a value does not fit {tensor.datatype}") from None


def flatten(data: list) -> Iterator[Any]:
    """The protocol allows data flat or nested as the shape; row-major either way."""
    for item in data:
        if isinstance(item, list):
            yield from flatten(item)
        else:
            yield item


# ---------------------------------------------------------------------------------- outputs


@dataclass(frozen=True)
class Selected:
    """An output the response carries, and how."""

    name: str
    binary: bool
    classification: int | None = None  # top k as "probability:index:label" strings, on probabilities


def select_outputs(request: InferRequest, specs: dict[str, TensorSpec], top_k: int | None) -> list[Selected]:
    """The requested outputs, in the request's order (default: all, in the model's order).

    ``binary_data`` per output; otherwise the request's ``binary_data_output`` (default JSON).
    ``classification`` (Triton's extension) only on ``probabilities``; ``top_k``, when the request
    gives it, asks the same of a ``probabilities`` output that did not.
    """
    default_binary = request.parameters.get("binary_data_output", False)
    if type(default_binary) is not bool:
        raise ProtocolError("parameter binary_data_output must be true or false")
    asked = request.outputs if request.outputs is not None else [RequestedOutput(name=n) for n in specs]
    selected = []
    for output in asked:
        if output.name not in specs:
            raise ProtocolError(f"unknown output {output.name!r}; the model's outputs are {', '.join(specs)}")
        if output.name in (s.name for s in selected):
            raise ProtocolError(f"output {output.name!r} asked twice")
        unknown = set(output.parameters) - {"binary_data", "classification"}
        if unknown:
            raise ProtocolError(f"output {output.name!r}: unknown parameters {sorted(unknown)}")
        binary = output.parameters.get("binary_data", default_binary)
        if type(binary) is not bool:
            raise ProtocolError(f"output {output.name!r}: binary_data must be true or false")
        k = output.parameters.get("classification", top_k if output.name == "probabilities" else None)
        if k is not None and (output.name != "probabilities" or type(k) is not int or not 1 <= k <= specs[output.name].shapes[0][-1]):
            raise ProtocolError(
                f"output {output.name!r}: classification is a class count from 1 to "
                f"{specs['probabilities'].shapes[0][-1]}, on probabilities only"
            )
        selected.append(Selected(output.name, binary, k))
    return selected


def encode_response(header: dict, outputs: list[tuple[Selected, str, np.ndarray | list[str]]]) -> tuple[bytes, int | None]:
    """The response body, and the JSON part's length when binary tensors follow it.

    ``outputs``: (what was asked, datatype, values) with values an array of the output's shape,
    or for BYTES a list of strings per image (or of lists, for a classification)."""
    entries, blobs = [], []
    for selected, datatype, values in outputs:
        shape = list(np.shape(values))
        entry: dict = {"name": selected.name, "datatype": datatype, "shape": shape}
        if not selected.binary:
            entry["data"] = values.ravel().tolist() if isinstance(values, np.ndarray) else list(flatten(values))
        else:
            raw = (
                np.ascontiguousarray(values, NUMPY[datatype]).tobytes()
                if datatype in NUMPY
                else b"".join(struct.pack("<I", len(b)) + b for b in (s.encode() for s in flatten(values)))
            )
            entry["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        entries.append(entry)
    head = json_encode(header | {"outputs": entries})
    if not blobs:
        return head, None
    return head + b"".join(blobs), len(head)
