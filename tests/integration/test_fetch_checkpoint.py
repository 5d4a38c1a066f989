"""tools.fetch_checkpoint (the chart's fetch-checkpoint init container) with the real huggingface_hub client
against a local Hub on loopback (HF_ENDPOINT, as a mirror is named): the Hub's model-info, tree and resolve
endpoints as that client calls them, a private repository behind a token, and the answers the Hub gives a client
without access. Nothing leaves the machine."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.fetch_checkpoint import MARKER, FetchError, HubSource

ROOT = Path(__file__).resolve().parents[2]

COMMIT = "3c1f" * 10
FILES = {
    "config.json": json.dumps({"architectures": ["LlamaForCausalLM"]}).encode(),
    "model.safetensors": bytes(range(256)) * 64,
    "tokenizer.json": b'{"model": {}}',
    "model.gguf": b"not wanted" * 100,  # another format in the same repository: never fetched
}
TOKEN = "hf_test_token"


class LocalHub(http.server.ThreadingHTTPServer):
    """Public repo org/public, private repo org/private (needs TOKEN), nothing else."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.requests: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(http.server.BaseHTTPRequestHandler):
    server: LocalHub

    def log_message(self, *args) -> None:
        pass

    def _answer(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(f"{self.command} {path}")
        repo = "/".join(path.removeprefix("/api/models/").split("/")[:2]) if path.startswith("/api/") else \
            "/".join(path.lstrip("/").split("/")[:2])
        if repo not in ("org/public", "org/private") or (
                repo == "org/private" and self.headers.get("authorization") != f"Bearer {TOKEN}"):
            # What the Hub answers for a repository the caller cannot see.
            return self._answer(401, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if "/tree/" in path:
            entries = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                       for name, data in FILES.items()]
            return self._answer(200, json.dumps(entries).encode(), {"Content-Type": "application/json"})
        if path.startswith("/api/models/"):
            info = {"id": repo, "sha": COMMIT, "siblings": [{"rfilename": name} for name in FILES]}
            return self._answer(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        name = path.split(f"/resolve/{COMMIT}/", 1)[-1]
        if name not in FILES:
            return self._answer(404, b"", {"X-Error-Code": "EntryNotFound"})
        data = FILES[name]
        return self._answer(200, data, {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

    do_HEAD = do_GET


@pytest.fixture()
def hub() -> Iterator[LocalHub]:
    server = LocalHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def run_fetch(hub: LocalHub, uri: str, out: Path, token: str = "") -> subprocess.CompletedProcess:
    """The init container's command, with the Hub named as a mirror is (HF_ENDPOINT)."""
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_DISABLE_TELEMETRY": "1",
           "HF_HOME": str(out.parent / ".hf-home")}
    return subprocess.run([sys.executable, "-m", "tools.fetch_checkpoint", uri, str(out)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def fetch(hub: LocalHub, uri: str, out: Path, token: str = "") -> dict:
    result = run_fetch(hub, uri, out, token)
    if result.returncode != 0:
        raise FetchError(result.stderr.strip().splitlines()[-1])
    return json.loads((out / MARKER).read_text())


def test_a_checkpoint_is_fetched_once_with_only_what_its_conversion_reads(hub, tmp_path: Path):
    out = tmp_path / "hf" / "SmolLM2"
    record = fetch(hub, "hf://org/public@main", out)
    assert record["commit"] == COMMIT
    wanted = {name for name in FILES if not name.endswith(".gguf")}
    assert {p.name for p in out.iterdir()} == wanted | {MARKER}
    assert all((out / name).read_bytes() == FILES[name] for name in wanted)
    asked = len(hub.requests)
    assert fetch(hub, "hf://org/public@main", out) == record
    assert len(hub.requests) == asked, "a finished checkpoint is not fetched again"


def test_a_private_checkpoint_needs_the_token_and_says_so(hub, tmp_path: Path):
    out = tmp_path / "hf" / "private"
    with pytest.raises(FetchError, match=r"not found, or private.*HF_TOKEN is not set"):
        fetch(hub, "hf://org/private", out)
    assert not out.exists() and not any((tmp_path / "hf").glob(".private.partial/*.json"))
    assert fetch(hub, "hf://org/private", out, token=TOKEN)["commit"] == COMMIT
    assert all(request.startswith(("GET", "HEAD")) for request in hub.requests)


def test_a_fetch_cut_short_is_started_again_and_another_uri_replaces_the_checkpoint(hub, tmp_path: Path):
    out = tmp_path / "hf" / "model"
    staging = tmp_path / "hf" / ".model.partial"
    staging.mkdir(parents=True)
    (staging / "model.safetensors").write_bytes(b"half")
    fetch(hub, "hf://org/public", out)
    assert (out / "model.safetensors").read_bytes() == FILES["model.safetensors"] and not staging.exists()
    (out / MARKER).write_text(json.dumps({"uri": "hf://org/other", "commit": "0" * 40}))
    asked = len(hub.requests)
    fetch(hub, "hf://org/public", out)
    assert len(hub.requests) > asked and json.loads((out / MARKER).read_text())["uri"] == "hf://org/public"


@pytest.mark.parametrize("uri", ["s3://bucket/model", "hf://org", "hf://org/../etc", "hf:///name", "org/name"])
def test_a_uri_it_cannot_fetch_is_refused_before_any_request(uri):
    with pytest.raises(FetchError):
        HubSource.parse(uri)
