"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-scheduler and kube-controller-manager
(built by tools/kube/build_control_plane.sh from Debian's source package), with fake nodes and no kubelet. Enough
to apply a chart for real and watch the real scheduler place (or fail to place) every pod: resource fit, GPUs,
node selectors, taints, volume binding. Containers never run. Used by tests/integration/test_chart_scheduling.py.

What differs from a managed cluster is named here: no kubelet (pods stay Pending-scheduled, never Ready), the node
lifecycle controller is off (it would mark kubelet-less nodes unreachable and evict everything), and the
ServiceAccount admission plugin is off (no token controller keys are made).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tools.processes import free_port

VERSION = "1.20.5+really1.20.2-1.1+deb12u1"
BIN = Path(os.environ.get("KUBE_CACHE", Path.home() / ".cache" / "inference-mesh" / "kubernetes")) / VERSION / "bin"
TOKEN = "mesh-test-admin-token"  # loopback only, this process's own throwaway cluster


def binaries() -> dict[str, str]:
    found = {name: str(BIN / name) for name in ("kube-apiserver", "kube-scheduler", "kube-controller-manager",
                                                "kubectl")}
    found["etcd"] = shutil.which("etcd") or ""
    missing = [name for name, path in found.items() if not path or not Path(path).exists()]
    if missing:
        raise FileNotFoundError(f"{', '.join(missing)} missing: `make kube-tools` builds the control plane from "
                                "Debian's kubernetes source package and installs etcd-server (as root)")
    return found


@dataclass
class Cluster:
    server: str
    kubeconfig: Path

    def request(self, method: str, path: str, body: dict | None = None,
                content_type: str = "application/json") -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.server + path, data=data, method=method, headers={
            "Authorization": f"Bearer {TOKEN}", "Content-Type": content_type, "Accept": "application/json"})
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # its own self-signed serving cert
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            raise RuntimeError(f"{method} {path}: {error.code} {error.read().decode()[:500]}") from error

    def create(self, path: str, body: dict) -> dict:
        return self.request("POST", path, body)

    def add_node(self, name: str, labels: dict[str, str], allocatable: dict[str, str],
                 taints: list[dict] | None = None) -> None:
        """A Node as a kubelet would register it, Ready, with no kubelet behind it."""
        self.create("/api/v1/nodes", {"apiVersion": "v1", "kind": "Node",
                                      "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **labels}},
                                      "spec": {"taints": taints or []}})
        status = {"capacity": allocatable, "allocatable": allocatable,
                  "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                                  "message": "fake node", "lastHeartbeatTime": _now(), "lastTransitionTime": _now()}]}
        self.request("PATCH", f"/api/v1/nodes/{name}/status", {"status": status},
                     content_type="application/merge-patch+json")
        # Admission taints a new node not-ready until the node lifecycle controller sees it Ready; that controller
        # is off (no kubelet heartbeats), so the node's taints are set to its own, as that controller would.
        self.request("PATCH", f"/api/v1/nodes/{name}", {"spec": {"taints": taints or None}},
                     content_type="application/merge-patch+json")

    def add_volume(self, name: str, access_modes: list[str], size: str, claim: tuple[str, str] | None = None,
                   storage_class: str = "") -> None:
        """A PersistentVolume (hostPath: nothing mounts it here), optionally reserved for one claim; with a storage
        class, as a provisioner of that class would have made it for any claim of the class."""
        spec = {"capacity": {"storage": size}, "accessModes": access_modes, "storageClassName": storage_class,
                "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{name}"}}
        if claim:
            spec["claimRef"] = {"namespace": claim[0], "name": claim[1]}
        self.create("/api/v1/persistentvolumes", {"apiVersion": "v1", "kind": "PersistentVolume",
                                                  "metadata": {"name": name}, "spec": spec})

    def pods(self, namespace: str) -> list[dict]:
        return self.request("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _wait_ready(server: str, deadline_s: float, processes: dict[str, subprocess.Popen], logs: Path) -> None:
    cluster = Cluster(server, Path())
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for name, process in processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}: "
                                   f"{(logs / f'{name}.log').read_text()[-2000:]}")
        with contextlib.suppress(Exception):
            cluster.request("GET", "/api/v1/namespaces/default")
            return
        time.sleep(0.5)
    log = (logs / "kube-apiserver.log").read_text()[-2000:]
    raise TimeoutError(f"kube-apiserver not ready in {deadline_s} s: {log}")


@contextlib.contextmanager
def running(workdir: Path, startup_s: float = 90) -> Iterator[Cluster]:
    tools = binaries()
    workdir.mkdir(parents=True, exist_ok=True)
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    subprocess.run(["openssl", "genrsa", "-out", str(workdir / "sa.key"), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(workdir / "sa.key"), "-pubout", "-out", str(workdir / "sa.pub")],
                   check=True, capture_output=True)
    (workdir / "tokens.csv").write_text(f'{TOKEN},mesh-test-admin,1,"system:masters"\n')
    etcd_port, etcd_peer, api_port = free_port(), free_port(), free_port()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = workdir / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "mesh",
        "clusters": [{"name": "mesh", "cluster": {"server": server, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "admin", "user": {"token": TOKEN}}],
        "contexts": [{"name": "mesh", "context": {"cluster": "mesh", "user": "admin"}}]}))
    commands = {
        "etcd": [tools["etcd"], "--name", "mesh", "--data-dir", str(workdir / "etcd"),
                 "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
                 "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
                 "--initial-cluster", f"mesh=http://127.0.0.1:{etcd_peer}"],
        "kube-apiserver": [tools["kube-apiserver"], f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                           "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={api_port}",
                           "--insecure-port=0", f"--cert-dir={workdir / 'certs'}",
                           f"--token-auth-file={workdir / 'tokens.csv'}", "--authorization-mode=RBAC",
                           "--service-account-issuer=https://kubernetes.default.svc",
                           f"--service-account-key-file={workdir / 'sa.pub'}",
                           f"--service-account-signing-key-file={workdir / 'sa.key'}",
                           "--service-cluster-ip-range=10.96.0.0/16", "--disable-admission-plugins=ServiceAccount",
                           "--allow-privileged=false"],
        "kube-scheduler": [tools["kube-scheduler"], f"--kubeconfig={kubeconfig}", "--leader-elect=false",
                           "--port=0", "--bind-address=127.0.0.1", f"--secure-port={free_port()}"],
        "kube-controller-manager": [tools["kube-controller-manager"], f"--kubeconfig={kubeconfig}",
                                    "--leader-elect=false", "--port=0", "--bind-address=127.0.0.1",
                                    f"--secure-port={free_port()}", "--controllers=*,-nodelifecycle",
                                    "--use-service-account-credentials=false"],
    }
    processes: dict[str, subprocess.Popen] = {}
    try:
        for name, command in commands.items():
            with (logs / f"{name}.log").open("w") as log:
                processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True)
            if name == "kube-apiserver":
                _wait_ready(server, startup_s, processes, logs)
        yield Cluster(server, kubeconfig)
    finally:
        for process in reversed(list(processes.values())):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
