"""The Helm chart applied by the real helm to a real kube-apiserver, placed by the real kube-scheduler (with the
real controller-manager making pods from Deployments and StatefulSets and binding volumes) on fake nodes of each
class: CPU nodes, and exactly as many A100 and T4 GPUs as the pools have replicas. Every pod of both value sets
must be scheduled, the engine builds included (they are init containers of the serving pods: a build that needed a
GPU of its own would stay Pending forever on a full pool, as the Job of old did), and `helm upgrade` with a changed
value must be accepted and its new pod placed on the GPU the old one held. Containers never run (no kubelet):
what a cluster adds beyond placement is named in README's Kubernetes section.

The control plane is Kubernetes 1.20 (Debian's source package; tools/kube/build_control_plane.sh), older than the
chart's floor (1.30): the post-renderer below rewrites only what 1.20 cannot read, each rewrite named, and keeps
everything else as rendered."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tools.kube import control_plane

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "inference-mesh"
HELM = ROOT / ".venv-k8s" / "bin" / "helm"
CRDS = ROOT / "tests" / "fixtures" / "crds"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "Certificate", "ScaledObject"}
GPU_PRODUCTS = {"a100": "NVIDIA-A100-SXM4-80GB", "t4": "Tesla-T4"}
# GPU nodes as each platform labels them (values-gke.yaml and values-eks.yaml select them) and sizes them: a GKE
# a2-highgpu-1g and n1-standard-8 with a T4; EKS's p4d (one of its eight GPUs here) and a g4dn.xlarge, whose
# allocatable is under 4 CPU and 16 GiB once the kubelet's reservations are taken.
PLATFORM_NODES = {
    "gke": {"a100": ({"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"}, {"cpu": "11900m", "memory": "76Gi"}),
            "t4": ({"cloud.google.com/gke-accelerator": "nvidia-tesla-t4"}, {"cpu": "7910m", "memory": "24Gi"})},
    "eks": {"a100": ({"node.kubernetes.io/instance-type": "p4d.24xlarge"}, {"cpu": "95690m", "memory": "1100Gi"}),
            "t4": ({"node.kubernetes.io/instance-type": "g4dn.xlarge"}, {"cpu": "3920m", "memory": "14800Mi"})},
}
STORAGE_CLASSES = {"gke": "standard-rwo", "eks": "gp3"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}


def rewrite_for_1_20(documents: list[dict]) -> list[dict]:
    """What a 1.20 API server cannot read, rewritten; every other field as the chart rendered it."""
    kept, replicas = [], {}
    for doc in documents:
        # No operator runs here to act on a ScaledObject: KEDA's first act is to scale its target to
        # minReplicaCount, done here so the pods it would ask for are placed.
        if doc["kind"] == "ScaledObject":
            target = doc["spec"]["scaleTargetRef"]
            replicas[(target.get("kind", "Deployment"), target["name"])] = doc["spec"]["minReplicaCount"]
        if doc["kind"] == "PodDisruptionBudget":
            doc["apiVersion"] = "policy/v1beta1"  # policy/v1 is 1.21+
            doc["spec"].pop("unhealthyPodEvictionPolicy", None)  # 1.26+
        template = doc.get("spec", {}).get("template", {}).get("spec")
        if template:
            for container in [*template.get("initContainers", []), *template["containers"]]:
                pre_stop = container.get("lifecycle", {}).get("preStop", {})
                if "sleep" in pre_stop:  # lifecycle sleep is 1.29+
                    pre_stop["exec"] = {"command": ["sleep", str(pre_stop.pop("sleep")["seconds"])]}
                for bound in ("requests", "limits"):
                    quantities = container.get("resources", {}).get(bound, {})
                    for name, value in quantities.items():
                        quantities[name] = str(value)
        kept.append(doc)
    for doc in kept:
        if (doc["kind"], doc["metadata"]["name"]) in replicas and "replicas" not in doc["spec"]:
            doc["spec"]["replicas"] = replicas[(doc["kind"], doc["metadata"]["name"])]
    return kept


def crd_for_1_20(crd: dict) -> dict:
    """A vendored CRD as 1.20 accepts it: CEL rules (x-kubernetes-validations, 1.25+) and selectableFields (1.30+)
    are fields it does not know, and it refuses `default` inside a schema the CRD marks nullable-free atomic
    (ServiceMonitor's `default: ""` on secret key names). Types, required fields and enums stay: what the tests
    check the chart's resources against."""
    def strip(node):
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items()
                    if k not in ("x-kubernetes-validations", "selectableFields") and not (k == "default" and v == "")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node
    return strip(crd)


def install_crds(cluster: control_plane.Cluster) -> dict[str, str]:
    """The vendored CRDs (tests/fixtures/crds/SOURCES.md names their tags), established; kind → plural path."""
    paths = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = crd_for_1_20(yaml.safe_load(path.read_text()))
        cluster.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
        version = next(v["name"] for v in crd["spec"]["versions"] if v.get("storage"))
        paths[crd["spec"]["names"]["kind"]] = f"/apis/{crd['spec']['group']}/{version}/namespaces/{{namespace}}/" \
                                              f"{crd['spec']['names']['plural']}"
    end = time.monotonic() + 30
    while time.monotonic() < end:
        crds = cluster.request("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions")["items"]
        # A CRD just created can read back with `status: {conditions: null}` before the apiserver fills it in.
        if all(any(c["type"] == "Established" and c["status"] == "True"
                   for c in (crd.get("status") or {}).get("conditions") or []) for crd in crds) \
                and len(crds) == len(paths):
            return paths
        time.sleep(0.5)
    pytest.fail("the vendored CRDs were not established within 30 s")


def _post_renderer(tmp_path: Path) -> Path:
    script = tmp_path / "rewrite-for-1.20"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys, yaml; "
                      f"sys.path.insert(0, \"{ROOT}\"); "
                      "from tests.integration.test_chart_scheduling import rewrite_for_1_20; "
                      "docs = [d for d in yaml.safe_load_all(sys.stdin) if d]; "
                      "yaml.safe_dump_all(rewrite_for_1_20(docs), sys.stdout)'\n")
    script.chmod(0o755)
    return script


