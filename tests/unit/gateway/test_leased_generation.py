"""The lease conversation, in-process: the router's PlacementService (its real attempt loop, fair queues and
breakers over scripted replicas) and the gateway's Leased streams talking through queues instead of a socket.
What it must keep from the relay it replaces: token-exact resume on another replica, the router's verdicts, the
slot given back, a stalled replica failed over, and the model's own refusals passed on as they are."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from inference_mesh.v1 import mesh_pb2, models_pb2, router_pb2
from services.common.errors import MeshError
from services.common.resilience import ResilienceSettings
from services.common.stream_progress import RESUME_INPUT
from services.gateway.auth import Caller
from services.gateway.generation import stream_generation
from services.gateway.leased_generation import Leased
from services.gateway.plan import plan_request
from services.router.balancer import Balancer
from services.router.inference_service import RoutingInferenceService
from services.router.placement_service import PlacementService
from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from services.router.settings import RouterSettings
from services.router.state import RouterState
from tests.unit.fakes import FakeContext, ScriptedCall, ScriptedStreams, rpc_error, token

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
REGISTRY = {
    "pools": {"cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"},
                                                       {"name": "c1", "grpc": "127.0.0.1:3"}]}},
    "models": {"llm": {"kind": "generate", "triton_model": "llm_t", "version": "1", "pools": ["cpu"]}},
}
REQUEST = mesh_pb2.GenerateRequest(model="llm", max_tokens=8, temperature=0.0,
                                   messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content="hi")])


class InProcessLease:
    """One Lease call: PlacementService.Lease running as a task, fed and read through queues."""

    def __init__(self, service: PlacementService, tenant: str) -> None:
        self._reports: asyncio.Queue = asyncio.Queue()
        self._grants: asyncio.Queue = asyncio.Queue()
        self.reports: list[router_pb2.LeaseReport] = []
        self.dies_before_settling = False
        self.ends_on_failure = ""

        async def requests():
            while (report := await self._reports.get()) is not None:
                yield report

        async def serve() -> None:
            try:
                async for granted in service.Lease(requests(), FakeContext(tenant)):
                    await self._grants.put(granted)
            except MeshError as exc:
                await self._grants.put(exc)
            await self._grants.put(grpc.aio.EOF)

        self.task = asyncio.create_task(serve())

    async def write(self, report: router_pb2.LeaseReport) -> None:
        self.reports.append(report)
        if self.dies_before_settling and report.WhichOneof("report") == "outcome" and not report.outcome.code:
            self.task.cancel()
            raise rpc_error(UNAVAILABLE, "the router went away")
        if self.ends_on_failure and report.WhichOneof("report") == "outcome" and report.outcome.code:
            self.task.cancel()  # the lease's deadline passed on the router's side first: it ends without a verdict
            if self.ends_on_failure == "finished":  # grpc.aio's answer to a write on a call already over
                raise asyncio.InvalidStateError("RPC already finished.")
            await self._grants.put(grpc.aio.EOF)
            return
        await self._reports.put(report)

    async def done_writing(self) -> None:
        await self._reports.put(None)

    async def read(self):
        item = await self._grants.get()
        if isinstance(item, MeshError):
            raise item
        return item

    def cancel(self) -> bool:
        return self.task.cancel()

    async def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.CANCELLED


class InProcessLeases:
    def __init__(self, service: PlacementService) -> None:
        self._service = service
        self.calls: list[InProcessLease] = []

    def Lease(self, timeout=None, metadata=None) -> InProcessLease:
        self.calls.append(InProcessLease(self._service, dict(metadata or ()).get("x-mesh-tenant", "")))
        return self.calls[-1]


class ReplicaStubs:
    """The gateway's EngineChannels: each granted replica's (scripted) stub."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas

    def stub(self, granted: router_pb2.LeaseGrant):
        return self._replicas.get(granted.replica).stub


class SilentAfterFirst:
    """A replica stream that sends one token and then nothing; cancelling it ends the pending read as grpc.aio
    does (asyncio.CancelledError in the reader)."""

    def __init__(self) -> None:
        self._sent = False
        self._waiting: asyncio.Future | None = None
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self._sent:
            self._sent = True
            return token("Hel", 1, 11)
        self._waiting = asyncio.get_running_loop().create_future()
        return await self._waiting

    def cancel(self) -> bool:
        self.cancelled = True
        if self._waiting is not None:
            self._waiting.cancel()
        return True


