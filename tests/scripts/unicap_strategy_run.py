"""Fine-tune a UniCap recipe with a strategy and save the step count, losses and full weights.

usage: unicap_strategy_run.py RECIPE OUT_FILE key=value ...   (run by tests/test_unicap_train.py)
"""

import sys

import torch

from lumina_lightning.training.parallelize import full_state_dict
from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.unicap_run import train_unicap


def main() -> None:
    recipe, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    result = train_unicap(load_recipe(recipe, overrides))
    weights = full_state_dict(result.module.model)
    if result.module.trainer.is_global_zero:
        torch.save({"weights": weights, "step": result.global_step, "losses": result.losses,
                    "exit_code": result.exit_code,
                    "export": str(result.export_dir)}, out)


if __name__ == "__main__":
    main()