def _chart_for_1_20(tmp_path: Path) -> Path:
    """The chart (its symlinked files copied in) with its kubeVersion floor lowered to the server's."""
    copy = tmp_path / "inference-mesh"
    shutil.copytree(CHART, copy, symlinks=False)
    chart = yaml.safe_load((copy / "Chart.yaml").read_text())
    chart["kubeVersion"] = ">=1.20.0-0"
    (copy / "Chart.yaml").write_text(yaml.safe_dump(chart))
    return copy


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: `make k8s-tools` installs it (`make test` does it first)")
    try:
        control_plane.binaries()
    except FileNotFoundError as missing:
        pytest.fail(str(missing))
    workdir = tmp_path_factory.mktemp("kube")
    with control_plane.running(workdir) as running:
        for index, zone in enumerate(("zone-a", "zone-b", "zone-c")):
            running.add_node(f"cpu-{index}", {"topology.kubernetes.io/zone": zone},
                             {"cpu": "32", "memory": "128Gi", "pods": "110"})
        for pool, product in GPU_PRODUCTS.items():
            for index, zone in enumerate(("zone-a", "zone-b")):
                running.add_node(f"{pool}-{index}", {"topology.kubernetes.io/zone": zone,
                                                     "nvidia.com/gpu.product": product},
                                 {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": "1"},
                                 taints=[GPU_TAINT])
        for platform, pools in PLATFORM_NODES.items():
            for pool, (labels, size) in pools.items():
                for index, zone in enumerate(("zone-a", "zone-b")):
                    running.add_node(f"{platform}-{pool}-{index}", {"topology.kubernetes.io/zone": zone, **labels},
                                     {**size, "pods": "110", "nvidia.com/gpu": "1"}, taints=[GPU_TAINT])
        yield running


@pytest.fixture(scope="module")
def crd_paths(cluster) -> dict[str, str]:
    return install_crds(cluster)


def _helm(cluster: control_plane.Cluster, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(HELM), "--kubeconfig", str(cluster.kubeconfig), *args,
                           "--post-renderer", str(_post_renderer(tmp_path))],
                          capture_output=True, text=True, timeout=180)


def _expected_pods(cluster: control_plane.Cluster, namespace: str) -> int:
    total = 0
    for kind in ("deployments", "statefulsets"):
        for item in cluster.request("GET", f"/apis/apps/v1/namespaces/{namespace}/{kind}")["items"]:
            total += item["spec"].get("replicas", 1)
    return total


