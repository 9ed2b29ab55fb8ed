"""``lumina demo``: serve the Gradio app on a checkpoint.

    lumina demo --ckpt runs/tiny_stage1_lowres/export
    lumina demo --ckpt Lumina-Image-2.0/ --device cuda            # a diffusers folder
    lumina demo --ckpt consolidated.00-of-01.pth --text-encoder gemma-2-2b --vae flux-vae

Binds 127.0.0.1 unless ``--listen`` (all interfaces) or ``--host`` says otherwise; gradio's analytics
are off; a public share link is made only with ``--share``. Without a checkpoint it refuses (exit
code 2) and says how to train the tiny model offline.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    from lumina_lightning.serving import DEFAULT_MAX_IMAGES, DEFAULT_MAX_PIXELS, DEFAULT_MAX_STEPS

    p = argparse.ArgumentParser(
        prog="lumina demo",
        description="Serve a text-to-image demo (Gradio) on a checkpoint: pipeline folder, training .ckpt, "
        "diffusers Lumina2 folder, or a bare transformer checkpoint with --text-encoder and --vae.",
    )
    p.add_argument("--ckpt", default=None, help="what to serve (required)")
    p.add_argument("--text-encoder", default=None, help="text-encoder folder (or 'minilm'); overrides the checkpoint's")
    p.add_argument("--vae", default=None, help="VAE folder or 'pixel'; overrides the checkpoint's")
    p.add_argument("--host", default=None, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--listen", action="store_true",
                   help="bind 0.0.0.0 unless --host is given: anyone who can reach this machine can use the demo")
    p.add_argument("--share", action="store_true",
                   help="also make a public gradio.live link (off by default; needs internet access)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"per-image pixel budget, width x height (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-images", type=int, default=DEFAULT_MAX_IMAGES,
                   help=f"most images per request (default {DEFAULT_MAX_IMAGES})")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS,
                   help=f"most solver steps per request (default {DEFAULT_MAX_STEPS})")
    p.add_argument("--resolution", type=int, default=None,
                   help="side of the square resolution preset, a multiple of the model's size step (autoencoder "
                   "downsample x patch size; refused otherwise) (default: the resolution the checkpoint records, "
                   "else 64 tokens a side for latent models (1024 px with the FLUX VAE), 16 for pixel-space ones)")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--concurrency", type=int, default=1,
                   help="generations at once; others wait in the queue (default 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # gradio reads these when it is imported: no usage analytics, no hub telemetry
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

    from lumina_lightning.serving import DemoService, ServeConfig, no_checkpoint_message

    if not args.ckpt or not Path(args.ckpt).exists():
        print(no_checkpoint_message(args.ckpt), file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"lumina demo: error: --port must be between 1 and 65535, got {args.port}", file=sys.stderr)
        return 2
    for name in ("max_pixels", "max_images", "max_steps", "concurrency", "resolution"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            print(f"lumina demo: error: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}",
                  file=sys.stderr)
            return 2
    # --listen only changes the default host: an explicit --host wins (binding 0.0.0.0 instead of the
    # address asked for would expose the demo on every interface)
    host = args.host or ("0.0.0.0" if args.listen else DEFAULT_HOST)
    if args.share:
        print("lumina demo: warning: --share asks gradio for a public gradio.live link; it needs internet access "
              "(it downloads a tunnel client and registers with gradio's servers) and makes the demo reachable by "
              "anyone with the link.", file=sys.stderr)
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"lumina demo: note: binding {host}; the demo is reachable from other machines.", file=sys.stderr)

    from lumina_lightning.models.io import CheckpointMismatchError
    from lumina_lightning.sampling.cli import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as err:
        print(f"lumina demo: error: {err}", file=sys.stderr)
        return 2
    config = ServeConfig(max_pixels=args.max_pixels, max_images=args.max_images, max_steps=args.max_steps,
                         resolution=args.resolution, checkpoint=str(args.ckpt), concurrency=args.concurrency)
    try:
        service = DemoService.from_checkpoint(args.ckpt, text_encoder=args.text_encoder, vae=args.vae,
                                              device=device, config=config)
    except (FileNotFoundError, ValueError, KeyError, CheckpointMismatchError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"lumina demo: error: cannot load {args.ckpt}: {msg}", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - e.g. a corrupt file: safetensors/pickle errors have their own types
        print(f"lumina demo: error: cannot load {args.ckpt}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    try:  # needs the loaded model's size multiple
        service.check_resolution()
    except ValueError as err:
        print(f"lumina demo: error: {err}", file=sys.stderr)
        service.close()
        return 2

    from lumina_lightning.ui.gradio_app import build_demo, launch

    # SIGTERM (docker stop, systemd, kill) ends the server like Ctrl+C: gradio's wait loop closes the
    # server on KeyboardInterrupt, and the PNG folder is removed below.
    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        demo = build_demo(service)  # --concurrency comes with the service's config
        print(f"lumina demo: loaded {args.ckpt}; starting the server on {host}:{args.port}", file=sys.stderr)
        launch(demo, service, host=host, port=args.port, share=args.share, block=True)
    except OSError as err:  # port taken, address not available
        print(f"lumina demo: error: cannot serve on {host}:{args.port}: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
        service.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
