"""The Open Inference Protocol's wire format (service/oip_codec.py), without a server: what goes in
comes out, and any body at all is either parsed or refused with a ProtocolError (never another
exception, which the route would answer with a 500)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.oip_codec import (
    InferRequest, ProtocolError, Selected, TensorSpec, encode_response, parse_request, select_outputs,
)  # fmt: skip

SPECS = {
    "image": TensorSpec("image", "BYTES", ((-1, 1), (-1,))),
    "pixel_values": TensorSpec("pixel_values", "FP32", ((-1, 1, 2, 2),)),
}
OUTPUT_SPECS = {"probabilities": TensorSpec("probabilities", "FP32", ((-1, 3),)), "label": TensorSpec("label", "BYTES", ((-1,),))}


def binary(inputs: list[tuple[dict, bytes]], **request) -> tuple[bytes, str]:
    for head, raw in inputs:
        head["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps({"inputs": [h for h, _ in inputs], **request}).encode()
    return head + b"".join(raw for _, raw in inputs), str(len(head))


def test_binary_bytes_and_fp32_inputs_come_out_as_sent():
    files = [b"first", b"", b"\x00\xff third"]
    pixels = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2)
    strings = b"".join(struct.pack("<I", len(f)) + f for f in files)
    body, length = binary([({"name": "image", "datatype": "BYTES", "shape": [3, 1]}, strings)])
    assert parse_request(body, length, SPECS)[1] == {"image": files}
    body, length = binary([({"name": "pixel_values", "datatype": "FP32", "shape": [2, 1, 2, 2]}, pixels.tobytes())])
    np.testing.assert_array_equal(parse_request(body, length, SPECS)[1]["pixel_values"], pixels)


def test_json_data_flat_or_nested():
    nested = [[[[0.5, 1], [2, 3]]]]
    for data in (nested, [0.5, 1, 2, 3]):
        body = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 2, 2], "data": data}]})
        values = parse_request(body.encode(), None, SPECS)[1]["pixel_values"]
        np.testing.assert_array_equal(values, np.array(nested, np.float32))


def test_outputs_default_to_all_in_json_and_follow_the_request():
    request = InferRequest.model_validate({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": []}]})
    assert select_outputs(request, OUTPUT_SPECS, None) == [Selected("probabilities", False), Selected("label", False)]
    request.parameters["binary_data_output"] = True
    assert select_outputs(request, OUTPUT_SPECS, 2) == [Selected("probabilities", True, 2), Selected("label", True)]


def test_response_json_then_binary_tensors():
    probs = np.array([[0.5, 0.25, 0.25]], np.float32)
    outputs = [(Selected("probabilities", True), "FP32", probs), (Selected("label", False), "BYTES", ["cat"]),
               (Selected("label", True), "BYTES", ["dog"])]  # fmt: skip
    body, length = encode_response({"model_name": "m"}, outputs)
    head = json.loads(body[:length])
    assert [o.get("data") for o in head["outputs"]] == [None, ["cat"], None]
    assert body[length:] == probs.tobytes() + struct.pack("<I", 3) + b"dog"
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"] if "parameters" in o] == [12, 7]
    assert encode_response({"model_name": "m"}, outputs[1:2])[1] is None  # JSON alone: no header length


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                     lambda children: st.lists(children, max_size=4) | st.dictionaries(
                         st.sampled_from(["inputs", "name", "datatype", "shape", "data", "parameters", "outputs",
                                          "binary_data_size", "image", "pixel_values", "FP32", "BYTES"]),
                         children, max_size=5),
                     max_leaves=30).map(lambda v: json.dumps(v).encode()),
    ),
    st.one_of(st.none(), st.text(max_size=4), st.integers(0, 300).map(str)),
    st.binary(max_size=40),
)
def test_any_body_is_parsed_or_refused_with_a_protocol_error(head, header_length, tail):
    try:
        parse_request(head + tail, header_length, SPECS)
    except ProtocolError:
        pass


def test_a_header_length_that_lies_is_refused():
    body, _ = binary([({"name": "image", "datatype": "BYTES", "shape": [1]}, struct.pack("<I", 1) + b"x")])
    for lie in ("0", "-1", "abc", str(len(body) + 1), "3"):
        with pytest.raises(ProtocolError):
            parse_request(body, lie, SPECS)
