"""Unified Next-DiT: the model, its named sizes, and checkpoint loading/saving in every layout."""

from lumina_lightning.models.config import SIZES, NextDiTConfig, config_for
from lumina_lightning.models.nextdit import (
    FACTORIES,
    NextDiT,
    NextDiT_2B_GQA_patch2_Adaln_Refiner,
    NextDiT_3B_GQA_patch2_Adaln_Refiner,
    NextDiT_4B_GQA_patch2_Adaln_Refiner,
    NextDiT_7B_GQA_patch2_Adaln_Refiner,
    NextDiT_debug,
    NextDiT_mini,
    NextDiT_small,
    NextDiT_tiny,
)
from lumina_lightning.models.io import CheckpointMismatchError, detect_format, load_nextdit, save_nextdit

__all__ = [
    "FACTORIES",
    "SIZES",
    "CheckpointMismatchError",
    "NextDiT",
    "NextDiTConfig",
    "NextDiT_2B_GQA_patch2_Adaln_Refiner",
    "NextDiT_3B_GQA_patch2_Adaln_Refiner",
    "NextDiT_4B_GQA_patch2_Adaln_Refiner",
    "NextDiT_7B_GQA_patch2_Adaln_Refiner",
    "NextDiT_debug",
    "NextDiT_mini",
    "NextDiT_small",
    "NextDiT_tiny",
    "config_for",
    "detect_format",
    "load_nextdit",
    "save_nextdit",
]
