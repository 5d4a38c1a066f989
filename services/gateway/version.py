"""The mesh's name and version, read from pyproject.toml: the one place the version is written (the container
image copies it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

_PROJECT = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
MESH_NAME: str = _PROJECT["name"]
MESH_VERSION: str = _PROJECT["version"]
