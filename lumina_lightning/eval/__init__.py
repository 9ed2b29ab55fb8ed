"""Offline evaluation: mini-GenEval on the synthetic compositional data (issue #8, peers notes §D.4).

* :mod:`.detector` — rule-based detector for the synthetic renderer (colour segmentation against the
  background, connected components, shape templates); no weights, milliseconds per image.
* :mod:`.geneval` — GenEval's scoring rules (counts, colours, positions, exclusions) and summary.
* :mod:`.metrics` — detector validation on ground truth, PSNR/SSIM to a reference sampler, the
  fixed-timestep validation loss.
* :mod:`.run` — :func:`evaluate`: generate → save → score → results.json + reports.
* :mod:`.report` — Markdown/HTML reports, per-task image grids, the accuracy bar plot.
* :mod:`.tracking` — MLflow logging.
* :mod:`.cli` — ``lumina eval``.

Submodules are imported lazily, so ``import lumina_lightning.eval`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Detector": "detector",
    "detect": "detector",
    "evaluate_detections": "geneval",
    "relative_position": "geneval",
    "summarize": "geneval",
    "read_metadata": "geneval",
    "validate_detector": "metrics",
    "image_fidelity": "metrics",
    "validation_loss": "metrics",
    "evaluate": "run",
    "score_images": "run",
    "score_folder": "run",
    "read_results": "run",
    "confidence_intervals": "geneval",
    "paired_difference": "geneval",
    "prompt_blind_baseline": "metrics",
    "write_report": "report",
    "log_to_mlflow": "tracking",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
