"""Merging ready responses of one generation: the merged stream reads the same as the one it replaces."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2

from services.common.kserve import first_bytes, first_int, is_final_response, raw_outputs
from services.common.stream_progress import StreamProgress
from services.router.coalescing import coalesced
from tests.unit.fakes import add_output, token


def _with_extra(item: service_pb2.ModelStreamInferResponse) -> service_pb2.ModelStreamInferResponse:
    """A response with an output the generation contract does not have (a log-probability, say)."""
    add_output(item.infer_response, "logprob", "FP32", np.array([0.5], "<f4").tobytes(), [1])
    return item


def _stream(words: list[str]) -> list[service_pb2.ModelStreamInferResponse]:
    """One response per token, the last one final and empty, as the BLS model sends them."""
    tokens = [token(word, i + 1, 100 + i, prompt_tokens=7) for i, word in enumerate(words)]
    return [*tokens, token("", len(words), finish="stop", prompt_tokens=7)]


def _read(responses: list[service_pb2.ModelStreamInferResponse]) -> tuple[str, list[int], int, int, str]:
    """What a caller reads from a stream: text, token ids, the last counts and finish reason."""
    progress = StreamProgress()
    text = ""
    for item in responses:
        outputs = raw_outputs(item.infer_response)
        text += first_bytes(outputs["text_output"][1]).decode()
        progress.delivered(item.infer_response, is_final_response(item.infer_response))
    last = raw_outputs(responses[-1].infer_response)
    return (text, progress.tokens, first_int(*last["prompt_tokens"]), first_int(*last["completion_tokens"]),
            first_bytes(last["finish_reason"][1]).decode())


WORDS = ["The", " mesh", " passes", " 日本", "語", " on", "."]


def test_a_run_of_one_generation_becomes_one_message_that_reads_the_same():
    plain = _stream(WORDS)
    merged = coalesced([(0, r) for r in _stream(WORDS)])
    assert len(merged) == 1
    assert _read(merged) == _read(plain) == ("The mesh passes 日本語 on.", list(range(100, 107)), 7, 7, "stop")
    assert is_final_response(merged[0].infer_response)
    token_ids = next(o for o in merged[0].infer_response.outputs if o.name == "token_id")
    assert list(token_ids.shape) == [7]


def test_merging_in_any_split_reads_the_same_as_token_by_token():
    plain = _stream(WORDS)
    expected = _read(plain)
    for cut in range(1, len(plain)):
        responses = _stream(WORDS)
        merged = coalesced([(0, r) for r in responses[:cut]]) + coalesced([(0, r) for r in responses[cut:]])
        assert len(merged) == 2
        assert _read(merged) == expected


def test_a_final_response_ends_a_run_and_requests_never_mix():
    first, second = _stream(["a", "b"]), _stream(["x", "y"])
    ready = [(0, first[0]), (0, first[1]), (1, second[0]), (0, first[2]), (1, second[1]), (1, second[2])]
    merged = coalesced(ready)
    # a+b | x | final of 0 | y+final of 1
    assert [first_bytes(raw_outputs(r.infer_response)["text_output"][1]) for r in merged] == [b"ab", b"x", b"", b"y"]
    assert _read([merged[0], merged[2]])[:2] == ("ab", [100, 101])
    assert _read([merged[1], merged[3]])[:2] == ("xy", [100, 101])
    after_final = coalesced([(0, _stream(["a"])[1]), (0, _stream(["b"])[0])])
    assert len(after_final) == 2


def test_errors_and_outputs_outside_the_contract_are_never_merged():
    error = service_pb2.ModelStreamInferResponse(error_message="INTERNAL: engine failed")
    assert len(coalesced([(0, _stream(["a"])[0]), (0, error)])) == 2
    odd = [_with_extra(token("a", 1, 1)), _with_extra(token("b", 2, 2))]
    assert len(coalesced([(0, r) for r in odd])) == 2


def test_one_ready_response_passes_unchanged():
    response = _stream(["a"])[0]
    assert coalesced([(0, response)]) == [response]
