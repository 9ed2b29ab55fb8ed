"""Ships the top-level ``recipes/`` inside the package as ``lumina_lightning/_recipes``.

Everything else about the build is declared in pyproject.toml. The recipes live at the top of the
checkout (``lightning run recipes/stage1_lowres.yaml``), outside the package folder, which
setuptools' declarative ``package-data`` cannot reach; without this copy a non-editable install
(``pip install .``, a wheel) had no recipes at all, and ``lumina train recipes/...`` only worked from
inside a checkout. ``lumina_lightning.training.recipe.packaged_recipes_dir`` finds either copy.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithRecipes(build_py):
    def run(self) -> None:
        super().run()
        src = Path("recipes")
        dst = Path(self.build_lib) / "lumina_lightning" / "_recipes"
        for path in sorted(src.rglob("*.yaml")):
            target = dst / path.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


setup(cmdclass={"build_py": BuildPyWithRecipes})
