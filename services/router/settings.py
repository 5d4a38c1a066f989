from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.deadlines import GENERATION_BUDGET_S
from services.common.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="MESH_ROUTER_", env_nested_delimiter="__", extra="forbid")

    port: int = 50052
    registry_file: str = "config/registry.yaml"
    # A replica that stops answering leaves rotation within probe_interval_s + probe_timeout_s (< 10 s).
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 1.5
    # Upper bound for one inference call to a replica; a caller's shorter deadline wins.
    default_timeout_s: float = GENERATION_BUDGET_S
    # ModelMetadata relayed to a replica: cheap, so it fails fast.
    metadata_timeout_s: float = 10.0
    # A stream whose replica sends nothing for this long after its first response is resumed elsewhere.
    stream_stall_timeout_s: float = 15.0
    metrics_port: int = 9102
    # Load shedding: RPCs worked on at once (0: no bound), and requests in flight per replica; a replica at its
    # bound is skipped, and with every replica at it the request waits in the fair queues (refused at once with
    # RESOURCE_EXHAUSTED when it could not start before its deadline).
    max_in_flight: int = 2048
    max_in_flight_per_replica: int = 64
    # Fair queues (services/router/admission.py) in front of replicas at their bound (this one, or a model's own
    # max_in_flight_per_replica in the registry): a batch request waiting this long, or this share of its time to
    # its deadline when longer, competes as interactive (one per batch_aging_s); a tenant may have this many
    # requests waiting in this router. A Batch API line (300 s, MESH_GATEWAY_BATCH__LINE_TIMEOUT_S) yields for
    # 150 s: a saturating interactive burst shorter than that takes nothing from its callers for batch work.
    batch_aging_s: float = 10.0
    batch_aging_share: float = Field(default=0.5, ge=0.0, lt=1.0)
    max_queued_per_tenant: int = 256
    # An interactive request that has to queue stops the newest running batch attempt of its model, which queues
    # again and resumes where its model can (services/router/preemption.py); each batch request at most this often.
    # A stop costs the batch request little (the CPU model stops inside a prompt's evaluation, a resumed stream
    # keeps its tokens), and a batch request that aged in is not stopped: the aging above is what keeps batch work
    # finishing, this bound only caps the work one request can lose. Past it a request runs to its end and the
    # interactive request behind it waits (bench/batch_priority.py, CPU model, back to back, one run each: p99
    # TTFT 2.36x of alone with a bound of 8, 1.04x with 1000, 1.69x with 64).
    preempt_batch: bool = True
    max_preemptions_per_request: int = Field(default=64, ge=0)
    # A slot freed this soon after an interactive request ended waits for the next one rather than going to batch
    # work (services/router/admission.py, AdmissionSettings.batch_hold_s).
    batch_hold_s: float = Field(default=0.05, ge=0.0, le=5.0)
    # Off: placements' own bounds are ignored and requests go straight to Triton's first-come queue (the behaviour
    # before fair queuing; for comparison, bench/fair_sharing.py).
    fair_queuing: bool = True
    # The registry file is re-read when it changes (and on RouterAdmin/ReloadRegistry).
    registry_watch_s: float = 2.0
    # Pools that discover their replicas (registry `discover.srv`) ask DNS this often; a replica that leaves the
    # records is drained. Nameservers "host:port" to ask instead of the system's resolver (empty: the system's).
    discovery_interval_s: float = 5.0
    discovery_timeout_s: float = 2.0
    dns_nameservers: list[str] = Field(default_factory=list)
    # Queue-aware choice: how often each replica's Triton metrics are read, and how many ms of measured queue
    # time count as one more request in flight.
    scrape_interval_s: float = 0.5
    queue_ms_per_slot: float = 50.0
    # Prefix affinity: a key stays on its home replica while that replica's load is within this factor of the
    # mean (bounded-load consistent hashing), and optionally below an absolute load.
    affinity_load_factor: float = 1.5
    affinity_max_load: float = 0.0
