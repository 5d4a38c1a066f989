"""Fetches a GPU pool's Hugging Face checkpoint into the directory its engine build reads, once: the chart's
`fetch-checkpoint` init container, before the engine build, on every Triton pod of a GPU pool.

    python -m tools.fetch_checkpoint hf://HuggingFaceTB/SmolLM2-135M-Instruct@main /models/hf/SmolLM2-135M-Instruct

hf://<org>/<name>[@<revision>]: from the Hugging Face Hub (HF_ENDPOINT for a mirror), with HF_TOKEN for gated or
private models. The files land in a staging directory and are renamed into place with a marker naming the URI and
the commit fetched, so a pod restarted mid-download fetches again and a finished checkpoint is never fetched twice;
replicas sharing the volume wait on one lock. pvc://<claim> needs no fetch (the chart mounts the claim).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

# What a causal-LM checkpoint's conversion reads: config, weights and their index, tokenizer files. Not the
# repository's other formats (GGUF, ONNX, original PyTorch pickles), often many times the size.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt"]
MARKER = ".fetched.json"


class FetchError(RuntimeError):
    pass


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    revision: str

    @classmethod
    def parse(cls, uri: str) -> HubSource:
        if not uri.startswith("hf://"):
            raise FetchError(f"{uri!r}: only hf://<org>/<name>[@<revision>] is fetched (pvc:// is mounted, no fetch)")
        path, _, revision = uri.removeprefix("hf://").partition("@")
        parts = path.split("/")
        if len(parts) != 2 or not all(parts) or any(p in (".", "..") for p in parts):
            raise FetchError(f"{uri!r}: expected hf://<org>/<name>[@<revision>]")
        return cls(path, revision or "main")


def fetched(out: Path, uri: str) -> dict | None:
    try:
        record = json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None  # absent or unreadable: fetched again
    return record if isinstance(record, dict) and record.get("uri") == uri else None


def fetch(uri: str, out: Path, token: str | None = None) -> dict:
    """The checkpoint at `out`, fetched unless already there from the same URI; the marker's record."""
    source = HubSource.parse(uri)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (out.parent / f".{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # replicas on a shared volume: one fetches, the others find it done
        if record := fetched(out, uri):
            return record
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

        staging = out.parent / f".{out.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            commit = HfApi(token=token).model_info(source.repo_id, revision=source.revision).sha
            snapshot_download(source.repo_id, revision=commit, local_dir=staging, token=token,
                              allow_patterns=ALLOW_PATTERNS)
        except GatedRepoError as error:
            raise FetchError(f"{uri}: gated; accept its terms on the Hub and give a token with access "
                             f"(models.tokenSecret; HF_TOKEN is {'set' if token else 'not set'})") from error
        except RepositoryNotFoundError as error:
            raise FetchError(f"{uri}: not found, or private and the token cannot read it "
                             f"(HF_TOKEN is {'set' if token else 'not set'})") from error
        except HfHubHTTPError as error:
            raise FetchError(f"{uri}: the Hub answered {error}") from error
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        if not (staging / "config.json").exists():
            raise FetchError(f"{uri}@{commit}: no config.json: not a Hugging Face model checkpoint")
        record = {"uri": uri, "commit": commit, "files": sorted(p.name for p in staging.iterdir())}
        (staging / MARKER).write_text(json.dumps(record))
        shutil.rmtree(out, ignore_errors=True)
        os.rename(staging, out)
        return record


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.fetch_checkpoint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("uri")
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    try:
        record = fetch(args.uri, args.out, os.environ.get("HF_TOKEN") or None)
    except FetchError as error:
        sys.exit(f"fetch-checkpoint: {error}")
    print(f"fetch-checkpoint: {args.uri} at {record['commit']} in {args.out} ({len(record['files'])} files)")


if __name__ == "__main__":
    main()
