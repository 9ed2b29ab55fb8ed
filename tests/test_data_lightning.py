"""Resume through a real Lightning Trainer: the loader state in the checkpoint gives the same samples."""

from __future__ import annotations

import pytest
import torch

from lumina_lightning.data.config import DataConfig
from lumina_lightning.data.loader import build_dataloader
from lumina_lightning.data.synth import generate_synthetic

L = pytest.importorskip("lightning")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return str(generate_synthetic(root, 40, size=32, seed=1, n_test=6).train)


class _Recorder(L.LightningModule):
    def __init__(self, cfg: DataConfig, num_workers: int):
        super().__init__()
        self.cfg, self.num_workers = cfg, num_workers
        self.net = torch.nn.Linear(3, 1)
        self.seen: list[list[int]] = []

    def train_dataloader(self):
        return build_dataloader(self.cfg, batch_size=4, seed=11, rank=self.global_rank,
                                world_size=self.trainer.world_size, num_workers=self.num_workers)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["indices"].tolist())
        return self.net(batch["pixels"].mean(dim=(2, 3))).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _trainer(tmp_path, max_steps, callbacks=()):
    return L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=str(tmp_path), callbacks=list(callbacks),
    )


@pytest.mark.parametrize("num_workers", [0, 2])
def test_trainer_resume_sees_the_same_samples(manifest, tmp_path, num_workers, one_thread):
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = DataConfig(path=manifest, resolution=32)
    steps, half = 14, 7  # 10 batches per epoch: the resumed run crosses into epoch 1
    full = _Recorder(cfg, num_workers)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=half, save_top_k=-1)
    _trainer(tmp_path, steps, [ckpt]).fit(full)
    assert len(full.seen) == steps
    path = next((tmp_path / "ckpt").glob(f"*step={half}.ckpt"))

    resumed = _Recorder(cfg, num_workers)
    again = ModelCheckpoint(dirpath=str(tmp_path / "ckpt2"), every_n_train_steps=half, save_top_k=-1)
    _trainer(tmp_path, steps, [again]).fit(resumed, ckpt_path=str(path))
    assert resumed.seen == full.seen[half:]
    epoch0 = {i for b in full.seen[:10] for i in b}
    assert len(epoch0) == 40  # epoch 0 saw every sample exactly once