def _mesh(streams: ScriptedStreams, ready: set[str], stall_s: float = 30.0):
    registry = Registry.model_validate(REGISTRY)
    replicas = ReplicaSet(registry)
    for replica in replicas.replicas:
        replica.ready_models = {"llm_t"} if replica.name in ready else set()
        replica.stub = streams.for_replica(replica.name)
    settings = RouterSettings(resilience=ResilienceSettings(retry_base_backoff_s=0.001, retry_max_backoff_s=0.002))
    routing = RoutingInferenceService(RouterState(None, registry, replicas), Balancer(replicas), settings,
                                      settings.resilience.retrier("replicas"))
    leases = InProcessLeases(PlacementService(routing, stall_s))
    return Leased(leases, ReplicaStubs(replicas)), leases, replicas


def _plan():
    return plan_request(Caller(tenant="tenant-1", tier="free"), models_pb2.ModelInfo(name="llm", version="1"),
                        "req-1", 30.0)


async def _generate(leased: Leased) -> list[mesh_pb2.GenerateChunk]:
    return [chunk async for chunk in stream_generation(leased, REQUEST, _plan())]


async def test_a_stream_that_loses_its_replica_resumes_on_another_through_a_second_grant():
    died = ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12)], fails_with=rpc_error(UNAVAILABLE, "gone"))
    rest = ScriptedCall([token(" you", 3, 13), token("", 3, finish="stop")])
    streams = ScriptedStreams([died, rest])
    leased, leases, replicas = _mesh(streams, {"c0", "c1"})
    chunks = await _generate(leased)
    assert "".join(c.text for c in chunks) == "Hello you"
    assert streams.replicas[0] != streams.replicas[1], "the resumed part runs elsewhere"
    resumed = streams.made[1].request
    tensor = next(i for i, t in enumerate(resumed.inputs) if t.name == RESUME_INPUT)
    assert resumed.raw_input_contents[tensor] == bytes([11, 0, 0, 0, 12, 0, 0, 0])
    assert resumed.model_name == "llm_t", "the grant's Triton model, not the public name"
    last = chunks[-1]
    assert last.metadata.resumed == 1 and last.metadata.retries == 1
    assert last.metadata.replica == streams.replicas[1] and last.metadata.pool == "cpu"
    assert last.usage.completion_tokens == 3
    outcomes = [r.outcome for r in leases.calls[0].reports if r.WhichOneof("report") == "outcome"]
    assert [(o.code, o.responses, o.tokens) for o in outcomes] == [(UNAVAILABLE.value[0], 2, 2), (0, 4, 3)]
    await leases.calls[0].task
    assert all(r.in_flight == 0 for r in replicas.replicas), "every slot given back"
    assert replicas.get(streams.replicas[0]).breaker._cb.fail_counter == 1
    await replicas.close()


async def test_the_routers_refusal_ends_the_stream_with_its_status_and_reason():
    leased, _leases, replicas = _mesh(ScriptedStreams([]), set())
    with pytest.raises(MeshError) as caught:
        await _generate(leased)
    assert caught.value.code == UNAVAILABLE and "no ready replica" in caught.value.message
    await replicas.close()


async def test_a_model_that_refuses_the_request_is_no_fault_of_the_replica():
    refused = ScriptedCall([])
    refused.items.append(token("", 0))
    refused.items[0].error_message = "INVALID_ARGUMENT: the prompt is longer than the model takes"
    leased, leases, replicas = _mesh(ScriptedStreams([refused]), {"c0"})
    with pytest.raises(MeshError) as caught:
        await _generate(leased)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    await leases.calls[0].task
    assert replicas.get("c0").breaker._cb.fail_counter == 0
    assert replicas.get("c0").in_flight == 0
    await replicas.close()


