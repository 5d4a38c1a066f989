"""Fixtures that start the real stack: Triton (tritonserver binary), router and gateway processes."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

from inference_mesh.v1 import mesh_pb2, mesh_pb2_grpc
from tools.metrics import metric_sum
from tools.s3 import S3Server, start_s3_server
from tools.stack import LocalStack, StackPorts
from tools.triton import triton_counter

LLM = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"
KEYS = {"tenant-a": "test-key-tenant-a", "tenant-b": "test-key-tenant-b", "tenant-std": "test-key-tenant-std",
        "tenant-budget": "test-key-tenant-budget", "tenant-bulk": "test-key-tenant-bulk",
        # The adversarial suite's own: one stores documents, the other attacks them.
        "tenant-victim": "test-key-tenant-victim", "tenant-attacker": "test-key-tenant-attacker",
        "tenant-budget-kserve": "test-key-tenant-budget-kserve",
        # The OpenAI API suite's own: a roomy tenant, one with a tiny request limit, one with a small token budget.
        "tenant-openai": "test-key-tenant-openai", "tenant-openai-limited": "test-key-tenant-openai-limited",
        "tenant-openai-budget": "test-key-tenant-openai-budget",
        # The fair-sharing suite's own: weights 2 and 1, and a quiet tenant beside a flooder.
        "tenant-heavy": "test-key-tenant-heavy", "tenant-light": "test-key-tenant-light",
        "tenant-quiet": "test-key-tenant-quiet", "tenant-flood": "test-key-tenant-flood",
        "tenant-reserve": "test-key-tenant-reserve",
        # The cancelled-stream charge test's own: a month budget nothing else spends.
        "tenant-metered": "test-key-tenant-metered",
        # The KServe metering test's own month budget.
        "tenant-metered-kserve": "test-key-tenant-metered-kserve",
        # The storage quota test's own: a tier that keeps 6 vectors.
        "tenant-storage": "test-key-tenant-storage",
        # The OpenAPI fuzz's own: many requests, few tokens (a generation the fuzz starts is short or refused).
        "tenant-fuzz": "test-key-tenant-fuzz",
        # The batch suite's own: two tenants to try each other's ids, one for its limits.
        "tenant-batch": "test-key-tenant-batch", "tenant-batch-other": "test-key-tenant-batch-other",
        "tenant-batch-limits": "test-key-tenant-batch-limits", "tenant-batch-grpc": "test-key-tenant-batch-grpc",
        "tenant-batch-terms": "test-key-tenant-batch-terms",
        # The Batches gRPC fuzz's own: files and batches it makes count against nobody else's limits.
        "tenant-batch-fuzz": "test-key-tenant-batch-fuzz"}
# The batch tests' gateways: leases of seconds, not the default half minute (a test kills a gateway and waits for
# its lines to be taken over); windows of seconds (one waits for a batch to expire); limits a test can reach.
BATCH_BUCKET = "mesh-batch-files"
BATCH_ENV = {"MESH_GATEWAY_BATCH__LEASE_S": "3", "MESH_GATEWAY_BATCH__MIN_WINDOW_S": "1",
             "MESH_GATEWAY_BATCH__MAX_FILE_BYTES": str(2 * 1024 * 1024), "MESH_GATEWAY_BATCH__MAX_FILES": "6",
             "MESH_GATEWAY_BATCH__MAX_BATCHES_IN_FLIGHT": "3"}
# Request limits: the production tiers' own (config/tenants.yaml). Token budgets: large, except for the budget
# test's own tier, so that no other test runs out.
_PRODUCTION = yaml.safe_load((Path(__file__).parent.parent / "config" / "tenants.yaml").read_text())["tiers"]
TIERS = {
    "standard": {**_PRODUCTION["standard"], "tokens_per_minute": 1_000_000, "tokens_per_month": 0},
    "enterprise": {**_PRODUCTION["enterprise"], "tokens_per_minute": 1_000_000, "tokens_per_month": 0},
    "small-budget": {"requests_per_minute": 1000, "burst": 50, "tokens_per_minute": 300,
                     "tokens_per_month": 1_000_000},
    "bulk": {"requests_per_minute": 100_000, "burst": 10_000},
    # A tier's own batch terms: half price at batch priority, tighter limits than the deployment's (BATCH_ENV).
    "batch-terms": {"requests_per_minute": 100_000, "burst": 10_000, "batch_discount": 0.5, "max_batch_files": 2,
                    "max_batches_in_flight": 1},
    "tiny": {"requests_per_minute": 60, "burst": 3},
    "bulk-double": {"requests_per_minute": 100_000, "burst": 10_000, "share_weight": 2.0},
    "metered": {"requests_per_minute": 1000, "burst": 50, "tokens_per_minute": 1_000_000,
                "tokens_per_month": 10_000_000},
    "fuzz": {"requests_per_minute": 100_000, "burst": 10_000, "tokens_per_minute": 300},
    "storage-small": {"requests_per_minute": 1000, "burst": 50, "tokens_per_minute": 1_000_000,
                      "tokens_per_month": 10_000_000, "max_stored_vectors": 6},
}
TENANT_TIERS = {"tenant-a": "standard", "tenant-b": "enterprise", "tenant-std": "standard",
                "tenant-budget": "small-budget", "tenant-bulk": "bulk", "tenant-victim": "bulk",
                "tenant-attacker": "bulk", "tenant-budget-kserve": "small-budget", "tenant-openai": "bulk",
                "tenant-openai-limited": "tiny", "tenant-openai-budget": "small-budget",
                "tenant-heavy": "bulk-double", "tenant-light": "bulk", "tenant-quiet": "bulk", "tenant-flood": "bulk",
                "tenant-reserve": "small-budget", "tenant-metered": "metered",
                "tenant-metered-kserve": "metered", "tenant-storage": "storage-small",
                "tenant-fuzz": "fuzz", "tenant-batch": "bulk", "tenant-batch-other": "bulk",
                "tenant-batch-limits": "bulk", "tenant-batch-grpc": "bulk", "tenant-batch-terms": "batch-terms",
                "tenant-batch-fuzz": "bulk"}


def write_tenants(path: Path) -> Path:
    path.write_text(yaml.safe_dump({
        "tiers": TIERS,
        "tenants": [{"id": tenant, "tier": tier, "api_key_sha256": [hashlib.sha256(KEYS[tenant].encode()).hexdigest()]}
                    for tenant, tier in TENANT_TIERS.items()],
    }))
    return path


@pytest.fixture(scope="session")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tenants(tmp_path_factory.mktemp("config") / "tenants.yaml")


# The shipped registry's cpu pool is free; the tests' is priced, so that usage records carry costs to compare.
CPU_PRICE_PER_1K = 0.002


def priced_registry(path: Path) -> Path:
    registry = yaml.safe_load((Path(__file__).parent.parent / "config" / "registry.yaml").read_text())
    for spec in registry["models"].values():
        for placement in spec["pools"]:
            if isinstance(placement, dict) and placement["pool"] == "cpu":
                placement["cost_per_1k_tokens"] = CPU_PRICE_PER_1K
    path.write_text(yaml.safe_dump(registry))
    return path


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = start_s3_server(tmp_path_factory.mktemp("s3") / "s3.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, tenants_file: Path, s3_server: S3Server) -> Iterator[LocalStack]:
    # Semantic hits on: the cache's own tests exercise them (every shipped registry leaves them off). Batch files
    # in a bucket, as replicas on many machines keep them (`make up` uses a directory).
    mesh = LocalStack(tmp_path_factory.mktemp("stack"), StackPorts.free(1, gateways=2), tenants_file=tenants_file,
                      registry_file=priced_registry(tmp_path_factory.mktemp("registry") / "registry.yaml"),
                      semantic_cache=True,
                      service_env={"gateway": {**BATCH_ENV, **s3_server.gateway_env(BATCH_BUCKET)}})
    mesh.start()
    yield mesh
    mesh.stop()


@pytest.fixture(scope="session")
def channel(stack: LocalStack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.gateway_address) as ch:
        yield ch


@pytest.fixture(scope="session")
def mesh(channel: grpc.Channel) -> mesh_pb2_grpc.InferenceMeshStub:
    return mesh_pb2_grpc.InferenceMeshStub(channel)


AUTH = (("authorization", f"Bearer {KEYS['tenant-a']}"),)


def chat(content: str, max_tokens: int = 32, model: str = LLM, **kwargs) -> mesh_pb2.GenerateRequest:
    return mesh_pb2.GenerateRequest(
        model=model, max_tokens=max_tokens,
        messages=[mesh_pb2.ChatMessage(role=mesh_pb2.ROLE_USER, content=content)], **kwargs)


def generate(mesh: mesh_pb2_grpc.InferenceMeshStub, request: mesh_pb2.GenerateRequest,
             metadata=AUTH) -> tuple[str, list[mesh_pb2.GenerateChunk]]:
    chunks = list(mesh.Generate(request, metadata=metadata, timeout=120))
    return "".join(c.text for c in chunks), chunks


def debian_tool(command: str, package: str) -> str:
    """The path of a tool the tests need from Debian's packages, or a failure that says how to get it."""
    import shutil

    path = shutil.which(command)
    if path is None:
        pytest.fail(f"{command} not found: install Debian's {package} package (apt-get install {package}); "
                    "`make test` does this when it runs as root")
    return path


