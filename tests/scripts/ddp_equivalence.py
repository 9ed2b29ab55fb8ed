"""DDP with 2 CPU processes vs 1 process over the combined batch (run by tests/test_distributed.py).

usage: ddp_equivalence.py single|ddp OUT_DIR RECIPE
Both modes see the same samples: step k's combined batch is samples [8k, 8k+8); with DDP, rank r
takes its half [8k+4r, 8k+4r+4). Every rank writes its losses; rank 0 writes the final weights.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch

from lumina_lightning.data.dataset import ImageTextDataset, build_plan
from lumina_lightning.data.records import load_records
from lumina_lightning.modules.generation import NextDiTModule
from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import build_encoders, data_config


def main() -> None:
    mode, out, recipe = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    cfg = load_recipe(recipe).config
    pl.seed_everything(0)
    text_encoder, autoencoder, spec = build_encoders(cfg)
    dcfg = data_config(cfg)
    dataset = ImageTextDataset(build_plan(load_records(dcfg.path), dcfg), dcfg, cfg.seed)
    module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder, pipeline_spec=spec)
    world = 2 if mode == "ddp" else 1
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy="ddp" if mode == "ddp" else "auto", max_steps=2,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
        num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
    )
    rank = trainer.global_rank
    per_rank = 8 // world
    batches = [dataset.__getitems__([(0, 8 * k + per_rank * rank + j) for j in range(per_rank)]) for k in range(2)]
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"losses_{mode}_rank{trainer.global_rank}.json").write_text(json.dumps(module.loss_history))
    if trainer.global_rank == 0:
        torch.save({k: v.detach().cpu() for k, v in module.model.state_dict().items()}, out / f"weights_{mode}.pt")


if __name__ == "__main__":
    main()
