"""The import contracts in .importlinter (which package may import which), checked on every test run, and shown
to bite: the same tool on a contract the code breaks reports it broken."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'gen'}"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(config), "--no-cache"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_the_project_keeps_its_import_contracts():
    result = _lint(ROOT / ".importlinter")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_broken_contract_is_reported(tmp_path):
    # The gateway does read the cache's Redis format: forbidding it must fail, naming the import.
    config = tmp_path / "contracts.ini"
    config.write_text("[importlinter]\nroot_packages =\n    services\n\n"
                      "[importlinter:contract:probe]\nname = probe\ntype = forbidden\n"
                      "source_modules =\n    services.gateway\nforbidden_modules =\n    services.cache.reads\n")
    result = _lint(config)
    assert result.returncode != 0
    assert "services.gateway" in result.stdout and "services.cache.reads" in result.stdout
