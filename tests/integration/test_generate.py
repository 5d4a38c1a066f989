"""Streaming generation through gateway → router → Triton (llama.cpp)."""

from __future__ import annotations

import threading
import time

import grpc

from inference_mesh.v1 import mesh_pb2
from tests.conftest import AUTH, LLM, chat, fresh_long_prompt, generate, triton_metric, wait_for_prompt_evaluation


def test_stream_returns_text_usage_and_metadata(mesh, stack):
    text, chunks = generate(mesh, chat("Write one sentence about the sea.", max_tokens=24, temperature=0.0))
    assert len(chunks) >= 2, "a stream, not a single reply"
    last = chunks[-1]
    assert last.finish_reason in (mesh_pb2.FINISH_REASON_STOP, mesh_pb2.FINISH_REASON_LENGTH)
    assert all(c.finish_reason == mesh_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
    words = text.split()
    assert len(words) >= 4 and sum(w.isalpha() for w in words) >= 3, text
    usage = last.usage
    assert usage.prompt_tokens > 10  # the chat template and system prompt are part of the prompt
    assert 1 <= usage.completion_tokens <= 24
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    indices = [c.token_index for c in chunks]
    assert indices == sorted(indices) and indices[-1] == usage.completion_tokens - 1
    meta = last.metadata
    assert (meta.model, meta.model_version, meta.pool, meta.replica, meta.tenant) == \
        (LLM, "1", "cpu", "triton-cpu-0", "tenant-a")
    assert meta.request_id


def test_max_tokens_is_honoured(mesh):
    _, chunks = generate(mesh, chat("Count from one to one hundred in words.", max_tokens=7, temperature=0.0))
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].finish_reason == mesh_pb2.FINISH_REASON_LENGTH


def test_greedy_and_seeded_sampling_repeat(mesh):
    # The cache is bypassed: the model itself must repeat, not a stored answer.
    bypass = mesh_pb2.CACHE_MODE_BYPASS
    greedy = chat("Name a fruit and say why it is good.", max_tokens=20, temperature=0.0, cache_mode=bypass)
    assert generate(mesh, greedy)[0] == generate(mesh, greedy)[0]
    seeded = chat("Invent a name for a cat.", max_tokens=20, temperature=1.0, seed=1234, cache_mode=bypass)
    first = generate(mesh, seeded)[0]
    assert first == generate(mesh, seeded)[0]
    others = {generate(mesh, chat("Invent a name for a cat.", max_tokens=20, temperature=1.0, seed=s,
                                  cache_mode=bypass))[0] for s in (1, 2, 3)}
    assert len(others | {first}) > 1, "different seeds must be able to give different text"


def test_greedy_text_does_not_depend_on_what_the_replica_served_before(mesh):
    # A system prompt over two reuse chunks (prefill.py), then other prompts in between: the repeat starts from
    # a reused or restored prefix where the first did not, and must still give the same text.
    system = " ".join(["You answer questions for a shop that sells fruit, vegetables and bread."] * 10)
    bypass = mesh_pb2.CACHE_MODE_BYPASS

    def ask(question: str, with_system: bool = True) -> str:
        request = chat(question, max_tokens=16, temperature=0.0, cache_mode=bypass)
        if with_system:
            request.messages.insert(0, mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_SYSTEM, content=system))
        text, chunks = generate(mesh, request)
        assert not with_system or chunks[-1].usage.prompt_tokens > 128
        return text

    first = ask("Which fruit is best in winter?")
    ask("Which bread keeps longest?")
    ask("Which fruit is best in winter?", with_system=False)
    assert ask("Which fruit is best in winter?") == first


