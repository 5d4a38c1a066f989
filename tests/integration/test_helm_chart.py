"""The Helm chart (deploy/helm/inference-mesh), rendered by the real helm binary for the cpu and gpu value sets:
every object valid against the Kubernetes OpenAPI schema of 1.30 and 1.33, a maintained policy scanner (Checkov)
with every finding either fixed or justified here, and the invariants the chart promises: probes, resources, PDBs,
spread, non-root read-only pods, NetworkPolicies that allow exactly the request flow, GPU pools on GPUs, no secret
in values. No Kubernetes cluster runs on this machine: what a cluster would add is named in the README."""

from __future__ import annotations

import json
import posixpath
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from services.common.settings import ServiceSettings
from services.edge.render import render, render_sds
from services.edge.settings import EdgeSettings
from services.router.registry import Registry
from tests.integration.chart import render_chart
from tools.kube.internal_pki import IDENTITIES as INTERNAL_IDENTITIES

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "inference-mesh"
K8S_BIN = ROOT / ".venv-k8s" / "bin"
VALUE_SETS = ("cpu", "gpu")
SCHEMA_VERSIONS = ("1.30.0", "1.33.0")
NAMESPACE = "mesh"
# Kinds of CRDs the chart uses (Prometheus Operator, cert-manager, KEDA): no OpenAPI schema in Kubernetes itself.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "ScaledObject"}
# The labels the chart selects pods and Services by (templates/_helpers.tpl "mesh.selector").
SELECTOR_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component")

# The request flow (ARCHITECTURE.md): (caller, callee, port). Cache and retrieval embed text through the router.
SERVICE_PORTS = {"gateway": 50051, "router": 50052, "cache": 50053, "retrieval": 50054, "ratelimit": 50055}
FLOW = {("edge", "gateway", 50051), ("edge", "gateway", 8080), ("edge", "ratelimit", 50055),
        ("gateway", "router", 50052), ("gateway", "cache", 50053), ("gateway", "retrieval", 50054),
        ("gateway", "ratelimit", 50055), ("cache", "router", 50052), ("retrieval", "router", 50052)}
# Outside the namespace: which component may reach which dependency's namespace.
EXTERNAL = {("gateway", "redis"), ("cache", "redis"), ("cache", "milvus"), ("retrieval", "milvus"),
            ("ratelimit", "redis")}

# Checkov findings the chart keeps, and why. Anything else it reports fails the test.
ACCEPTED_FINDINGS = {
    "CKV_K8S_43": "image digests are the operator's (values image.digest renders repository@digest); "
                  "the chart cannot know the digest of an image built from this repository",
    "CKV_K8S_15": "with a pinned tag or digest IfNotPresent pulls the same bytes; Always adds a registry round "
                  "trip to every pod start (Triton images are 10+ GB)",
    "CKV_K8S_35": "the services read the Redis URLs and the edge secret from their environment (typed settings, "
                  "one place per service); the values come from Secrets, never from the chart",
}


