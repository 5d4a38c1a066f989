"""The TensorRT-LLM pools' model repository, loaded by the real tritonserver without a GPU: the public BLS model
(`smollm2-trtllm`) over the `tensorrt_llm` stand-in (tools/fill_trtllm.py --standin), whose config is the engine's
own with a python backend, so Triton applies the engine's batch dimensions and decoupled rules to every request
the BLS model sends. Through gateway and router, against the CPU model (smollm2) serving the same weights."""

from __future__ import annotations

import asyncio
import json
import time

import grpc
import numpy as np
import pytest
import yaml
from tritonclient.grpc import service_pb2_grpc

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from services.common.kserve import InferRequestBuilder, output_arrays
from tests.conftest import AUTH, LLM, chat, generate
from tools.fill_trtllm import STANDIN, TrtllmPools, write
from tools.stack import LocalStack, StackPorts
from tools.triton import MODEL_REPOSITORY, REGISTRY_FILE

TRT = TrtllmPools.load().model.triton_name  # its public name too, here
TEXTS_WITHOUT_REPLACEMENTS = "Write these exactly: 日本語, 🙂, café, naïve, Ωmega."


@pytest.fixture(scope="module")
def trt_stack(tmp_path_factory, tenants_file):
    root = tmp_path_factory.mktemp("trtllm-path")
    write(root / "repository", standin=True)
    repository = root / "repository" / STANDIN
    (repository / "smollm2").symlink_to(MODEL_REPOSITORY / "smollm2")
    registry = yaml.safe_load(REGISTRY_FILE.read_text())
    cpu = registry["models"][LLM]
    # No router bound on the engine's placement: what sheds overload here is the engine's own bounded queue (the
    # router's fair queues in front of it are tested in test_fair_sharing.py).
    registry["models"] = {LLM: cpu, TRT: {**cpu, "triton_model": TRT, "max_output_tokens": 512, "pools": ["cpu"],
                                         "context_tokens": TrtllmPools.load().standin.max_seq_len}}
    registry["groups"] = {}
    (root / "registry.yaml").write_text(yaml.safe_dump(registry))
    mesh = LocalStack(root / "run", StackPorts.free(2, gateways=1), tenants_file=tenants_file,
                      registry_file=root / "registry.yaml", model_repository=repository,
                      with_edge=False, with_cache=False, with_retrieval=False)
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def stub(trt_stack):
    with grpc.insecure_channel(trt_stack.gateway_address) as channel:
        yield mesh_pb2_grpc.InferenceMeshStub(channel)


def both(stub, content: str, **kwargs) -> tuple[tuple[str, mesh_pb2.GenerateChunk], tuple[str, mesh_pb2.GenerateChunk]]:
    """The same request on the CPU model and on the TensorRT-LLM path: (text, last chunk) each."""
    cpu_text, cpu = generate(stub, chat(content, model=LLM, **kwargs))
    trt_text, trt = generate(stub, chat(content, model=TRT, **kwargs))
    return (cpu_text, cpu[-1]), (trt_text, trt[-1])


def test_greedy_text_and_token_counts_match_the_cpu_model(stub):
    (cpu_text, cpu), (trt_text, trt) = both(stub, "Name three colors of the rainbow.", max_tokens=10, temperature=0.0)
    assert trt_text == cpu_text and trt_text.strip()
    assert trt.usage == cpu.usage and trt.usage.completion_tokens == 10
    assert trt.finish_reason == mesh_pb2.FINISH_REASON_LENGTH and trt.metadata.model == TRT


def test_an_answer_that_ends_reports_stop_and_counts_every_token(stub):
    (cpu_text, cpu), (trt_text, trt) = both(stub, "Say hello.", max_tokens=300, temperature=0.0)
    assert cpu.finish_reason == mesh_pb2.FINISH_REASON_STOP and cpu.usage.completion_tokens < 300
    assert (trt_text, trt.finish_reason, trt.usage) == (cpu_text, cpu.finish_reason, cpu.usage)


def test_stop_strings_cut_the_text_and_stop_the_engine(stub):
    full, _ = generate(stub, chat("Count from one to twenty in words.", model=TRT, max_tokens=60, temperature=0.0))
    words = full.split()
    assert len(words) > 6, full
    stop = words[4]
    (cpu_text, cpu), (trt_text, trt) = both(stub, "Count from one to twenty in words.", max_tokens=60,
                                           temperature=0.0, stop=[stop])
    assert trt_text == full[:full.index(stop)] == cpu_text
    assert trt.finish_reason == mesh_pb2.FINISH_REASON_STOP and trt.usage == cpu.usage
    assert trt.usage.completion_tokens < 60