def _scheduled(cluster: control_plane.Cluster, namespace: str, timeout_s: float = 90) -> list[dict]:
    """Every pod the workloads ask for exists and has a node, or the scheduler's reasons for the ones that do not."""
    expected = _expected_pods(cluster, namespace)
    end = time.monotonic() + timeout_s
    while True:
        pods = [p for p in cluster.pods(namespace) if not p["metadata"].get("deletionTimestamp")]
        pending = [p for p in pods if not p["spec"].get("nodeName")]
        if len(pods) >= expected and not pending:
            return pods
        if time.monotonic() > end:
            reasons = {p["metadata"]["name"]: [c.get("message") for c in p["status"].get("conditions", [])]
                       for p in pending}
            pytest.fail(f"{len(pods)}/{expected} pods exist, unscheduled: {json.dumps(reasons, indent=1)}")
        time.sleep(1)


def _placed_by_pool(pods: list[dict], gpu_node_prefix: str = "") -> dict[str, list[dict]]:
    """Each GPU pool's pods, checked to be on nodes of that pool's class (<prefix><pool>-N); every other pod
    on a CPU node."""
    by_pool: dict[str, list[dict]] = {}
    for pod in pods:
        name, node = pod["metadata"]["name"], pod["spec"]["nodeName"]
        pool = next((p for p in GPU_PRODUCTS if name.startswith(f"triton-{p}-")), None)
        assert node.startswith(f"{gpu_node_prefix}{pool}-") if pool else node.startswith("cpu-"), f"{name} on {node}"
        if pool:
            by_pool.setdefault(pool, []).append(pod)
    return by_pool


def _install(cluster, tmp_path: Path, namespace: str, value_set: str) -> list[dict]:
    result = _helm(cluster, tmp_path, "install", "mesh", str(_chart_for_1_20(tmp_path)), "--namespace", namespace,
                   "--create-namespace", "-f", str(CHART / f"values-{value_set}.yaml"))
    assert result.returncode == 0, result.stderr
    return _scheduled(cluster, namespace)


def test_every_pod_of_the_cpu_value_set_is_scheduled(cluster, crd_paths, tmp_path):
    pods = _install(cluster, tmp_path, "mesh-cpu", "cpu")
    assert all(p["spec"]["nodeName"].startswith("cpu-") for p in pods), "nothing lands on GPU nodes"
    assert {p["metadata"]["name"] for p in pods} >= {"triton-cpu-0", "triton-cpu-1"}


def _namespace_with_checkpoint_claim(cluster, namespace: str) -> None:
    """The namespace, and the claim the operator fills with the checkpoint (models.checkpointUri's default)."""
    cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    cluster.create(f"/api/v1/namespaces/{namespace}/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": "mesh-hf-models"},
        "spec": {"accessModes": ["ReadOnlyMany"], "storageClassName": "",
                 "resources": {"requests": {"storage": "10Gi"}}}})
    cluster.add_volume(f"{namespace}-hf", ["ReadOnlyMany"], "10Gi", claim=(namespace, "mesh-hf-models"))


def _claims_for_gpu_pools(cluster, namespace: str) -> None:
    """The checkpoint's claim, and the shared engine volumes a ReadWriteMany class would provide."""
    _namespace_with_checkpoint_claim(cluster, namespace)
    for pool in GPU_PRODUCTS:
        cluster.add_volume(f"{namespace}-{pool}-engines", ["ReadWriteMany"], "50Gi",
                           claim=(namespace, f"triton-{pool}-engines"))


