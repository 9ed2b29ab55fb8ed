"""Console entry points: ``lumina VERB ...`` and ``lightning run RECIPE ...``.

One verb, one entry point. Each verb lives in the module that owns its logic and exposes
``main(argv: list[str]) -> int``; this file only dispatches, lazily, so that ``lumina --help``
does not pay for importing torch, Lightning, diffusers or gradio.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from typing import Any

# verb -> (module, one-line help). Modules are imported only when their verb runs.
VERBS: dict[str, tuple[str, str]] = {
    "train": ("lumina_lightning.training.run", "train from a YAML recipe (same as `lightning run RECIPE`)"),
    "sample": ("lumina_lightning.sampling.cli", "generate images from prompts with a checkpoint"),
    "caption": ("lumina_lightning.modules.caption_cli", "re-caption images with a UniCap captioner"),
    "convert": ("lumina_lightning.models.convert_cli", "convert Next-DiT checkpoints (lumina/official/diffusers)"),
    "eval": ("lumina_lightning.eval.cli", "mini-GenEval on the synthetic compositional data"),
    "demo": ("lumina_lightning.app", "serve the Gradio app on a checkpoint"),
    "data": ("lumina_lightning.data.cli", "dataset tools: synthetic data, caches, manifests"),
    "pipeline": ("lumina_lightning.training.pipeline", "run the end-to-end tiny pipeline"),
    "smoke": ("lumina_lightning.models.smoke", "build a Next-DiT and run one forward/backward"),
}


def check_input(path: str | os.PathLike, flag: str, kind: str | None = "file") -> None:
    """Refuse a ``flag`` path that is missing or of the wrong kind (``"file"`` / ``"dir"``; ``None``:
    either) with a ``ValueError`` naming the flag, which every verb turns into a one-line error and
    exit 2: checked before any model loads, so a typo costs no loading time and no traceback."""
    if not os.path.exists(path):
        raise ValueError(f"{flag} {path} does not exist")
    check_output(path, flag, kind)


def parse_args_with_input(parser: Any, argv: list[str] | None, attr: str, flag: str, find: Any = None) -> Any:
    """``parser``'s arguments (flags may follow the overrides), with the input file ``attr`` checked as
    :func:`check_input` does (a folder, not only a missing file, is named as such); usage error otherwise.
    ``find`` (path -> path) first maps the given path to the file to use (a recipe shipped with the install)."""
    args = parser.parse_intermixed_args(argv)
    if find is not None:
        setattr(args, attr, find(getattr(args, attr)))
    try:
        check_input(getattr(args, attr), flag)
    except ValueError as err:
        parser.error(str(err))
    return args


def check_output(path: str | os.PathLike, flag: str, kind: str = "dir") -> None:
    """Refuse a ``flag`` path that exists as the other kind (a file where a folder is written, or the
    reverse); a path that does not exist yet is fine. ``ValueError``, as :func:`check_input`."""
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a file, not a folder")
    if kind == "file" and os.path.isdir(path):
        raise ValueError(f"{flag} {path} is a folder, not a file")


def reproducing_command(script: str, argv: list[str] | None, env_keys: tuple[str, ...] = ()) -> str:
    """The command line that reproduces a benchmark script's output, to paste under a table made from it:
    as typed (``argv`` None: ``sys.argv``), else ``script`` (its path from the working folder) with
    ``argv`` for an in-process ``main(argv)``; the ``env_keys`` that are set (timing-relevant
    environment variables) go in front."""
    import shlex

    path = sys.argv[0] if argv is None else os.path.relpath(script)
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in env_keys if os.environ.get(k)]
    return " ".join([*env, "python", shlex.join([path, *(sys.argv[1:] if argv is None else argv)])])


def _usage() -> str:
    lines = ["usage: lumina VERB [ARGS...]", "", "verbs:"]
    width = max(len(v) for v in VERBS)
    for verb, (_, help_) in VERBS.items():
        lines.append(f"  {verb.ljust(width)}  {help_}")
    lines += ["", "`lumina VERB --help` shows the options of one verb."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(argv)
        sys.stdout.flush()  # in the try: a closed pipe shows here, not in the interpreter's exit flush
        return code
    except BrokenPipeError:
        # the reader went away (`lumina help | head -2`): not an error worth a traceback. Point stdout at
        # /dev/null so the interpreter's final flush does not raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from lumina_lightning import __version__

        print(__version__)
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        import difflib

        close = difflib.get_close_matches(verb, VERBS, n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        print(f"lumina: unknown verb `{verb}`.{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name = VERBS[verb][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            print(f"lumina: the `{verb}` verb is not built yet in this version ({module_name} is missing).",
                  file=sys.stderr)
            return 3
        raise
    return int(module.main(rest) or 0)


def lightning_main(argv: list[str] | None = None) -> int:
    """The ``lightning`` console command.

    Lightning 2.6 ships no ``lightning`` command (only ``fabric``), so we provide one whose ``run``
    subcommand trains from a recipe: ``lightning run recipes/stage1_lowres.yaml key=value ...``.
    Any other subcommand is handed to another installed ``lightning`` CLI (lightning-sdk's) when one is
    importable, else it fails with a helpful message.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        rest = argv[1:]
        # `lightning run model script.py` was Lightning <=2.5's alias of `fabric run`.
        if rest and rest[0] == "model":
            print("lightning: `lightning run model` was removed from Lightning; use `fabric run SCRIPT`.",
                  file=sys.stderr)
            return 2
        return main(["train", *rest])
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: lightning run RECIPE.yaml [key=value ...]\n\n"
            "Trains from a lumina-lightning recipe (e.g. recipes/tiny/stage1_lowres.yaml).\n"
            "Dotted overrides such as trainer.max_steps=100 data.batch_size=8 may follow the recipe."
        )
        return 0
    try:
        importlib.import_module("lightning_sdk.cli.entrypoint")
    except ImportError:
        print(
            f"lightning: unknown command `{argv[0]}`. This `lightning` command (from lumina-lightning) only "
            "knows `run RECIPE.yaml`. Install `lightning-sdk` for the Lightning AI cloud CLI, or use `fabric` "
            "for Lightning Fabric scripts.",
            file=sys.stderr,
        )
        return 2
    env = dict(os.environ)
    return subprocess.call([sys.executable, "-m", "lightning_sdk.cli.entrypoint", *argv], env=env)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
