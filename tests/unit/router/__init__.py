"""The router's unit tests; REGISTRY: a small registry they share (one GPU replica, two CPU replicas)."""

REGISTRY = {
    "pools": {"a100": {"gpu_class": "a100", "replicas": [{"name": "g0", "grpc": "127.0.0.1:1"}]},
              "cpu": {"gpu_class": "cpu", "replicas": [{"name": "c0", "grpc": "127.0.0.1:2"},
                                                       {"name": "c1", "grpc": "127.0.0.1:3"}]}},
    "models": {"llm": {"kind": "generate", "triton_model": "llm_t", "pools": ["a100", "cpu"], "max_output_tokens": 64}},
}