async def test_a_replica_silent_past_the_stall_time_is_failed_over():
    silent = SilentAfterFirst()
    rest = ScriptedCall([token("lo", 2, 12), token("", 2, finish="stop")])
    streams = ScriptedStreams([])
    calls = iter([silent, rest])

    def next_call(requests, replica: str = ""):
        call = next(calls)
        streams.made.append(call)
        streams.replicas.append(replica)
        call.request = next(iter(requests))
        return call
    streams.next_call = next_call
    leased, leases, replicas = _mesh(streams, {"c0", "c1"}, stall_s=0.2)
    chunks = await asyncio.wait_for(_generate(leased), 5)
    assert silent.cancelled and "".join(c.text for c in chunks) == "Hello"
    assert chunks[-1].metadata.resumed == 1
    first = next(r.outcome for r in leases.calls[0].reports if r.WhichOneof("report") == "outcome")
    assert first.code == UNAVAILABLE.value[0] and "no response for" in first.detail
    await replicas.close()


async def test_a_slow_reader_is_not_a_stalled_replica():
    """Time spent handing a response to our own caller is not the replica's silence."""
    streams = ScriptedStreams([ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12), token("", 2, finish="stop")])])
    leased, _leases, replicas = _mesh(streams, {"c0"}, stall_s=0.1)
    chunks = []
    async for chunk in stream_generation(leased, REQUEST, _plan()):
        chunks.append(chunk)
        await asyncio.sleep(0.3)
    assert "".join(c.text for c in chunks) == "Hello" and chunks[-1].metadata.resumed == 0
    assert len(streams.made) == 1
    await replicas.close()


async def test_a_caller_that_goes_away_gives_the_slot_back():
    streams = ScriptedStreams([ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12), token("", 2, finish="stop")])])
    leased, leases, replicas = _mesh(streams, {"c0"})
    generation = stream_generation(leased, REQUEST, _plan())
    assert (await anext(generation)).text == "Hel"
    await generation.aclose()
    await asyncio.gather(leases.calls[0].task, return_exceptions=True)
    assert replicas.get("c0").in_flight == 0 and streams.made[0].cancelled
    assert replicas.get("c0").breaker._cb.fail_counter == 0, "no verdict on the replica"
    await replicas.close()


async def test_an_answer_streamed_whole_is_delivered_though_the_router_died_before_settling():
    streams = ScriptedStreams([ScriptedCall([token("Hel", 1, 11), token("lo", 2, 12), token("", 2, finish="stop")])])
    leased, leases, replicas = _mesh(streams, {"c0"})
    generation = stream_generation(leased, REQUEST, _plan())
    chunks = [await anext(generation)]
    leases.calls[0].dies_before_settling = True
    chunks += [chunk async for chunk in generation]
    assert "".join(c.text for c in chunks) == "Hello" and chunks[-1].finish_reason == mesh_pb2.FINISH_REASON_STOP
    await replicas.close()


@pytest.mark.parametrize("lease_ends_first", ["", "eof", "finished"])
async def test_an_attempt_past_its_deadline_is_deadline_exceeded_whoever_ends_first(lease_ends_first):
    """The engine call and the lease share the request's deadline: whether the router's verdict or the lease's
    end arrives first, the caller hears the attempt's DEADLINE_EXCEEDED (once: INTERNAL)."""
    late = ScriptedCall([token("Hel", 1, 11)], fails_with=rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline"))
    leased, leases, replicas = _mesh(ScriptedStreams([late]), {"c0"})
    generation = stream_generation(leased, REQUEST, _plan())
    assert (await anext(generation)).text == "Hel"
    leases.calls[0].ends_on_failure = lease_ends_first
    with pytest.raises(MeshError) as caught:
        await anext(generation)
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and "replica c0" in caught.value.message
    await asyncio.gather(leases.calls[0].task, return_exceptions=True)
    assert replicas.get("c0").in_flight == 0
    await replicas.close()


async def test_a_lease_closed_without_its_report_ends_quietly_and_frees_the_slot():
    """A caller that half-closes after its grant (or whose deadline passed) is gone: no INTERNAL, no verdict."""
    _, leases, replicas = _mesh(ScriptedStreams([]), {"c0"})
    lease = leases.Lease(metadata=(("x-mesh-tenant", "tenant-1"),))
    await lease.write(router_pb2.LeaseReport(ask=router_pb2.LeaseAsk(model="llm")))
    granted = await lease.read()
    assert granted.replica == "c0" and replicas.get("c0").in_flight == 1
    await lease.done_writing()
    assert await asyncio.wait_for(lease.read(), 5) is grpc.aio.EOF, "ended, not failed"
    await lease.task
    assert replicas.get("c0").in_flight == 0 and replicas.get("c0").breaker._cb.fail_counter == 0
    await replicas.close()
