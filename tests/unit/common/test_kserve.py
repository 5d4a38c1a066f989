"""KServe tensors and stream errors (services/common/kserve.py, errors.py)."""

from __future__ import annotations

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.common.errors import from_stream_error
from services.common.kserve import InferRequestBuilder, output_arrays


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
