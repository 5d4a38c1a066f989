"""A directory updated as the kubelet updates a mounted Secret (its AtomicWriter): the files in a new hidden
directory, `..data` swapped to it by a rename, the visible names links through `..data`. What cert-manager's
renewals look like to a pod."""

from __future__ import annotations

import os
from pathlib import Path


def atomic_write(directory: Path, files: dict[str, bytes], generation: int) -> None:
    version = directory / f"..generation_{generation}"
    version.mkdir(parents=True)
    for name, content in files.items():
        (version / name).write_bytes(content)
    staging = directory / "..data_tmp"
    staging.symlink_to(version.name)
    os.rename(staging, directory / "..data")
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
