"""The demos' results: the fusion demo's bits per byte and the implicit demo's accuracy, by model and domain.

Its own module so that the demo (`fusemerge.demo.fusion`, which fills it) and the report
(`fusemerge.demo.report`, which prints and draws it) both import it and not each other.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# The implicit demo's rows that its claims compare (the rest are named after their models).
PIVOT_LABEL = "pivot"
SFT_LABEL = "SFT only"
# The fusion demo's rows of the paper's setting: "fused with code specialist (paper's setting)"; the rows
# without it are the recommended setting's, the ones the claims are about.
PAPER_SUFFIX = " (paper's setting)"


def preference_label(loss: str) -> str:
    """The implicit demo's row of the SFT + preference target trained with `loss`."""
    return f"SFT + {loss.upper()}"


@dataclass
class DemoResult:
    """Bits per byte by model label and domain (plus "average", the mean over domains)."""

    bits_per_byte: dict[str, dict[str, float]]  # in table order
    folders: dict[str, Path]
    seconds: float = 0.0
    varm_weights: list[float] = field(default_factory=list)  # the first target's W per matrix

    @property
    def labels(self) -> list[str]:
        """The table's rows, in order."""
        return list(self.bits_per_byte)

    def to_json(self) -> str:
        return json.dumps(
            {
                "bits_per_byte": self.bits_per_byte,
                "models": {k: str(v) for k, v in self.folders.items()},
                "varm_weights_of_first_target": [round(w, 4) for w in self.varm_weights],
                "seconds": round(self.seconds, 1),
            },
            indent=1,
        )


@dataclass
class ImplicitResult:
    """The implicit-fusion demo's held-out accuracy by model label and domain (plus "average")."""

    accuracy: dict[str, dict[str, float]]  # in table order
    folders: dict[str, Path]
    pipeline: dict = field(default_factory=dict)  # per-model sample accuracy, SFT and pair counts
    seconds: float = 0.0

    @property
    def labels(self) -> list[str]:
        """The table's rows, in order."""
        return list(self.accuracy)

    def to_json(self) -> str:
        return json.dumps(
            {
                "accuracy": self.accuracy,
                "models": {k: str(v) for k, v in self.folders.items()},
                "pipeline": self.pipeline,
                "seconds": round(self.seconds, 1),
            },
            indent=1,
        )
