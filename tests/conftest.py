"""Shared test set-up: offline, no telemetry, deterministic, fast."""

from __future__ import annotations

import os

# Tests never reach the network (CI has none); set before any HF/gradio/mlflow import.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402
import torch  # noqa: E402


# Tiny models: one thread is faster than two on a 2-core box (no oversubscription with the
# subprocesses some tests start, and steadier timings when the machine is shared).
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Tiny ops run far faster single-threaded on 2-core CI machines (for tests whose code changed it)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Every test starts from fp32 defaults and a fixed seed."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


def pytest_collection_modifyitems(config, items):
    """`gpu`-marked tests skip cleanly where CUDA is absent (even if selected with -m gpu)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