def test_multibyte_characters_are_never_split(stub):
    (cpu_text, _), (trt_text, _) = both(stub, TEXTS_WITHOUT_REPLACEMENTS, max_tokens=48, temperature=0.0)
    # Cut at max_tokens inside a character: the half character is dropped on both paths, never sent as U+FFFD.
    assert "\ufffd" not in trt_text and "\ufffd" not in cpu_text and trt_text == cpu_text
    assert any(ord(c) > 127 for c in trt_text), trt_text


def test_seeded_sampling_is_repeatable_and_bounded(stub):
    request = chat("Invent a name for a cat.", model=TRT, max_tokens=16, temperature=0.9, seed=7)
    first, chunks = generate(stub, request)
    again, _ = generate(stub, request)
    assert first == again and chunks[-1].usage.completion_tokens <= 16


def test_a_prompt_longer_than_the_engine_takes_is_invalid_argument(stub):
    too_long = " ".join(["lighthouse"] * 2500)
    with pytest.raises(grpc.RpcError) as refused:
        generate(stub, chat(too_long, model=TRT, max_tokens=8))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "the engine takes 1536" in refused.value.details()


def test_a_cancelled_stream_stops_the_engine(stub, trt_stack):
    # The stand-in serves one request at a time per replica: had the cancelled generation run on to its 400
    # tokens (~6 s here), the requests after it would wait for it.
    calls = [stub.Generate(chat("Tell a very long story about the sea.", model=TRT, max_tokens=400,
                                temperature=0.0), metadata=AUTH, timeout=120) for _ in range(2)]
    for call in calls:
        for _, _chunk in zip(range(3), call, strict=False):
            pass
        call.cancel()
    started = time.monotonic()
    _, chunks = generate(stub, chat("Say hi.", model=TRT, max_tokens=4, temperature=0.0))
    assert chunks[-1].usage.completion_tokens == 4 and time.monotonic() - started < 4.0



def test_an_engine_queue_past_its_bound_sheds_with_resource_exhausted(trt_stack):
    bound = TrtllmPools.load().standin.max_queue_size  # per replica, beside the one request being served

    async def run() -> list[tuple[str, float]]:
        async with grpc.aio.insecure_channel(trt_stack.gateway_address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)

            async def one(i: int) -> tuple[str, float]:
                started = time.monotonic()
                try:
                    async for _ in mesh.Generate(chat(f"Story {i}: a long voyage.", model=TRT, max_tokens=40,
                                                      temperature=0.0), metadata=AUTH, timeout=120):
                        pass
                except grpc.aio.AioRpcError as exc:
                    return f"{exc.code().name}: {exc.details()}", time.monotonic() - started
                return "OK", time.monotonic() - started

            return await asyncio.gather(*(one(i) for i in range(4 * (bound + 1))))

    outcomes = asyncio.run(run())
    refused = [(what, seconds) for what, seconds in outcomes if what != "OK"]
    assert sum(what == "OK" for what, _ in outcomes) >= 2 * (bound + 1), outcomes
    assert refused and all(what.startswith("RESOURCE_EXHAUSTED") and "queue" in what for what, _ in refused), refused
    assert all(seconds < 5.0 for _, seconds in refused), "overload is refused at once, not after a wait"

def test_a_stream_resumes_on_the_other_replica_when_its_replica_dies(trt_stack):
    # The stand-in serves one stream at a time per replica: once two streams are under way at once (one on each
    # replica) and one of them has 8 tokens, the replica killed is in the middle of a stream. (Killing at the first
    # stream's 8th token alone failed once under load: the other replica had not sent its first token yet, so its
    # stream was retried from scratch, not resumed.)
    streams, max_tokens = 4, 48

    async def run(kill: bool) -> list[tuple[str, mesh_pb2.GenerateChunk | str]]:
        async with grpc.aio.insecure_channel(trt_stack.gateway_address) as channel:
            mesh = mesh_pb2_grpc.InferenceMeshStub(channel)
            killed = False
            under_way: dict[int, int] = {}   # stream -> tokens so far, while it streams

            async def one(i: int):
                nonlocal killed
                text = []
                last = None
                try:
                    request = chat(f"Story {i}: tell me about a lighthouse keeper and a storm.", model=TRT,
                                   max_tokens=max_tokens, temperature=0.0)
                    async for chunk in mesh.Generate(request, metadata=AUTH, timeout=120):
                        text.append(chunk.text)
                        last = chunk
                        under_way[i] = len(text)
                        if kill and not killed and len(under_way) >= 2 and max(under_way.values()) >= 8:
                            killed = True
                            trt_stack.processes["triton-1"].kill()
                    under_way.pop(i, None)
                except grpc.aio.AioRpcError as exc:
                    return "".join(text), f"{exc.code().name}: {exc.details()}"
                return "".join(text), last

            return await asyncio.gather(*(one(i) for i in range(streams)))

    got = asyncio.run(run(kill=True))
    failures = [last for _, last in got if isinstance(last, str)]
    assert not failures, failures
    assert all(last.usage.completion_tokens == max_tokens or last.finish_reason == mesh_pb2.FINISH_REASON_STOP
               for _, last in got)
    resumed = [last for _, last in got if last.metadata.resumed]
    seen = [(last.metadata.replica, last.metadata.retries, last.metadata.resumed, last.usage.completion_tokens)
            for _, last in got]
    assert resumed and all(last.metadata.replica == "triton-cpu-0" for last in resumed), seen
    assert all("\ufffd" not in text for text, _ in got)