def test_stop_sequence_cuts_the_text(mesh):
    request = chat("Tell a short story about a lighthouse keeper.", max_tokens=40, temperature=0.0,
                   cache_mode=mesh_pb2.CACHE_MODE_BYPASS)
    full, full_chunks = generate(mesh, request)
    words = full.split()
    assert len(words) >= 6, full
    # Stop on a piece of the model's own answer: the test holds for whatever the model writes, and greedy
    # decoding repeats it exactly, so the cut text is known.
    stop = " " + words[3]
    request.stop.append(stop)
    cut, chunks = generate(mesh, request)
    assert cut == full[: full.index(stop)]
    assert chunks[-1].finish_reason == mesh_pb2.FINISH_REASON_STOP
    assert chunks[-1].usage.completion_tokens < full_chunks[-1].usage.completion_tokens


def test_cancelling_the_stream_stops_work_in_triton(mesh, stack):
    tokens_before = triton_metric(stack, "mesh_llm_generated_tokens_total")
    cancelled_before = triton_metric(stack, "mesh_llm_cancelled_requests_total")
    call = mesh.Generate(chat("Tell a very long story about a dragon.", max_tokens=1000, temperature=0.0),
                         metadata=AUTH, timeout=120)
    for received, _ in enumerate(call, start=1):
        if received == 5:
            call.cancel()
            break
    # Triton notices the cancellation at the next token; give the counters a moment to settle.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if triton_metric(stack, "mesh_llm_cancelled_requests_total") > cancelled_before:
            break
        time.sleep(0.2)
    assert triton_metric(stack, "mesh_llm_cancelled_requests_total") == cancelled_before + 1
    produced = triton_metric(stack, "mesh_llm_generated_tokens_total") - tokens_before
    time.sleep(1.0)
    assert triton_metric(stack, "mesh_llm_generated_tokens_total") - tokens_before == produced, "work went on"
    assert produced < 200, f"{produced} tokens were generated for a stream cancelled after 5 chunks"


def test_a_cancel_during_a_long_prompt_frees_the_replica_within_its_evaluation(mesh, stack):
    """llama.cpp evaluates a ~1500-token prompt in seconds here; a cancel (a caller gone, a batch line preempted
    for interactive work) stops it inside that evaluation (abortable_eval.py), so a request behind it on the same
    one-at-a-time replica starts at once instead of after the whole prompt, and answers as it did before."""
    bypass = mesh_pb2.CACHE_MODE_BYPASS
    short = chat("Name a colour.", max_tokens=4, temperature=0.0, cache_mode=bypass)
    expected = generate(mesh, short)[0]
    cancelled_before = triton_metric(stack, "mesh_llm_cancelled_requests_total")
    long_prompt = chat(fresh_long_prompt(), max_tokens=1, temperature=0.0, cache_mode=bypass)
    call = mesh.Generate(long_prompt, metadata=AUTH, timeout=120)
    wait_for_prompt_evaluation(stack)
    time.sleep(0.3)  # part of the way in, past its first chunk
    call.cancel()
    cancelled_at = time.monotonic()
    assert generate(mesh, short)[0] == expected
    waited = time.monotonic() - cancelled_at
    assert waited < 3.0, f"the next request waited {waited:.1f} s: the cancelled prompt was evaluated to its end"
    # The model counted it as cancelled: it was in Triton, not stopped on its way there.
    deadline = time.monotonic() + 10
    while triton_metric(stack, "mesh_llm_cancelled_requests_total") == cancelled_before \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert triton_metric(stack, "mesh_llm_cancelled_requests_total") == cancelled_before + 1


def test_caller_deadline_wins(mesh):
    started = time.monotonic()
    try:
        list(mesh.Generate(chat("Write a long essay about rivers.", max_tokens=1000), metadata=AUTH, timeout=1.0))
        raise AssertionError("a 1000-token generation cannot finish in 1 s on this machine")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 3.0


def test_concurrent_streams_all_complete(mesh):
    results: list[str] = []
    errors: list[Exception] = []

    def one(i: int) -> None:
        try:
            text, chunks = generate(mesh, chat(f"Say hello to person number {i}.", max_tokens=8, temperature=0.0))
            results.append(text)
            assert chunks[-1].usage.completion_tokens >= 1
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6

