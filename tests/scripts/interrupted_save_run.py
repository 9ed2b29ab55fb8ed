"""Train a recipe whose checkpoint writes to ``last.ckpt`` die half-way (as a kill would), then report.

usage: interrupted_save_run.py RECIPE key=value ...   (run by tests/test_distributed.py)
Exits 0 after printing ``interrupted`` when a ``last.ckpt`` write was cut short.
"""

import sys

import torch

from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import train


class Killed(Exception):
    """Stands for a kill (Lightning turns a real KeyboardInterrupt into an exit of its own)."""


def main() -> None:
    recipe, overrides = sys.argv[1], sys.argv[2:]
    torch.set_num_threads(1)
    real_save = torch.save

    def dies_on_last(obj, f, *args, **kwargs):
        if "last.ckpt" in str(f):
            raise Killed(f"killed while writing {f}")
        return real_save(obj, f, *args, **kwargs)

    torch.save = dies_on_last
    try:
        train(load_recipe(recipe, overrides))
    except Killed as err:
        print("interrupted:", err)


if __name__ == "__main__":
    main()
