"""KServe tensors and stream errors (services/common/kserve.py, errors.py)."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.common.errors import from_stream_error
from services.common.kserve import InferRequestBuilder, first_bytes, first_int, output_arrays, raw_outputs


def test_stream_errors_map_to_statuses():
    assert from_stream_error("INVALID_ARGUMENT: prompt too long").code == grpc.StatusCode.INVALID_ARGUMENT
    assert from_stream_error("UNAVAILABLE: no ready replica").code == grpc.StatusCode.UNAVAILABLE
    assert from_stream_error("something broke").code == grpc.StatusCode.INTERNAL


def test_kserve_tensors_round_trip():
    request = InferRequestBuilder("m").add_bytes("T", [b"a", b"", "é".encode()]).add_array(
        "N", np.array([[1.5, -2.0]], np.float32)).build()
    response = service_pb2.ModelInferResponse(raw_output_contents=request.raw_input_contents)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    arrays = output_arrays(response)
    assert list(arrays["T"]) == [b"a", b"", "é".encode()]
    np.testing.assert_array_equal(arrays["N"], np.array([[1.5, -2.0]], np.float32))


def test_raw_readers_read_the_scalars_a_relay_needs_as_numpy_would():
    request = InferRequestBuilder("m").add_bytes("text", ["日本 ".encode()]).add_bytes("empty", [b""]).add_array(
        "n32", np.array([-7], np.int32)).add_array("n64", np.array([2**40], np.int64)).build()
    response = service_pb2.ModelInferResponse(raw_output_contents=request.raw_input_contents)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    raw, arrays = raw_outputs(response), output_arrays(response)
    assert first_bytes(raw["text"][1]) == arrays["text"][0] == "日本 ".encode()
    assert first_bytes(raw["empty"][1]) == b"" and first_bytes(b"") == b""
    assert first_int(*raw["n32"]) == int(arrays["n32"][0]) == -7
    assert first_int(*raw["n64"]) == int(arrays["n64"][0]) == 2**40