def _stream_once(client, inputs: list) -> tuple[list, list]:
    """One decoupled request to Triton: its responses and its errors."""
    import queue

    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    client.async_stream_infer(TRT, inputs, enable_empty_final_response=True)
    results, errors = [], []
    while True:
        result, error = answers.get(timeout=120)
        if error is not None:
            errors.append(error)
            break
        results.append(result)
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    client.stop_stream()
    return results, errors


def test_prompt_and_resumed_tokens_past_max_input_len_are_invalid_argument(trt_stack):
    """The engine reads prompt + resumed tokens as one context: past max_input_len the BLS model refuses the
    request itself (the engine would fail it as INTERNAL)."""
    import numpy as np
    import tritonclient.grpc as triton

    limit = TrtllmPools.load().standin.max_input_len

    def inputs(words: int, resume: list[int], max_tokens: int) -> list:
        tensors = []
        for name, value, dtype in (("messages", np.array([f'[{{"role": "user", "content": "{"lighthouse " * words}"}}]'
                                                          .encode()], dtype=np.object_), "BYTES"),
                                   ("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"),
                                   ("temperature", np.array([0.0], dtype=np.float32), "FP32"),
                                   ("resume_tokens", np.array(resume or [0], dtype=np.int32), "INT32")):
            if name == "resume_tokens" and not resume:
                continue
            tensor = triton.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        return tensors

    client = triton.InferenceServerClient(f"127.0.0.1:{trt_stack.ports.tritons[0].grpc}")
    results, errors = _stream_once(client, inputs(300, [], 1))
    assert not errors, errors
    per_word = int(results[-1].as_numpy("prompt_tokens")[0]) / 300
    words = int((limit - 200) / per_word)
    results, errors = _stream_once(client, inputs(words, [], 1))
    prompt = int(results[-1].as_numpy("prompt_tokens")[0])
    assert limit - 400 < prompt <= limit, prompt
    resume = [28] * (limit - prompt + 1)  # one token past the engine's context
    _, errors = _stream_once(client, inputs(words, resume, len(resume) + 8))
    assert errors and "INVALID_ARGUMENT" in str(errors[0]), errors
    assert f"{len(resume)} resumed; the engine takes {limit} in all" in str(errors[0])
    client.close()


def _router_stream(trt_stack, model: str, pause_s: float, options=()) -> list:
    """A greedy generation straight from the router, read with `pause_s` after each response."""
    request = InferRequestBuilder(model).add_bytes("messages", [json.dumps(
        [{"role": "user", "content": "Describe a lighthouse at night in detail."}]).encode()]).add_array(
        "max_tokens", np.array([40], np.int32)).add_array("temperature", np.array([0.0], np.float32)).build()
    with grpc.insecure_channel(trt_stack.router_address, options=list(options)) as channel:
        responses = []
        for item in service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter([request]), timeout=120):
            assert not item.error_message, item.error_message
            responses.append(item.infer_response)
            time.sleep(pause_s)
    return responses


def _as_read(responses: list) -> tuple[str, list[int], int, int, str]:
    text, tokens = b"", []
    for response in responses:
        outputs = output_arrays(response)
        text += outputs["text_output"].reshape(-1)[0]
        tokens += outputs["token_id"].reshape(-1).tolist()
    last = output_arrays(responses[-1])
    return (text.decode(), tokens, int(last["prompt_tokens"][0]), int(last["completion_tokens"][0]),
            last["finish_reason"].reshape(-1)[0].decode())


def test_a_stream_read_slowly_arrives_coalesced_with_the_same_text_and_tokens(trt_stack):
    """The router forwards what is ready as one message: a caller that reads slowly through a small flow-control
    window makes the router's writer fall behind the replica, and the tokens that queue meanwhile arrive merged.
    The text, token ids, counts and finish reason read exactly as from a caller that keeps up."""
    prompt = _router_stream(trt_stack, LLM, 0.0)
    # BDP probing off and a small window: the router's writes wait for the reader, as behind a slow client.
    slow = _router_stream(trt_stack, LLM, 0.4, [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 256)])
    assert _as_read(slow) == _as_read(prompt)
    assert _as_read(prompt)[3] == 40
    assert len(slow) < len(prompt) / 2, (len(slow), len(prompt))