def _tool(name: str) -> str:
    path = K8S_BIN / name
    if not path.exists():
        pytest.fail(f"{path} is missing: `make k8s-tools` installs helm, kubernetes-validate and checkov "
                    "(requirements/k8s.txt); `make test` does it first")
    return str(path)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("chart")
    files = {}
    for value_set in VALUE_SETS:
        result = subprocess.run([_tool("helm"), "template", "mesh", str(CHART), "--namespace", NAMESPACE,
                                 "-f", str(CHART / f"values-{value_set}.yaml")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        files[value_set] = out / f"{value_set}.yaml"
        files[value_set].write_text(result.stdout)
    return files


def _objects(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def _component(labels: dict) -> str:
    return labels["app.kubernetes.io/component"]


def _workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("version", SCHEMA_VERSIONS)
def test_every_object_is_valid_against_the_kubernetes_schema(rendered, version, tmp_path):
    lines = subprocess.run([_tool("python"), str(ROOT / "tools" / "k8s_validate.py"), version,
                            *map(str, rendered.values())], capture_output=True, text=True, timeout=300, check=True)
    results = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(results) > 60
    invalid = [r for r in results if r["result"] == "invalid"]
    assert not invalid, invalid
    assert {r["kind"] for r in results if r["result"] == "no-schema"} <= CRD_KINDS

    # The validator is strict: a field Kubernetes does not know, or a count given as text, is refused.
    deployment = next(o for o in _objects(rendered["cpu"]) if o["kind"] == "Deployment")
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump_all([{**deployment, "spec": {**deployment["spec"], "replica": 3}},
                                          {**deployment, "spec": {**deployment["spec"], "replicas": "three"}}]))
    lines = subprocess.run([_tool("python"), str(ROOT / "tools" / "k8s_validate.py"), version, str(broken)],
                           capture_output=True, text=True, timeout=120, check=True)
    assert [json.loads(line)["result"] for line in lines.stdout.splitlines()] == ["invalid", "invalid"]


def test_the_policy_scanner_finds_nothing_but_the_accepted(rendered, tmp_path):
    for path in rendered.values():
        (tmp_path / path.name).write_text(path.read_text())
    # No network here: --skip-download keeps Checkov from fetching its guideline links.
    result = subprocess.run([_tool("checkov"), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet",
                             "--compact", "-o", "json", "--skip-download"], capture_output=True, text=True,
                            timeout=600, env={"BC_SKIP_MAPPING": "TRUE", "PATH": str(K8S_BIN) + ":/usr/bin:/bin"})
    report = json.loads(result.stdout)
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["passed"] > 1000, report["summary"]
    unexpected = sorted({(f["check_id"], f["check_name"], f["resource"]) for f in report["results"]["failed_checks"]
                         if f["check_id"] not in ACCEPTED_FINDINGS})
    assert not unexpected, unexpected


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_workload_has_probes_resources_a_pdb_spread_and_a_locked_down_pod(rendered, value_set):
    objects = _objects(rendered[value_set])
    pdbs = _by_kind(objects, "PodDisruptionBudget")
    drain_s = ServiceSettings().shutdown_grace_s + ServiceSettings().drain_delay_s
    workloads = _workloads(objects)
    assert {_component(w["metadata"]["labels"]) for w in workloads} >= {"edge", *SERVICE_PORTS, "triton-cpu"}
    for workload in workloads:
        name, pod = workload["metadata"]["name"], workload["spec"]["template"]["spec"]
        assert workload["metadata"]["namespace"] == NAMESPACE
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= labels.items()], \
            f"{name}: no PodDisruptionBudget selects its pods"
        assert workload["spec"].get("replicas", 3) >= 2, f"{name}: one replica is no availability"
        assert any(c["topologyKey"] == "kubernetes.io/hostname" for c in pod["topologySpreadConstraints"]), name
        preStop = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > drain_s + preStop, \
            f"{name}: SIGKILL would land before the drain ({drain_s} s + {preStop} s preStop) ends"
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] >= 10000
        assert pod["automountServiceAccountToken"] is False, f"{name}: no pod here talks to the API server"
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert container["readinessProbe"] and container["livenessProbe"], where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), f"{where}: no {bound}"
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"], where
        component = _component(labels)
        if component in SERVICE_PORTS:
            probe = pod["containers"][0]["readinessProbe"]["exec"]["command"]
            assert probe[:3] == ["python", "-m", "services.common.healthcheck"] and \
                probe[3] == f"127.0.0.1:{SERVICE_PORTS[component]}", f"{name}: readiness is not grpc.health.v1"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_gpu_pools_request_gpus_on_their_gpu_class_and_nothing_else_does(rendered, value_set):
    objects = _objects(rendered[value_set])
    gpu_users = {}
    assert not _by_kind(objects, "Job"), "engines are built by the serving pods' init containers, not a Job"
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        containers = [*pod.get("initContainers", []), *pod["containers"]]
        gpus = {c["resources"]["requests"].get("nvidia.com/gpu") for c in containers} - {None}
        if gpus:
            gpu_users[workload["metadata"]["name"]] = pod
            for container in containers:
                assert container["resources"]["limits"].get("nvidia.com/gpu") == \
                    container["resources"]["requests"].get("nvidia.com/gpu"), "GPUs cannot be overcommitted"
    expected = {"cpu": set(), "gpu": {"triton-a100", "triton-t4"}}[value_set]
    assert set(gpu_users) == expected
    products = {"a100": "NVIDIA-A100-SXM4-80GB", "t4": "Tesla-T4"}
    for name, pod in gpu_users.items():
        pool = name.split("-")[1]
        (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        (expression,) = term["matchExpressions"]
        assert expression["key"] == "nvidia.com/gpu.product" and expression["operator"] == "In", name
        assert products[pool] in expression["values"], name
        assert not set(products.values()) - {products[pool]} & set(expression["values"]), f"{name}: another class"
        assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]), f"{name} cannot land on GPU nodes"


