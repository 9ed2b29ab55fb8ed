"""Train a recipe with a strategy on 2 CPU processes and save the final full weights.

usage: strategy_run.py RECIPE OUT_FILE key=value ...   (run by tests/test_distributed.py)
"""

import sys

import torch

from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import train
from lumina_lightning.training.parallelize import full_state_dict


def main() -> None:
    recipe, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    torch.set_num_threads(1)
    result = train(load_recipe(recipe, overrides))
    weights = full_state_dict(result.module.model)
    ema = full_state_dict(result.module.ema_model) if result.module.ema_model is not None else None
    if result.module.trainer.is_global_zero:
        torch.save({"weights": weights, "ema": ema, "step": result.global_step, "losses": result.losses}, out)


if __name__ == "__main__":
    main()
