"""Caption-level choice: weighted statistics, determinism, fallback order, empty captions."""

from __future__ import annotations

from collections import Counter

import pytest

from lumina_lightning.data.captions import DEFAULT_FALLBACK, choose_caption
from lumina_lightning.data.config import DataConfig

FULL = {"short": "s", "medium": "m", "long": "l", "tags": "t"}


def test_weighted_choice_statistics():
    weights = {"short": 0.5, "medium": 0.3, "long": 0.2}
    n = 6000
    counts = Counter(choose_caption(FULL, weights, seed=3, epoch=0, index=i)[0] for i in range(n))
    assert set(counts) == set(weights)  # "tags" has no weight: never chosen
    chi2 = sum((counts[k] - n * p) ** 2 / (n * p) for k, p in weights.items())
    assert chi2 < 13.8  # chi-square, 2 dof, p = 0.001


def test_weights_renormalise_over_present_levels():
    weights = {"short": 0.5, "medium": 0.3, "long": 0.2}
    caps = {"medium": "m", "long": "l"}
    n = 4000
    counts = Counter(choose_caption(caps, weights, seed=0, epoch=1, index=i)[0] for i in range(n))
    assert abs(counts["medium"] / n - 0.6) < 0.04 and abs(counts["long"] / n - 0.4) < 0.04


def test_empty_weights_are_uniform():
    n = 4000
    counts = Counter(choose_caption(FULL, {}, seed=0, index=i)[0] for i in range(n))
    assert all(abs(c / n - 0.25) < 0.04 for c in counts.values()) and len(counts) == 4


def test_choice_is_deterministic_per_seed_epoch_index():
    weights = {"short": 1, "long": 1}
    a = [choose_caption(FULL, weights, seed=1, epoch=2, index=i) for i in range(200)]
    assert a == [choose_caption(dict(reversed(FULL.items())), weights, seed=1, epoch=2, index=i) for i in range(200)]
    assert a != [choose_caption(FULL, weights, seed=1, epoch=3, index=i) for i in range(200)]
    assert a != [choose_caption(FULL, weights, seed=2, epoch=2, index=i) for i in range(200)]
    # a record's second listing in an epoch (source ratio >= 2) draws anew; copy 0 keeps the draws of
    # before copies existed (the value recorded then), so data without repeats keeps its captions
    assert a != [choose_caption(FULL, weights, seed=1, epoch=2, index=i, copy=1) for i in range(200)]
    assert a == [choose_caption(FULL, weights, seed=1, epoch=2, index=i, copy=0) for i in range(200)]
    from lumina_lightning.data.captions import caption_rng

    assert caption_rng(0, 3, 5).random() == 0.93943591756793


def test_fallback_order():
    weights = {"short": 1.0}
    assert DEFAULT_FALLBACK[:3] == ("long", "medium", "short")
    assert choose_caption({"medium": "m", "long": "l"}, weights) == ("long", "l")
    assert choose_caption({"medium": "m", "tags": "t"}, weights) == ("medium", "m")
    assert choose_caption({"caption": "c", "tags": "t"}, weights) == ("caption", "c")
    assert choose_caption({"tags": "t"}, weights, fallback=()) == ("tags", "t")
    # none of the fallback levels: alphabetically first available level
    assert choose_caption({"long_en": "e", "long_de": "d"}, weights) == ("long_de", "d")
    assert choose_caption({"medium": "m", "long": "l"}, weights, fallback=["medium"]) == ("medium", "m")


def test_blank_levels_are_absent_and_empty_is_none():
    assert choose_caption({"short": "   ", "long": " text "}, {"short": 1.0}) == ("long", "text")
    assert choose_caption({"short": "", "long": "\n"}, {"short": 1.0}) is None
    assert choose_caption({}, {}) is None


def test_config_validates_weights():
    with pytest.raises(ValueError, match="caption_weights"):
        DataConfig(caption_weights={"short": -1.0})
    with pytest.raises(ValueError, match="positive weight"):
        DataConfig(caption_weights={"short": 0.0})
    with pytest.raises(ValueError, match="did you mean 'caption_weights'"):
        DataConfig.from_dict({"caption_weight": {}})
    cfg = DataConfig.from_dict({"resolution": 64, "caption_weights": {"short": 0.7, "long": 0.3}})
    assert cfg.resolution == 64 and cfg.to_dict()["caption_weights"] == {"short": 0.7, "long": 0.3}


def test_config_works_with_omegaconf_structured():
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), {"resolution": 64, "caption_weights": {"short": 1.0}})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.caption_weights == {"short": 1.0}
