"""Shared pieces of the demo-app tests: a tiny pipeline folder, a loopback server, headless Chromium."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any

# The flags this machine's Chromium needs headless and offline: no sandbox as root, no GPU, and no
# background traffic (component updates, sync, QUIC), which a closed network refuses noisily.
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-extensions", "--disable-default-apps",
]
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_tiny_pipe(directory: Path) -> Any:
    """A random NextDiT_debug with patch 16 in pixel space, conditioned by the packaged MiniLM.

    Patch 16 on pixels gives the real FLUX-VAE setup's size multiple (16), so snapping behaves as
    it does for the 2B model; MiniLM loads in a second where the tiny Gemma-2 trains a tokenizer
    first, which keeps the app tests well under a minute.
    """
    from lumina_lightning.encoders.text import minilm_path
    from lumina_lightning.sampling.testing import build_tiny_pipeline

    return build_tiny_pipeline(directory, text_encoder_path=minilm_path(), patch_size=16)


def build_pipeline_folder(directory: Path) -> Path:
    """:func:`build_tiny_pipe` saved as our pipeline folder (what ``lumina demo --ckpt`` serves)."""
    from lumina_lightning.sampling.pipeline_io import save_pipeline

    pipe = build_tiny_pipe(directory)
    path = directory / "pipeline"
    save_pipeline(path, pipe.model, text_encoder_spec={"path": "minilm", "max_length": 256},
                  autoencoder_spec={"kind": "pixel"})
    return path


def start_server(service: Any, *, concurrency: int = 1) -> tuple[Any, str]:
    """Build the Blocks app on ``service`` and serve it on a free loopback port; returns (demo, url)."""
    from lumina_lightning.ui.gradio_app import build_demo, launch

    demo = build_demo(service, concurrency=concurrency)
    port = free_port()
    launch(demo, service, host="127.0.0.1", port=port, block=False)
    return demo, f"http://127.0.0.1:{port}/"


def chromium_executable() -> str | None:
    """Debian's Chromium (package ``chromium``), or ``$CHROMIUM`` when set."""
    env = os.environ.get("CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


class TrackedPipe:
    """A pipeline wrapper that records, per call, the sampling steps done and how it ended, and how
    many calls ran at once; ``delay`` seconds per step make a call slow enough to cancel mid-run."""

    def __init__(self, pipe: Any, delay: float = 0.0) -> None:
        import threading

        self._pipe = pipe
        self._lock = threading.Lock()
        self.delay = delay
        self.active = 0
        self.max_active = 0
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, *args: Any, progress: Any = None, **kwargs: Any) -> Any:
        import time

        call: dict[str, Any] = {"steps": 0, "error": None, "done": False}
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(call)

        def on_step(step: int, total: int) -> None:
            call["steps"] = step
            time.sleep(self.delay)
            if callable(progress):
                progress(step, total)

        try:
            return self._pipe(*args, progress=on_step, **kwargs)
        except BaseException as err:
            call["error"] = type(err).__name__
            raise
        finally:
            with self._lock:
                self.active -= 1
            call["done"] = True

    def wait(self, condition: Any, timeout: float = 60.0) -> None:
        """Poll until ``condition()`` holds (AssertionError after ``timeout`` s)."""
        import time

        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out waiting"
            time.sleep(0.01)
