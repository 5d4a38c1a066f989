"""The KServe meter's pure parts: the usage asked for and hidden again, and a generation's worst case."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2

from inference_mesh.v1 import models_pb2
from services.common.kserve import InferRequestBuilder, output_arrays
from services.gateway.auth import Caller
from services.gateway.kserve_metering import MeteredCall, ask_for_usage, strip_outputs, worst_case


def _request(max_tokens: int | None, text: bytes = b"x" * 300) -> service_pb2.ModelInferRequest:
    builder = InferRequestBuilder("llm").add_bytes("messages", [text])
    if max_tokens is not None:
        builder.add_array("max_tokens", np.array([max_tokens], dtype=np.int32))
    return builder.build()


def test_a_caller_listing_outputs_gets_usage_asked_for_and_hidden():
    request = _request(8)
    request.outputs.add(name="text_output")
    added = ask_for_usage(request)
    assert added == {"prompt_tokens", "completion_tokens"}
    assert [o.name for o in request.outputs] == ["text_output", "prompt_tokens", "completion_tokens"]
    response = service_pb2.ModelInferResponse(id="r")
    for name, value in (("text_output", b"\x02\x00\x00\x00hi"), ("prompt_tokens", np.int32(30).tobytes()),
                        ("completion_tokens", np.int32(2).tobytes())):
        response.outputs.add(name=name, datatype="BYTES" if name == "text_output" else "INT32", shape=[1])
        response.raw_output_contents.append(value)
    call = MeteredCall(Caller("t", "bulk"), generation=True, strip=added)
    call.answered(response)
    assert call.used == 32
    assert [o.name for o in response.outputs] == ["text_output"]
    assert output_arrays(response)["text_output"].tolist() == [b"hi"]


def test_a_caller_listing_nothing_or_the_usage_is_left_alone():
    assert ask_for_usage(_request(8)) == frozenset()
    request = _request(8)
    for name in ("text_output", "prompt_tokens", "completion_tokens"):
        request.outputs.add(name=name)
    assert ask_for_usage(request) == frozenset()
    response = service_pb2.ModelInferResponse(outputs=[service_pb2.ModelInferResponse.InferOutputTensor(name="a")])
    strip_outputs(response, frozenset({"b"}))
    assert [o.name for o in response.outputs] == ["a"]


def test_the_worst_case_is_the_prompt_and_the_most_the_model_will_write():
    model = models_pb2.ModelInfo(name="llm", max_output_tokens=512)
    prompt = (4 + 300) // 3  # Triton's BYTES wire format: a length before each element
    assert worst_case(_request(64), model) == prompt + 32 + 64
    # Absent, zero, negative or over the model's bound: the model writes at most its own bound.
    for asked in (None, 0, -5, 99_999):
        assert worst_case(_request(asked), model) == prompt + 32 + 512


def test_a_failed_call_is_charged_nothing_unless_its_model_had_reported():
    embed = MeteredCall(Caller("t", "bulk"), unreported=40)
    embed.failed()
    assert embed.used == 0
    generation = MeteredCall(Caller("t", "bulk"), generation=True, used=57)
    generation.failed()
    assert generation.used == 57


async def test_a_kserve_id_reaches_the_router_only_if_it_is_a_plain_id():
    from services.gateway.kserve_metering import KServeMeter

    class Catalog:
        async def get(self, name):
            return models_pb2.ModelInfo(name=name, kind=models_pb2.MODEL_KIND_GENERATE, max_output_tokens=64)

    meter = KServeMeter(None, Catalog(), 60.0)
    for sent, plain in (("req-7", True), ("line\nbreak", False), ("é" * 3, False)):
        request = _request(8)
        request.id = sent
        headers = dict((await meter.open(Caller("t", "bulk"), request)).headers)
        assert (headers["x-request-id"] == sent) is plain and "\n" not in headers["x-request-id"]