def test_every_pod_of_the_gpu_value_set_is_scheduled_on_exactly_its_pools_gpus_and_upgrades(cluster, crd_paths,
                                                                                         tmp_path):
    namespace = "mesh-gpu"
    _claims_for_gpu_pools(cluster, namespace)
    chart = str(_chart_for_1_20(tmp_path))
    result = _helm(cluster, tmp_path, "install", "mesh", chart, "--namespace", namespace,
                   "-f", str(CHART / "values-gpu.yaml"))
    assert result.returncode == 0, result.stderr
    pods = _scheduled(cluster, namespace)
    assert not cluster.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs")["items"]
    on_gpus = _placed_by_pool(pods)
    for pool_pods in on_gpus.values():
        for pod in pool_pods:
            assert [c["name"] for c in pod["spec"]["initContainers"]] == ["fill-repository", "build-engine"]
    # Two replicas a pool, one GPU a node: each pool holds every GPU of its class, builds included.
    assert {pool: {p["spec"]["nodeName"] for p in pool_pods} for pool, pool_pods in on_gpus.items()} == \
        {pool: {f"{pool}-0", f"{pool}-1"} for pool in GPU_PRODUCTS}

    # An image bump (a new engine key: the pod rebuilds or finds its engine) through `helm upgrade`.
    new_tag = "24.11-trtllm-python-py3"
    result = _helm(cluster, tmp_path, "upgrade", "mesh", chart, "--namespace", namespace,
                   "-f", str(CHART / "values-gpu.yaml"), "--set", f"pools.a100.image.tag={new_tag}")
    assert result.returncode == 0, f"an upgrade with a changed value is refused: {result.stderr}"
    statefulset = cluster.request("GET", f"/apis/apps/v1/namespaces/{namespace}/statefulsets/triton-a100")
    template = statefulset["spec"]["template"]["spec"]
    assert all(c["image"].endswith(new_tag) for c in [template["initContainers"][1], *template["containers"]])
    # The rollout deletes the highest ordinal; without a kubelet its pod would stay Terminating, so it is removed
    # as a kubelet would once its containers stopped. Its replacement must take the GPU it held.
    end = time.monotonic() + 90
    while time.monotonic() < end:
        pods = cluster.pods(namespace)
        for pod in pods:
            if pod["metadata"].get("deletionTimestamp"):
                cluster.request("DELETE", f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
                                {"gracePeriodSeconds": 0})
        replaced = [p for p in pods if p["metadata"]["name"] == "triton-a100-1"
                    and not p["metadata"].get("deletionTimestamp") and p["spec"].get("nodeName")
                    and p["spec"]["containers"][0]["image"].endswith(new_tag)]
        if replaced:
            assert replaced[0]["spec"]["nodeName"].startswith("a100-")
            break
        time.sleep(1)
    else:
        pytest.fail("the upgraded triton-a100-1 was not scheduled on an A100 within 90 s")


def _holds(stored, rendered) -> bool:
    """Every rendered field is stored with its value (the schema's defaults may add fields, never drop one)."""
    if isinstance(rendered, dict):
        return isinstance(stored, dict) and all(k in stored and _holds(stored[k], v) for k, v in rendered.items())
    if isinstance(rendered, list):
        return isinstance(stored, list) and len(stored) == len(rendered) and all(
            _holds(a, b) for a, b in zip(stored, rendered, strict=True))
    return stored == rendered


def test_the_custom_resources_are_stored_as_rendered_and_a_broken_one_is_refused(cluster, crd_paths):
    """The gpu release's ServiceMonitors, PrometheusRule, Certificates and ScaledObjects were accepted by their
    operators' CRD schemas (the install above), and nothing was pruned: a 1.20 server drops fields a schema does
    not know instead of refusing them, so each stored spec is compared with the manifest helm applied."""
    namespace = "mesh-gpu"
    manifest = subprocess.run([str(HELM), "--kubeconfig", str(cluster.kubeconfig), "get", "manifest", "mesh",
                               "--namespace", namespace], capture_output=True, text=True, timeout=60)
    assert manifest.returncode == 0, manifest.stderr
    custom = [d for d in yaml.safe_load_all(manifest.stdout) if d and d["kind"] in CUSTOM_KINDS]
    assert {d["kind"] for d in custom} == CUSTOM_KINDS
    for doc in custom:
        stored = cluster.request("GET", crd_paths[doc["kind"]].format(namespace=namespace) + "/"
                                 + doc["metadata"]["name"])
        assert _holds(stored["spec"], doc["spec"]), f"{doc['kind']} {doc['metadata']['name']}: pruned or changed"
    broken = {
        "ServiceMonitor": {"selector": {}, "endpoints": [{"port": "metrics", "honorLabels": "yes"}]},
        "Certificate": {"dnsNames": ["x"], "issuerRef": {"name": "ca"}},           # no secretName
        "ScaledObject": {"scaleTargetRef": {"name": "mesh-gateway"}, "triggers": [{"metadata": {}}]},  # no type
        "PrometheusRule": {"groups": [{"name": "g", "rules": [{"alert": "A"}]}]},  # no expr
    }
    for kind, spec in broken.items():
        api_version = "/".join(crd_paths[kind].split("/")[2:4])
        with pytest.raises(RuntimeError, match=": 422 "):
            cluster.create(crd_paths[kind].format(namespace=namespace), {
                "apiVersion": api_version, "kind": kind, "metadata": {"name": "broken"}, "spec": spec})