def service_metric(port: int, name: str, **labels: str) -> float:
    """A metric from a service's Prometheus endpoint, summed over the label sets that match `labels`."""
    return metric_sum(port, name, **labels)


def triton_metric(stack: LocalStack, name: str, replica: int = 0) -> float:
    """A counter from Triton's Prometheus endpoint, summed over its label sets."""
    return triton_counter(stack.ports.tritons[replica].metrics, name)


def fresh_long_prompt() -> str:
    """~1500 tokens, seconds of llama.cpp prefill here, with its own words from the first token on: a prompt the
    replica saw before is restored from a prefix snapshot (prefix_states.py) and needs no evaluation."""
    return (f"Note {uuid.uuid4().hex}. " + "The river runs past the old mill, the bakery and the school. " * 120
            + "Summarise.")


def wait_for_prompt_evaluation(stack: LocalStack, replica: int = 0, timeout_s: float = 20.0) -> None:
    """Returns once the replica's model is evaluating a prompt (its mesh_llm_prompts_in_evaluation gauge is 1)."""
    deadline = time.monotonic() + timeout_s
    while triton_metric(stack, "mesh_llm_prompts_in_evaluation", replica) < 1:
        if time.monotonic() > deadline:
            pytest.fail(f"no prompt was being evaluated on replica {replica} within {timeout_s:.0f} s")
        time.sleep(0.02)
