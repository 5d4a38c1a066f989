"""The Helm chart rendered by the real helm, for the tests that read what it renders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "inference-mesh"
HELM = ROOT / ".venv-k8s" / "bin" / "helm"
NAMESPACE = "mesh"


def render_chart(value_set: str, *sets: str, namespace: str = NAMESPACE) -> list[dict]:
    """The objects of values-<value_set>.yaml with `--set` values `sets` (each "key=value")."""
    if not HELM.exists():
        pytest.fail(f"{HELM} is missing: `make k8s-tools` installs helm (`make test` does it first)")
    command = [str(HELM), "template", "mesh", str(CHART), "--namespace", namespace,
               "-f", str(CHART / f"values-{value_set}.yaml")]
    for value in sets:
        command += ["--set", value]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]
