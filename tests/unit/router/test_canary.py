"""Canary versions (services/router/canary.py)."""

from __future__ import annotations

from tritonclient.grpc import service_pb2

from services.router.canary import choose_version


def test_canary_weights_are_sticky_and_proportional():
    weights = {"1": 80, "2": 20}
    picks = [choose_version("m", weights, f"session-{i}") for i in range(10_000)]
    share = picks.count("2") / len(picks)
    assert abs(share - 0.20) < 4 * (0.2 * 0.8 / len(picks)) ** 0.5, share
    assert {choose_version("m", weights, "tenant-x") for _ in range(50)} == {choose_version("m", weights, "tenant-x")}
    moved = sum(choose_version("m", weights, f"session-{i}") != choose_version("m", {"1": 70, "2": 30},
                                                                               f"session-{i}") for i in range(10_000))
    assert 0.07 < moved / 10_000 < 0.13, "raising the canary 20 -> 30 moves only about 10% of the callers"
    assert choose_version("m", {}, "k", default="3") == "3"


def test_the_canary_version_sticks_to_the_session_else_the_tenant_on_a_retry_and_a_fallback():

    from services.router.inference_service import asked

    without_session = asked(service_pb2.ModelInferRequest(model_name="llm"), "tenant-1").route
    assert without_session.version_key == "tenant-1" and without_session.affinity_key == ""
    assert without_session.excluding("c0").version_key == "tenant-1"  # a retry elsewhere keeps it
    with_session = service_pb2.ModelInferRequest(model_name="llm")
    with_session.parameters["mesh_session"].string_param = "s-9"
    assert asked(with_session, "tenant-1").route.version_key == "s-9"
