"""ablate: Ray-orchestrated ablations of the NorMuon speedrun trainer.

    python -m ablate run experiments/smoke.yaml      # or the `ablate` console script

Importing the package is cheap: no Ray, torch or pyarrow at import time.
"""
from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
