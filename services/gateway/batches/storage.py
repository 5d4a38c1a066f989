"""Where a file's bytes live: a local directory (one machine, or a volume every replica mounts). Keys are the file
ids the mesh made: no caller-chosen name reaches a path."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Protocol

_ID = re.compile(r"^file-[0-9a-f]{24,32}$")


def _checked(file_id: str) -> str:
    if not _ID.match(file_id):
        raise ValueError(f"not a file id the mesh made: {file_id[:60]!r}")
    return file_id


class FileStorage(Protocol):
    def put(self, file_id: str, data: bytes) -> None: ...
    def get(self, file_id: str) -> bytes: ...
    def delete(self, file_id: str) -> None: ...


class LocalDirectory:
    def __init__(self, root: Path) -> None:
        self._root = root
        root.mkdir(parents=True, exist_ok=True)

    def put(self, file_id: str, data: bytes) -> None:
        # Written beside and renamed: a reader never sees half a file, a crash leaves no partial one.
        target = self._root / _checked(file_id)
        handle, temporary = tempfile.mkstemp(dir=self._root, prefix=".upload-")
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def get(self, file_id: str) -> bytes:
        return (self._root / _checked(file_id)).read_bytes()

    def delete(self, file_id: str) -> None:
        (self._root / _checked(file_id)).unlink(missing_ok=True)
