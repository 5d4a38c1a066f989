"""`python tools/k8s_validate.py VERSION FILE...`: every object in the YAML files checked against the Kubernetes
OpenAPI schema of VERSION (kubernetes-validate, strict: unknown fields are errors). Prints one JSON line per object:
{"kind", "name", "result": "valid" | "invalid" | "no-schema", "error"}. Runs in the chart tools' environment
(.venv-k8s, requirements/k8s.txt); objects of CRDs (ServiceMonitor, ...) have no schema there."""

from __future__ import annotations

import json
import sys

import kubernetes_validate
import yaml


def main() -> None:
    version, *files = sys.argv[1:]
    for path in files:
        with open(path) as handle:
            for doc in yaml.safe_load_all(handle):
                if not doc:
                    continue
                line = {"kind": doc.get("kind"), "name": doc.get("metadata", {}).get("name"), "result": "valid",
                        "error": ""}
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as exc:
                    line.update(result="invalid", error=str(exc)[:500])
                except kubernetes_validate.utils.SchemaNotFoundError:
                    line.update(result="no-schema")
                print(json.dumps(line))


if __name__ == "__main__":
    main()