def _peer_components(peers: list[dict]) -> set[str]:
    found = set()
    for peer in peers:
        if "namespaceSelector" in peer:
            found.add("ns:" + peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"])
        else:
            found.add(_component(peer["podSelector"]["matchLabels"]))
    return found


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policies_allow_exactly_the_request_flow(rendered, value_set):
    objects = _objects(rendered[value_set])
    policies = _by_kind(objects, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny[0]["spec"] \
        and "egress" not in deny[0]["spec"], "the namespace starts from deny-all"
    tritons = {_component(w["metadata"]["labels"]) for w in _by_kind(objects, "StatefulSet")}
    expected = FLOW | {("router", triton, port) for triton in tritons for port in (8001, 8002)} \
        | {("gateway", triton, 8001) for triton in tritons}  # streams on the router's placement lease
    ingress, egress, external = set(), set(), set()
    covered = set()
    for policy in policies:
        if policy is deny[0]:
            continue
        me = _component(policy["spec"]["podSelector"]["matchLabels"])
        covered.add(me)
        for rule in policy["spec"]["ingress"]:
            ports = {p["port"] for p in rule["ports"]}
            sources = _peer_components(rule.get("from", [])) or {"anywhere"}
            for source in sources:
                if source == "ns:monitoring":
                    continue                     # Prometheus scrapes the metrics port (below)
                ingress |= {(source, me, port) for port in ports}
        for rule in policy["spec"]["egress"]:
            targets = _peer_components(rule["to"])
            if targets == {"ns:kube-system"}:
                assert {p["port"] for p in rule["ports"]} == {53}, "DNS only, to kube-system"
                continue
            for target in targets:
                if target.startswith("ns:"):
                    external.add((me, target[3:]))
                else:
                    egress |= {(me, target, p["port"]) for p in rule["ports"]}
    assert covered == {"edge", *SERVICE_PORTS, *tritons}, "every component has its own policy"
    assert egress == expected, f"egress beyond the flow: {egress - expected}, missing: {expected - egress}"
    assert ingress - {("anywhere", "edge", 8443)} == expected, \
        f"ingress beyond the flow: {ingress - expected}, missing: {expected - ingress}"
    assert ("anywhere", "edge", 8443) in ingress, "the public port is open (edgeFrom narrows it)"
    assert external == EXTERNAL
    metrics_ports = {}
    for service in _by_kind(objects, "Service"):
        for port in service["spec"]["ports"]:
            if port["name"] == "metrics":
                metrics_ports[_component(service["metadata"]["labels"])] = port["port"]
    for policy in policies:
        if policy is deny[0]:
            continue
        me = _component(policy["spec"]["podSelector"]["matchLabels"])
        scraped = [r for r in policy["spec"]["ingress"] if _peer_components(r.get("from", [])) == {"ns:monitoring"}]
        assert [p["port"] for r in scraped for p in r["ports"]] == [metrics_ports[me]], me


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_metrics_port_has_a_service_monitor_and_the_rules_are_the_tested_ones(rendered, value_set):
    objects = _objects(rendered[value_set])
    monitored = {json.dumps(m["spec"]["selector"]["matchLabels"], sort_keys=True)
                 for m in _by_kind(objects, "ServiceMonitor")}
    for service in _by_kind(objects, "Service"):
        if any(p["name"] == "metrics" for p in service["spec"]["ports"]):
            selector = {k: v for k, v in service["metadata"]["labels"].items() if k in SELECTOR_LABELS}
            assert json.dumps(selector, sort_keys=True) in monitored, service["metadata"]["name"]
    (rule,) = _by_kind(objects, "PrometheusRule")
    assert rule["spec"] == yaml.safe_load((ROOT / "compose" / "prometheus" / "alerts.yml").read_text())
    (dashboard,) = [c for c in _by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "mesh-grafana-dashboard"]
    assert json.loads(dashboard["data"]["inference-mesh.json"])["panels"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_the_registry_config_map_is_a_valid_registry_whose_pools_discover_their_pods(rendered, value_set, tmp_path):
    objects = _objects(rendered[value_set])
    (config_map,) = [c for c in _by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "mesh-registry"]
    path = tmp_path / "registry.yaml"
    path.write_text(config_map["data"]["registry.yaml"])
    registry = Registry.load(path)
    services = {s["metadata"]["name"]: s for s in _by_kind(objects, "Service")}
    statefulsets = _by_kind(objects, "StatefulSet")
    assert set(registry.pools) == {s["metadata"]["name"].removeprefix("triton-") for s in statefulsets}
    for statefulset in statefulsets:
        name, service = statefulset["metadata"]["name"], services[statefulset["spec"]["serviceName"]]
        pool = registry.pools[name.removeprefix("triton-")]
        assert not pool.replicas and pool.discover is not None
        # Kubernetes names a headless Service's SRV records after the port's name: _<port>._tcp.<svc>.<ns>.svc...
        port = next(p for p in service["spec"]["ports"] if p["port"] == 8001)
        assert pool.discover.srv == f"_{port['name']}._tcp.{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
        assert service["spec"]["clusterIP"] == "None" and not service["spec"].get("publishNotReadyAddresses"), \
            "only ready pods are published (and so discovered)"
        assert pool.discover.metrics_port == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "metrics")
    if value_set == "gpu":
        compose = yaml.safe_load((ROOT / "config" / "registry.compose.yaml").read_text())
        chart = yaml.safe_load((CHART / "files" / "models-gpu.yaml").read_text())
        assert chart == {"models": compose["models"], "groups": compose["groups"]}, \
            "the chart's GPU models are the compose registry's"


def test_a_registry_change_rolls_no_pod_and_the_router_reads_it_from_the_config_map(rendered, tmp_path):
    """README: a model added by `helm upgrade` is reloaded by the routers without a restart. A checksum of the
    registry in a pod template would roll every Deployment instead; nothing in a pod template may depend on it."""
    changed = render_chart("gpu", "registryModels=cpu")
    registries = [next(c["data"]["registry.yaml"] for c in _by_kind(objects, "ConfigMap")
                       if c["metadata"]["name"] == "mesh-registry") for objects in (_objects(rendered["gpu"]), changed)]
    assert registries[0] != registries[1]
    before = {w["metadata"]["name"]: w["spec"]["template"] for w in _workloads(_objects(rendered["gpu"]))}
    after = {w["metadata"]["name"]: w["spec"]["template"] for w in _workloads(changed)}
    assert before == after
    (router,) = [w for w in _workloads(changed) if w["metadata"]["name"] == "mesh-router"]
    pod = router["spec"]["template"]["spec"]
    (registry_volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "mesh-registry"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == registry_volume["name"]]
    # A subPath mount would never see the ConfigMap's updates; a directory mount does (the router polls it).
    assert "subPath" not in mount
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["MESH_ROUTER_REGISTRY_FILE"] == f"{mount['mountPath']}/registry.yaml"


def test_autoscaling_scales_every_pool_and_the_gateways_on_metrics_the_mesh_exports(rendered):
    objects = _objects(rendered["gpu"])
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in _by_kind(objects, "ScaledObject")}
    statefulsets = {s["metadata"]["name"]: s for s in _by_kind(objects, "StatefulSet")}
    assert set(scaled) == {"mesh-gateway", *statefulsets}
    exported = (ROOT / "services" / "router" / "metrics.py").read_text() + \
        (ROOT / "services" / "router" / "admission.py").read_text() + \
        (ROOT / "services" / "common" / "shedding.py").read_text()
    for target, scaler in scaled.items():
        query = scaler["spec"]["triggers"][0]["metadata"]["query"]
        for metric in re.findall(r"(mesh_[a-z_]+)\{", query):
            assert f'"{metric}"' in exported, f"{target} scales on {metric}, which no service exports"
        assert float(scaler["spec"]["triggers"][0]["metadata"]["threshold"]) > 0
        if target in statefulsets:
            assert "replicas" not in statefulsets[target]["spec"], "the autoscaler owns the replica count"
            assert scaler["spec"]["minReplicaCount"] >= 2


def test_the_envoy_config_is_rendered_from_its_settings_and_names_the_charts_services(rendered, monkeypatch):
    monkeypatch.setenv("MESH_EDGE_CONFIG_FILE", str(CHART / "files" / "edge.yaml"))
    settings = EdgeSettings()
    assert yaml.safe_load((CHART / "files" / "envoy.yaml").read_text()) == render(settings), (
        "re-render: MESH_EDGE_CONFIG_FILE=deploy/helm/inference-mesh/files/edge.yaml python -m services.edge "
        "--out deploy/helm/inference-mesh/files/envoy.yaml")
    services = {s["metadata"]["name"]: s for s in _by_kind(_objects(rendered["cpu"]), "Service")}
    for address in [*settings.gateways, *settings.gateways_http, settings.ratelimit_address]:
        host, port = address.rsplit(":", 1)
        assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, address
    assert services["mesh-gateway-pods"]["spec"]["clusterIP"] == "None", "Envoy balances over every gateway pod"
    assert services["mesh-ratelimit-pods"]["spec"]["clusterIP"] == "None", "and over every rate-limit pod"
    sds = render_sds(settings)
    assert {f.name: yaml.safe_load(f.read_text()) for f in (CHART / "files" / "sds").glob("*.yaml")} == sds, \
        "re-render (--sds-out deploy/helm/inference-mesh/files/sds)"
    objects = _objects(rendered["cpu"])
    (config_map,) = [c for c in _by_kind(objects, "ConfigMap") if c["metadata"]["name"] == "mesh-envoy"]
    assert set(config_map["data"]) == {"envoy.yaml", *sds}
    assert {"edge_certificate.yaml", "edge_internal_certificate.yaml", "edge_internal_ca.yaml"} <= set(sds)
    (edge,) = [w for w in _workloads(objects) if w["metadata"]["name"] == "mesh-edge"]
    pod = edge["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    # Directory mounts (never subPath): the kubelet swaps their contents, which is what Envoy's SDS watches.
    assert mounts["config"]["mountPath"] == settings.tls_sds_dir
    assert mounts["tls"]["mountPath"] == posixpath.dirname(settings.tls_cert) and "subPath" not in mounts["tls"]
    # The overload manager must act before the kernel's OOM killer does.
    memory_limit = edge_limit_bytes(pod["containers"][0]["resources"]["limits"]["memory"])
    assert settings.limits.max_heap_bytes <= 0.8 * memory_limit, (settings.limits.max_heap_bytes, memory_limit)


def edge_limit_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]] if quantity[-2:] in units else int(quantity)


