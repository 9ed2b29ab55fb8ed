"""Bad-input bookkeeping: a skip reason type, a counter, and the skip-rate check.

A long run must neither die on one bad file nor hide bad files. Every sample that cannot be used is
counted under a reason, logged, and the run stops with a clear message only when the fraction of
skipped samples passes a threshold (``DataConfig.max_skip_rate``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

log = logging.getLogger("lumina_lightning.data")

# Reasons a sample is skipped. Kept as plain strings so counts travel in batches and checkpoints.
MISSING_FILE = "missing_file"  # the image path does not exist
UNREADABLE_IMAGE = "unreadable_image"  # truncated, corrupt, unsupported, or failed to convert
EMPTY_CAPTION = "empty_caption"  # no caption level with non-blank text
TOO_SMALL = "too_small"  # needs upscaling beyond DataConfig.max_upscale with min_size_policy="skip"
UNREADABLE_CACHE = "unreadable_cache"  # a cached tensor cannot be read (damaged shard)
SKIP_REASONS = (MISSING_FILE, UNREADABLE_IMAGE, EMPTY_CAPTION, TOO_SMALL, UNREADABLE_CACHE)

# Not skips: events worth counting (and reporting by `lumina data inspect`) but harmless.
UPSCALED = "upscaled"  # a small image was upscaled to its bucket (min_size_policy="upscale")


class BadSample(Exception):
    """Raised by the decode path for one unusable sample; carries the skip ``reason``."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class SkipRateExceeded(RuntimeError):
    """The fraction of skipped samples passed ``max_skip_rate``; the message says what and why."""


@dataclass
class SkipCounter:
    """Counts samples seen and skipped (by reason), plus a few examples per reason for messages.

    It is a plain picklable object: workers put per-batch counts into each batch and the main
    process merges them here (see :class:`lumina_lightning.data.loader.LuminaDataLoader`), so the
    totals are right for any ``num_workers``. Its ``state_dict`` goes into checkpoints so the rate
    is computed over the whole run, not just since the last resume.
    """

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 3

    @property
    def num_skipped(self) -> int:
        return int(sum(self.skipped.values()))

    @property
    def rate(self) -> float:
        return self.num_skipped / self.seen if self.seen else 0.0

    def add(self, reason: str, example: str | None = None, seen: bool = True) -> None:
        """Count one skipped sample (and, by default, one seen sample)."""
        self.skipped[reason] += 1
        if seen:
            self.seen += 1
        if example is not None:
            bucket = self.examples.setdefault(reason, [])
            if len(bucket) < self.max_examples:
                bucket.append(example)

    def merge(self, report: Mapping[str, Any]) -> None:
        """Merge a per-batch report (see :meth:`report`) or another counter's state dict."""
        self.seen += int(report.get("seen", 0))
        self.skipped.update({k: int(v) for k, v in report.get("skipped", {}).items()})
        self.events.update({k: int(v) for k, v in report.get("events", {}).items()})
        for reason, items in report.get("examples", {}).items():
            bucket = self.examples.setdefault(reason, [])
            for item in items:
                if len(bucket) < self.max_examples and item not in bucket:
                    bucket.append(item)

    def report(self) -> dict[str, Any]:
        """A small, picklable, JSON-able dict of the counts (what a batch carries)."""
        return {
            "seen": self.seen,
            "skipped": dict(self.skipped),
            "events": dict(self.events),
            "examples": {k: list(v) for k, v in self.examples.items()},
        }

    state_dict = report

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seen, self.skipped, self.events, self.examples = 0, Counter(), Counter(), {}
        self.merge(state)

    def summary(self) -> str:
        """One human-readable line: totals, rate and each reason with an example."""
        if not self.num_skipped:
            return f"0 of {self.seen} samples skipped"
        parts = []
        for reason, count in self.skipped.most_common():
            example = self.examples.get(reason)
            parts.append(f"{reason}: {count}" + (f" (e.g. {example[0]})" if example else ""))
        return f"{self.num_skipped} of {self.seen} samples skipped ({self.rate:.1%}): " + "; ".join(parts)

    def check(self, max_rate: float, min_seen: int, where: str = "data") -> None:
        """Raise :class:`SkipRateExceeded` when ``rate > max_rate`` once ``seen >= min_seen``."""
        if self.seen >= max(1, min_seen) and self.rate > max_rate:
            raise SkipRateExceeded(
                f"{where}: too many bad samples, {self.summary()}. The limit is max_skip_rate="
                f"{max_rate:.1%} (checked after {min_seen} samples). Fix or remove the files named above, "
                "or raise data.max_skip_rate if this is expected."
            )
