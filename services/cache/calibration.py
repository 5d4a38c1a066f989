"""The semantic cache's calibration: for the cache's embedder, the cosine threshold that keeps near-miss false
hits within each false-hit budget, the gate in front (written by `python -m tools.calibrate_semantic` into
config/semantic-calibration.yaml). The router refuses a registry that asks for a budget with no calibration; the
cache turns a budget into its threshold."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel

# Data, not code: written by `python -m tools.calibrate_semantic`, read by the cache (thresholds) and the router
# (which refuses a registry asking for a budget without one). The services image copies config/ beside services/.
CALIBRATION_FILE = Path(__file__).resolve().parents[2] / "config" / "semantic-calibration.yaml"


class UncalibratedBudget(ValueError):
    """A false-hit budget the calibration has no threshold for; the text says what to do."""


class SemanticCalibration(BaseModel, extra="allow"):
    embedder: str
    gate: str
    thresholds: dict[float, float]

    @classmethod
    def load(cls, path: Path = CALIBRATION_FILE) -> SemanticCalibration:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    def threshold(self, budget: float) -> float:
        found = self.thresholds.get(round(budget, 6))
        if found is None:
            raise UncalibratedBudget(
                f"no calibration for a semantic false-hit budget of {budget:g} with embedder {self.embedder!r}; "
                f"calibrated: {sorted(self.thresholds)} (add one: python -m tools.calibrate_semantic)")
        return found

    def check(self, budget: float, embedder: str | None = None) -> None:
        if embedder is not None and embedder != self.embedder:
            raise UncalibratedBudget(f"the semantic cache is calibrated for embedder {self.embedder!r}, not "
                                     f"{embedder!r}: run python -m tools.calibrate_semantic for it")
        self.threshold(budget)