SECRET_SHAPES = [re.compile(p) for p in (r"-----BEGIN", r"(?i)password\s*:\s*\S", r"(?i)token\s*:\s*\S",
                                         r"redis://[^@\s]*:[^@\s]+@", r"\b[A-Za-z0-9+/]{40,}={0,2}\b")]


def test_no_secret_is_in_values_or_rendered_and_every_secret_named_is_a_value(rendered):
    for path in CHART.glob("values*.yaml"):
        text = path.read_text()
        for shape in SECRET_SHAPES:
            assert not shape.search(text), f"{path.name} looks like it holds a secret ({shape.pattern})"
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # secrets.internalPki is a prefix: one Secret per identity (tools/kube/internal_pki.py makes them).
    named = set(values["secrets"].values()) | {f"{values['secrets']['internalPki']}-{identity}"
                                               for identity in INTERNAL_IDENTITIES}
    for value_set in VALUE_SETS:
        objects = _objects(rendered[value_set])
        assert not _by_kind(objects, "Secret"), "the chart makes no Secret: they are made outside it"
        referenced = set()
        for workload in _workloads(objects):
            pod = workload["spec"]["template"]["spec"]
            referenced |= {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
            referenced |= {e["valueFrom"]["secretKeyRef"]["name"] for c in pod["containers"] for e in c.get("env", [])
                           if "secretKeyRef" in e.get("valueFrom", {})}
        assert referenced and referenced <= named, referenced - named


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_each_workload_mounts_only_its_own_identitys_secret(rendered, value_set):
    """One Secret per identity: a pod holds its own certificate and key and the CA certificate, nothing of another
    identity's, so a compromised Triton model cannot present the router's identity. Each service's TLS settings
    name the files of the identity it mounts."""
    prefix = yaml.safe_load((CHART / "values.yaml").read_text())["secrets"]["internalPki"]
    identities = set()
    for workload in _workloads(_objects(rendered[value_set])):
        pod = workload["spec"]["template"]["spec"]
        pki = [v["secret"] for v in pod["volumes"] if v.get("secret", {}).get("secretName", "").startswith(prefix)]
        assert len(pki) == 1, workload["metadata"]["name"]
        identity = pki[0]["secretName"].removeprefix(f"{prefix}-")
        assert {item["key"]: item["path"] for item in pki[0]["items"]} == {
            "ca.crt": "internal-ca.pem", "tls.crt": f"internal-{identity}.pem",
            "tls.key": f"internal-{identity}-key.pem"}
        identities.add(identity)
        for container in pod["containers"] + pod.get("initContainers", []):
            for env in container.get("env", []):
                assert not env.get("value", "").startswith("/run/mesh/pki/internal-") or identity in env["value"] \
                    or env["value"].endswith("internal-ca.pem"), (workload["metadata"]["name"], env)
    assert {"edge", "gateway", "router", "triton"} <= identities, identities


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_tritons_plaintext_http_port_serves_only_health_without_a_header(rendered, value_set):
    from tools.triton import restricted_http_arg

    tritons = [w for w in _workloads(_objects(rendered[value_set])) if _component(w["metadata"]["labels"])
               .startswith("triton")]
    assert tritons
    for workload in tritons:
        container = next(c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
        assert restricted_http_arg("$(MESH_TRITON_HTTP_KEY)") in container["args"]
        key = next(e for e in container["env"] if e["name"] == "MESH_TRITON_HTTP_KEY")
        assert key["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.uid"}}
        assert container["readinessProbe"]["httpGet"]["path"].startswith("/v2/health/")


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_passes(value_set):
    result = subprocess.run([_tool("helm"), "lint", str(CHART), "--strict", "-f",
                             str(CHART / f"values-{value_set}.yaml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_gpu_pod_builds_its_engine_on_its_own_gpu_before_triton_starts(rendered):
    """No build waits for GPUs that serving pods hold (the Job of old stayed Pending on a full pool), no immutable
    Job blocks an upgrade, and Triton starts on a built engine. The scheduling itself is run on a real
    kube-scheduler in test_chart_scheduling.py."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    workloads = {o["metadata"]["name"]: o for o in _workloads(_objects(rendered["gpu"]))}
    for pool in ("a100", "t4"):
        statefulset = workloads[f"triton-{pool}"]
        pod = statefulset["spec"]["template"]["spec"]
        fill, build = pod["initContainers"]
        triton = pod["containers"][0]
        assert fill["args"] == ["tools.fill_trtllm", "--out", "/trtllm-models", "--pool", pool]
        assert build["command"] == ["python3", "/build/build_engine.py", pool]
        assert build["resources"] == triton["resources"], "the pod's one GPU set builds, then serves"
        assert {"name": "HOME", "value": "/tmp"} in build["env"], "caches must not hit the read-only root"
        mounts = {m["name"]: m for m in build["volumeMounts"]}
        assert not mounts["engines"].get("readOnly") and not mounts["repository"].get("readOnly")
        served = {m["name"]: m for m in triton["volumeMounts"]}
        assert served["engines"]["readOnly"] and served["repository"]["readOnly"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes["repository"], "each pod's repository points at the engine it built or found"
        assert volumes["engines"]["persistentVolumeClaim"]["claimName"] == f"triton-{pool}-engines"
        probe = triton["startupProbe"]
        assert probe["periodSeconds"] * probe["failureThreshold"] == values["pools"][pool]["startupSeconds"]


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_no_disruption_budget_holds_a_node_drain_behind_an_unready_pod(rendered, value_set):
    budgets = _by_kind(_objects(rendered[value_set]), "PodDisruptionBudget")
    assert budgets
    for budget in budgets:
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow", budget["metadata"]["name"]


def test_the_cluster_specific_knobs_reach_every_object_they_govern():
    """Managed Redis/Milvus by address range, pull secrets on every pod, the Prometheus selector's labels on every
    ServiceMonitor and the rule, a RuntimeClass on the GPU pools only."""
    objects = render_chart(
        "gpu", "networkPolicies.egressCidrs.redis[0]=10.20.0.0/24",
        "networkPolicies.egressCidrs.milvus={10.30.0.0/24,10.31.0.0/24}", "imagePullSecrets[0].name=ngc",
        "monitoring.labels.release=kube-prometheus-stack", "pools.a100.runtimeClassName=nvidia",
        "pools.t4.runtimeClassName=nvidia")
    external = {"redis": [{"ipBlock": {"cidr": "10.20.0.0/24"}}],
                "milvus": [{"ipBlock": {"cidr": "10.30.0.0/24"}}, {"ipBlock": {"cidr": "10.31.0.0/24"}}]}
    for policy in _by_kind(objects, "NetworkPolicy"):
        component = policy["metadata"]["name"].removeprefix("mesh-")
        peers = [rule["to"] for rule in policy["spec"].get("egress", [])]
        for dependency, cidr_peers in external.items():
            assert (cidr_peers in peers) == ((component, dependency) in EXTERNAL), (component, dependency)
            assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": dependency}}} not in \
                [peer for rule in peers for peer in rule], f"{component} still reaches the {dependency} namespace"
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        assert pod.get("imagePullSecrets") == [{"name": "ngc"}], workload["metadata"]["name"]
        gpu = workload["metadata"]["name"] in ("triton-a100", "triton-t4")
        assert pod.get("runtimeClassName") == ("nvidia" if gpu else None), workload["metadata"]["name"]
    monitoring = [o for o in objects if o["kind"] in ("ServiceMonitor", "PrometheusRule")]
    assert len(monitoring) == 10 and all(o["metadata"]["labels"]["release"] == "kube-prometheus-stack"
                                         for o in monitoring)


def test_a_checkpoint_by_hub_uri_is_fetched_before_the_build_into_the_directory_the_build_reads():
    token_secret = "hf-token"
    objects = render_chart("gpu", "models.checkpointUri=hf://HuggingFaceTB/SmolLM2-135M-Instruct@main",
                           f"models.tokenSecret={token_secret}")
    build_reads = yaml.safe_load((ROOT / "config" / "trtllm_pools.yaml").read_text())
    checkpoint = next(v for k, v in _flatten(build_reads) if k.endswith("hf_checkpoint"))
    for statefulset in (w for w in _workloads(objects) if w["metadata"]["name"] in ("triton-a100", "triton-t4")):
        pod = statefulset["spec"]["template"]["spec"]
        fetch, *rest = pod["initContainers"]
        assert fetch["name"] == "fetch-checkpoint" and [c["name"] for c in rest] == ["fill-repository", "build-engine"]
        assert fetch["args"][:2] == ["tools.fetch_checkpoint", "hf://HuggingFaceTB/SmolLM2-135M-Instruct@main"]
        env = {e["name"]: e for e in fetch["env"]}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": token_secret, "key": "token"}
        # Where it writes (its engines mount) is where the build and Triton read the checkpoint.
        written = fetch["args"][2]
        for container in (rest[1], pod["containers"][0]):
            (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models/hf"]
            assert mount["name"] == "engines" and mount.get("readOnly")
            assert f"/engines/{mount['subPath']}/{posixpath.basename(checkpoint)}" == written
        assert checkpoint.startswith("/models/hf/")
        assert not any("persistentVolumeClaim" in v and v["name"] == "hf" for v in pod["volumes"])
    policies = {p["metadata"]["name"]: p for p in _by_kind(objects, "NetworkPolicy")}
    for name, policy in policies.items():
        https = [{"protocol": "TCP", "port": 443}]
        hub = [rule for rule in policy["spec"].get("egress", []) if rule.get("ports") == https]
        assert bool(hub) == (name in ("mesh-triton-a100", "mesh-triton-t4")), name


def _flatten(node, prefix: str = ""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}")
    else:
        yield prefix, node


def test_every_tool_a_chart_container_runs_is_in_the_services_image():
    """The services image copies only the tools its pods run: an init container naming one it lacks fails with
    ModuleNotFoundError on the cluster, after the image was built and pushed."""
    objects = render_chart("gpu", "models.checkpointUri=hf://org/name")
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    services_stage = dockerfile.split("AS services\n", 1)[1].split("\nFROM ", 1)[0]
    copied = {name for line in services_stage.splitlines() if line.startswith("COPY tools/")
              for name in re.findall(r"tools/(\w+)\.py", line)}
    run = set()
    for workload in _workloads(objects):
        pod = workload["spec"]["template"]["spec"]
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            if container["image"].startswith("inference-mesh/services"):
                run |= {arg.removeprefix("tools.") for arg in container.get("args", [])[:1] if arg.startswith("tools.")}
    assert run == {"fill_trtllm", "fetch_checkpoint"} and run <= copied, (run, copied)


def test_an_admin_database_reaches_gateways_and_rate_limits_only_when_named():
    """admin.databaseSecret: the URL from that Secret in the gateways' and rate-limit pods, and their egress to
    the database's namespace (or its address ranges); without it, neither."""
    def admin_env(objects: list[dict]) -> dict[str, list]:
        found = {}
        for workload in _workloads(objects):
            for container in workload["spec"]["template"]["spec"]["containers"]:
                urls = [e for e in container.get("env", []) if e["name"].endswith("_ADMIN__URL")]
                if urls:
                    found[workload["metadata"]["name"].removeprefix("mesh-")] = urls
        return found

    def reaching(objects: list[dict], peer: dict) -> set[str]:
        return {p["metadata"]["name"].removeprefix("mesh-") for p in _by_kind(objects, "NetworkPolicy")
                if any(peer in rule["to"] for rule in p["spec"].get("egress", []))}

    namespace = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "postgres"}}}
    plain = render_chart("cpu")
    assert admin_env(plain) == {} and reaching(plain, namespace) == set()
    named = render_chart("cpu", "admin.databaseSecret=mesh-admin-db")
    assert {name: [e["valueFrom"]["secretKeyRef"] for e in env] for name, env in admin_env(named).items()} == {
        "gateway": [{"name": "mesh-admin-db", "key": "url"}], "ratelimit": [{"name": "mesh-admin-db", "key": "url"}]}
    assert reaching(named, namespace) == {"gateway", "ratelimit"}
    managed = render_chart("cpu", "admin.databaseSecret=mesh-admin-db",
                           "networkPolicies.egressCidrs.postgres[0]=10.40.0.0/24")
    assert reaching(managed, {"ipBlock": {"cidr": "10.40.0.0/24"}}) == {"gateway", "ratelimit"}
    assert reaching(managed, namespace) == set()


def test_batches_are_off_until_a_database_and_a_bucket_are_named_then_every_gateway_shares_the_bucket(tmp_path):
    """batch.enabled: the gateways keep files in the named S3 bucket with the credentials Secret's keys (or the
    pod's cloud identity), reach the object store through their NetworkPolicy and nothing else does; without the
    admin database or a bucket, the render fails with what to set rather than deploying routes that cannot work."""
    def gateway_env(objects: list[dict]) -> dict[str, dict]:
        (gateway,) = [w for w in _workloads(objects) if w["metadata"]["name"] == "mesh-gateway"]
        return {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}

    def reaching(objects: list[dict], peer: dict) -> set[str]:
        return {p["metadata"]["name"].removeprefix("mesh-") for p in _by_kind(objects, "NetworkPolicy")
                if any(peer in rule["to"] for rule in p["spec"].get("egress", []))}

    minio = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}}}
    plain = render_chart("cpu")
    assert gateway_env(plain)["MESH_GATEWAY_BATCH__ENABLED"]["value"] == "false" and reaching(plain, minio) == set()
    for sets, words in ((["batch.enabled=true"], "needs admin.databaseSecret"),
                        (["batch.enabled=true", "admin.databaseSecret=db"], "needs batch.s3.bucket")):
        command = [_tool("helm"), "template", "mesh", str(CHART), "-f", str(CHART / "values-cpu.yaml")]
        failed = subprocess.run([*command, *(f"--set={s}" for s in sets)], capture_output=True, text=True,
                                timeout=120)
        assert failed.returncode != 0 and words in failed.stderr, failed.stderr
    enabled = render_chart("cpu", "batch.enabled=true", "admin.databaseSecret=mesh-admin-db",
                           "batch.s3.bucket=mesh-batches", "batch.s3.endpointUrl=http://minio.minio:9000",
                           "batch.s3.credentialsSecret=mesh-batch-s3")
    env = gateway_env(enabled)
    assert "MESH_GATEWAY_BATCH__ENABLED" not in env
    assert {k: env[k]["value"] for k in env if k.startswith("MESH_GATEWAY_BATCH__")} == {
        "MESH_GATEWAY_BATCH__STORAGE": "s3", "MESH_GATEWAY_BATCH__S3__BUCKET": "mesh-batches",
        "MESH_GATEWAY_BATCH__S3__ENDPOINT_URL": "http://minio.minio:9000",
        "MESH_GATEWAY_BATCH__S3__REGION": "us-east-1", "MESH_GATEWAY_BATCH__S3__PREFIX": "batch-files/"}
    assert [env[k]["valueFrom"]["secretKeyRef"] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")] == [
        {"name": "mesh-batch-s3", "key": "access-key-id"}, {"name": "mesh-batch-s3", "key": "secret-access-key"}]
    assert reaching(enabled, minio) == {"gateway"}
    on_aws = render_chart("cpu", "batch.enabled=true", "admin.databaseSecret=mesh-admin-db",
                          "batch.s3.bucket=mesh-batches", "networkPolicies.egressCidrs.objectStorage[0]=52.216.0.0/15")
    assert "AWS_ACCESS_KEY_ID" not in gateway_env(on_aws), "no Secret named: the pod's own identity"
    assert reaching(on_aws, {"ipBlock": {"cidr": "52.216.0.0/15"}}) == {"gateway"}
    written = tmp_path / "batch.yaml"
    written.write_text(yaml.safe_dump_all(enabled))
    lines = subprocess.run([_tool("python"), str(ROOT / "tools" / "k8s_validate.py"), SCHEMA_VERSIONS[-1],
                            str(written)], capture_output=True, text=True, timeout=300, check=True)
    assert not [r for r in map(json.loads, lines.stdout.splitlines()) if r["result"] == "invalid"]
