"""Triton's queue metrics read by the router (services/router/queue_metrics.py)."""

from __future__ import annotations

from services.router.queue_metrics import parse, update
from services.router.registry import Registry
from services.router.replicas import ReplicaSet
from tests.unit.router import REGISTRY


def test_queue_metrics_are_parsed_and_turned_into_load():
    registry = Registry.model_validate(REGISTRY)
    replica = ReplicaSet(registry).replicas[1]
    text = ('nv_inference_pending_request_count{model="llm_t",version="1"} 3\n'
            'nv_inference_queue_duration_us{model="llm_t",version="1"} 1000000\n'
            'nv_inference_request_success{model="llm_t",version="1"} 10\n'
            'nv_inference_queue_duration_us{model="other",version="1"} 5\n')
    update(replica, parse(text))
    text2 = text.replace("} 1000000", "} 1400000").replace("} 10\n", "} 14\n").replace("} 3\n", "} 1\n")
    update(replica, parse(text2))
    queue = replica.queues["llm_t"]
    assert queue.pending == 1 and queue.queue_ms == 100.0, queue
    replica.in_flight = 2
    assert replica.load("llm_t", queue_ms_per_slot=50.0) == 2 + 2.0
    update(replica, parse(text2))
    assert replica.queues["llm_t"].queue_ms == 100.0, "requests waiting, none finished: the last mean stands"
    update(replica, parse(text2.replace("} 1\n", "} 0\n")))
    assert replica.queues["llm_t"].queue_ms == 0.0, "nothing waiting: no queue"