@pytest.mark.parametrize("platform", sorted(PLATFORM_NODES))
def test_the_platform_value_sets_place_every_pool_on_that_platforms_gpu_nodes(cluster, crd_paths, tmp_path,
                                                                                platform):
    """values-gpu.yaml with values-gke.yaml or values-eks.yaml on nodes labelled and sized as that platform's are:
    each pool on its class by the platform's own label (no GPU Feature Discovery label exists there), T4 pods
    fitting a g4dn.xlarge, and each Triton pod's engine volume a ReadWriteOnce claim of the platform's class."""
    namespace = f"mesh-{platform}"
    _namespace_with_checkpoint_claim(cluster, namespace)
    for pool in GPU_PRODUCTS:
        for index in range(2):
            cluster.add_volume(f"{namespace}-{pool}-engines-{index}", ["ReadWriteOnce"], "50Gi",
                               storage_class=STORAGE_CLASSES[platform])
    result = _helm(cluster, tmp_path, "install", "mesh", str(_chart_for_1_20(tmp_path)), "--namespace", namespace,
                   "-f", str(CHART / "values-gpu.yaml"), "-f", str(CHART / f"values-{platform}.yaml"))
    assert result.returncode == 0, result.stderr
    on_gpus = _placed_by_pool(_scheduled(cluster, namespace), f"{platform}-")
    for pool_pods in on_gpus.values():
        for pod in pool_pods:
            claim = next(v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]
                         if v["name"] == "engines")
            stored = cluster.request("GET", f"/api/v1/namespaces/{namespace}/persistentvolumeclaims/{claim}")
            assert stored["spec"]["accessModes"] == ["ReadWriteOnce"]
            assert stored["spec"]["storageClassName"] == STORAGE_CLASSES[platform]
    assert {pool: {p["spec"]["nodeName"] for p in pool_pods} for pool, pool_pods in on_gpus.items()} == \
        {pool: {f"{platform}-{pool}-0", f"{platform}-{pool}-1"} for pool in GPU_PRODUCTS}


API_GROUPS = {"Deployment": "/apis/apps/v1", "StatefulSet": "/apis/apps/v1", "Service": "/api/v1",
              "ConfigMap": "/api/v1", "PersistentVolumeClaim": "/api/v1", "NetworkPolicy": "/apis/networking.k8s.io/v1",
              "PodDisruptionBudget": "/apis/policy/v1beta1"}


def _resource_path(doc: dict, namespace: str, crd_paths: dict[str, str]) -> str:
    kind = doc["kind"]
    if kind in crd_paths:
        return crd_paths[kind].format(namespace=namespace) + "/" + doc["metadata"]["name"]
    plural = kind.lower()[:-1] + "ies" if kind.endswith("y") else kind.lower() + "s"
    return f"{API_GROUPS[kind]}/namespaces/{namespace}/{plural}/{doc['metadata']['name']}"


@pytest.mark.parametrize("value_set", ["cpu", "gpu"])
def test_both_value_sets_apply_server_side_and_again_with_a_new_image(cluster, crd_paths, tmp_path, value_set):
    """GitOps controllers (Argo CD, Flux) apply server-side: every object of the chart, custom resources included,
    is applied with the API server's apply patch by one field manager, then applied again with a new image tag."""
    namespace = f"mesh-ssa-{value_set}"
    cluster.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    chart = str(_chart_for_1_20(tmp_path))
    for tag in ("0.1.0", "0.1.1"):
        rendered = subprocess.run([str(HELM), "template", "mesh", chart, "--namespace", namespace,
                                   "-f", str(CHART / f"values-{value_set}.yaml"), "--set", f"image.tag={tag}"],
                                  capture_output=True, text=True, timeout=120)
        assert rendered.returncode == 0, rendered.stderr
        documents = rewrite_for_1_20([d for d in yaml.safe_load_all(rendered.stdout) if d])
        for doc in documents:
            doc["metadata"]["namespace"] = namespace
            cluster.request("PATCH", _resource_path(doc, namespace, crd_paths) + "?fieldManager=mesh-gitops",
                            doc, content_type="application/apply-patch+yaml")
    gateway = cluster.request("GET", f"/apis/apps/v1/namespaces/{namespace}/deployments/mesh-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["image"].endswith(":0.1.1")
    managers = {entry["manager"] for entry in gateway["metadata"]["managedFields"] if entry["operation"] == "Apply"}
    assert managers == {"mesh-gitops"}
