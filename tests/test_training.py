"""Generation training: the objective, resume, faults, hand-off between stages, MLflow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lumina_lightning.models.io import load_nextdit, read_state
from lumina_lightning.sampling.pipeline_io import load_pipeline
from lumina_lightning.modules.generation import NextDiTModule, pad_rows, sample_generator
from lumina_lightning.training.callbacks import AtomicCheckpointIO
from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import train
from training_utils import ROOT, tiny_recipe, tiny_synthetic


def run(path: Path, *overrides: str, **kwargs):
    return train(load_recipe(path, list(overrides)), **kwargs)


def test_sample_generator_is_stable_and_distinct():
    a = torch.randn(3, generator=sample_generator(0, 0, 5))
    assert torch.equal(a, torch.randn(3, generator=sample_generator(0, 0, 5)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 1, 5)))  # new epoch, new draws
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 0, 6)))
    assert not torch.equal(a, torch.randn(3, generator=sample_generator(0, 0, 5, copy=1)))  # a record's 2nd listing
    # copy 0 keeps the draws of before copies existed (recorded then): data without repeated records
    # trains exactly as it did
    assert torch.randn(2, generator=sample_generator(0, 3, 5)).tolist() == [1.7714283466339111, 0.6656873822212219]


def test_a_record_listed_twice_in_an_epoch_gets_two_sets_of_draws(tmp_path):
    """A source with ratio 2 lists each record twice per epoch: the two listings must not be the
    same training example (caption dropout, t and noise drawn again)."""
    from lumina_lightning.data.loader import build_dataloader
    from lumina_lightning.training.run import build_encoders, data_config

    (tmp_path / "mix.yaml").write_text(f"META:\n  - path: {tiny_synthetic() / 'test.jsonl'}\n    ratio: 2.0\n")
    cfg = load_recipe(tiny_recipe(tmp_path, data={"path": str(tmp_path / "mix.yaml")})).config
    text_encoder, autoencoder, _ = build_encoders(cfg)
    module = NextDiTModule(cfg, text_encoder=text_encoder, autoencoder=autoencoder)
    draws = {}
    for batch in build_dataloader(data_config(cfg), batch_size=4, seed=cfg.seed):
        d = module.draw(batch, torch.empty(module.latent_shape(batch), device="meta"))
        for j, key in enumerate(zip(batch["indices"].tolist(), batch["copies"].tolist())):
            assert key not in draws, key
            draws[key] = (float(d["t"][j]), d["noise"][j])
    assert sorted(draws) == [(i, c) for i in range(16) for c in (0, 1)]  # 16 records, each listed twice
    for i in range(16):
        (t0, noise0), (t1, noise1) = draws[(i, 0)], draws[(i, 1)]
        assert t0 != t1 and not torch.equal(noise0, noise1), i


def test_pad_rows():
    feats, mask = pad_rows([torch.ones(2, 3), torch.full((4, 3), 2.0)])
    assert feats.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    assert feats[0, 2:].abs().sum() == 0


def test_tiny_run_learns_tracks_and_exports(tmp_path):
    recipe = tiny_recipe(
        tmp_path,
        trainer={"max_steps": 24, "log_every_n_steps": 4, "checkpoint_every_n_steps": 12},
        validation={"every_n_steps": 12, "sample_every_n_steps": 24, "prompts": ["a red circle", "two blue squares"],
                    "seeds": [0, 1], "preset": "fast", "steps": 3},
        tracking={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                  "artifact_location": (tmp_path / "artifacts").as_uri(), "experiment": "t"},
        data={"caption_weights": {"short": 1.0}, "batch_size": 8},
    )
    result = run(recipe)
    losses = result.losses
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < 0.85 * sum(losses[:6]) / 6, losses  # the loss clearly falls
    # the export is a pipeline folder the sampler, the next stage and the app read
    # it records the trained resolution: the default size of `lumina sample` / `eval` / `demo`
    spec = json.loads((result.export_dir / "pipeline.json").read_text())
    assert spec["resolution"] == load_recipe(recipe).config.data.resolution == 16
    assert load_pipeline(result.export_dir).resolution == 16
    state, cfg, fmt = read_state(result.export_dir, ema=True)
    assert fmt == "lumina" and cfg.in_channels == 3
    # the training checkpoint gives its EMA weights by default, its raw ones on request
    ckpt = result.output_dir / "checkpoints" / "last.ckpt"
    ema_state, _, fmt = read_state(ckpt, ema="auto")
    raw_state, _, _ = read_state(ckpt, ema=False)
    assert fmt == "lightning" and read_state(ckpt, ema=True)[0].keys() == ema_state.keys()
    assert all(torch.equal(ema_state[k], v) for k, v in result.module.ema_model.state_dict().items())
    assert all(torch.equal(raw_state[k], v) for k, v in result.module.model.state_dict().items())
    assert any(not torch.equal(ema_state[k], raw_state[k]) for k in raw_state)
    assert set(result.validation) == {"raw", "ema"}
    assert (result.output_dir / "config.yaml").is_file()
    assert sorted(p.name for p in (result.output_dir / "samples").iterdir()) == ["step_0000024.png"]

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    r = client.get_run(result.mlflow_run_id)
    assert r.data.tags["stage"] == "test"
    assert r.data.params["optim.lr"] == "0.001" and r.data.params["model.size"] == "NextDiT_debug"
    for metric in ("train/loss", "train/grad_norm", "train/lr", "train/images_per_s", "val/loss", "val/loss_ema"):
        assert metric in r.data.metrics, metric
    assert any(k.startswith("train_t/loss_bin") for k in r.data.metrics)
    assert r.data.metrics["data/captions_truncated"] == 0  # short captions fit text_encoder.max_length
    # metrics logged only on Lightning's logging steps are written at exactly the same steps as the
    # ones logged every step (log_every_n_steps 4 over 24 steps)
    steps = {m: sorted(h.step for h in client.get_metric_history(r.info.run_id, m))
             for m in ("train/loss", "train/lr", "train/grad_norm", "train/loss_main", "train/images_per_s")}
    assert steps["train/loss"] == list(range(3, 24, 4)) and all(v == steps["train/loss"] for v in steps.values()), steps
    top = {a.path for a in client.list_artifacts(r.info.run_id)}
    assert {"recipe", "samples", "export", "plots"} <= top
    assert [a.path for a in client.list_artifacts(r.info.run_id, "samples")] == ["samples/step_0000024.png"]
    # the training loss by timestep bin, and the last validation loss at its fixed timesteps
    assert sorted(a.path for a in client.list_artifacts(r.info.run_id, "plots")) == [
        "plots/loss_by_t.png", "plots/val_loss_by_t.png"]


def test_resume_equals_straight_run(tmp_path):
    """N steps straight == N/2 steps + resume + N/2 steps: same losses, same data, same weights."""
    straight = run(tiny_recipe(tmp_path / "a", output_dir=str(tmp_path / "a/run")), "trainer.max_steps=6",
                   "trainer.checkpoint_every_n_steps=3")
    first = run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), "trainer.max_steps=3",
                "trainer.checkpoint_every_n_steps=3")
    second = run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), "trainer.max_steps=6",
                 "trainer.checkpoint_every_n_steps=3", "resume=auto")
    assert first.indices + second.indices == straight.indices  # the data position was restored
    assert first.losses + second.losses == straight.losses
    a, b = straight.module, second.module
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(a.ema_model.state_dict().items(), b.ema_model.state_dict().values()):
        assert torch.equal(p, q), name
    opt_a = a.trainer.optimizers[0].state_dict()["state"]
    opt_b = b.trainer.optimizers[0].state_dict()["state"]
    assert all(torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"]) for k in opt_a)


def test_resume_from_explicit_path_and_missing_path(tmp_path):
    first = run(tiny_recipe(tmp_path), "trainer.max_steps=2")
    ckpt = first.last_checkpoint
    assert ckpt is not None and ckpt.exists()
    again = run(tiny_recipe(tmp_path), "trainer.max_steps=3", f"resume={ckpt}")
    assert again.global_step == 3 and len(again.losses) == 1
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run(tiny_recipe(tmp_path), "trainer.max_steps=3", f"resume={tmp_path / 'nope.ckpt'}")


def test_nonfinite_losses_are_skipped_counted_and_limited(tmp_path, monkeypatch):
    original = NextDiTModule.flow_losses
    poisoned_steps = {1, 2}

    def flaky(self, model, latents, feats, mask, draws):
        main, aux = original(self, model, latents, feats, mask, draws)
        if self.global_step in poisoned_steps or self.recipe.stage == "always-nan":
            main = main * float("nan")
        return main, aux

    monkeypatch.setattr(NextDiTModule, "flow_losses", flaky)
    result = run(tiny_recipe(tmp_path), "trainer.max_steps=5")
    module = result.module
    assert module.nonfinite_total == 2
    assert all(torch.isfinite(p).all() for p in module.model.parameters())  # skipped steps left no NaN behind
    with pytest.raises(RuntimeError, match="non-finite losses in a row"):
        run(tiny_recipe(tmp_path / "x", output_dir=str(tmp_path / "x/run")), "stage=always-nan",
            "trainer.max_steps=5", "trainer.max_nonfinite_steps=3")


def test_a_non_finite_micro_batch_skips_its_whole_accumulated_step(tmp_path, monkeypatch):
    """accumulate 2, 3 steps: micro-batch 2 (step 1) and both micro-batches of step 2 are non-finite.
    Steps 1 and 2 must leave the weights, the EMA and AdamW's state untouched (no update from the
    good micro-batch 1 alone), count one skipped step each, and advance the LR schedule and the step
    counter as a skipped step without accumulation does."""
    import lightning.pytorch as pl

    original = NextDiTModule.flow_losses
    calls = []

    def flaky(self, *args):
        main, aux = original(self, *args)
        calls.append(1)
        return (main * float("nan") if len(calls) in (2, 3, 4) else main), aux

    class Snapshots(pl.Callback):
        def __init__(self):
            self.weights = {}

        def on_train_start(self, trainer, module):
            self.weights[0] = self.take(trainer, module)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            self.weights[trainer.global_step] = self.take(trainer, module)

        @staticmethod
        def take(trainer, module):
            return ([p.detach().clone() for p in module.model.parameters()],
                    [p.detach().clone() for p in module.ema_model.parameters()],
                    len(trainer.optimizers[0].state))

    monkeypatch.setattr(NextDiTModule, "flow_losses", flaky)
    snaps = Snapshots()
    result = run(tiny_recipe(tmp_path), "trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                 "trainer.checkpoint_every_n_steps=100", extra_callbacks=[snaps])
    raw0, ema0, _ = snaps.weights[0]
    for step in (1, 2):
        raw, ema, adam_entries = snaps.weights[step]
        assert all(torch.equal(p, q) for p, q in zip(raw, raw0)), step
        assert all(torch.equal(p, q) for p, q in zip(ema, ema0)), step
        assert adam_entries == 0, step  # AdamW never stepped: no moments, no step count
    raw, ema, _ = snaps.weights[3]
    assert any(not torch.equal(p, q) for p, q in zip(raw, raw0))  # the good step 3 trains
    assert any(not torch.equal(p, q) for p, q in zip(ema, ema0))
    module = result.module
    assert result.global_step == 3 and len(calls) == 6
    assert module.nonfinite_total == 2 and module.nonfinite_in_a_row == 0  # steps, not micro-batches
    assert module.trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_metrics_reach_mlflow_at_the_step_they_describe(tmp_path):
    """Validation every 3 steps, logging every 4, 6 steps: validation at steps 3 and 6 reaches MLflow
    even though neither is a logging step, and train/lr is the LR the step used (warm-up of 8)."""
    import lightning.pytorch as pl
    import mlflow

    class UsedLR(pl.Callback):
        def __init__(self):
            self.lrs = []

        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.lrs.append(optimizer.param_groups[0]["lr"])

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 6, "log_every_n_steps": 4, "checkpoint_every_n_steps": 100},
                         optim={"lr": 1e-3, "warmup_steps": 8},
                         validation={"every_n_steps": 3, "sample_every_n_steps": 0, "prompts": []},
                         tracking={"enabled": True, "tracking_uri": uri, "experiment": "t",
                                   "artifact_location": (tmp_path / "artifacts").as_uri()})
    used = UsedLR()
    result = run(recipe, extra_callbacks=[used])
    client = mlflow.MlflowClient(tracking_uri=uri)

    def history(name):
        return [(h.step, h.value) for h in sorted(client.get_metric_history(result.mlflow_run_id, name),
                                                  key=lambda h: h.step)]

    # Lightning writes step k's training metrics at MLflow step k - 1; validation after step k joins them
    assert [s for s, _ in history("train/loss")] == [3]
    assert [s for s, _ in history("val/loss")] == [2, 5]
    assert history("val/loss")[-1][1] == pytest.approx(result.validation["ema"])
    assert history("val/loss_raw")[-1][1] == pytest.approx(result.validation["raw"])
    assert history("train/lr") == [(3, pytest.approx(used.lrs[3]))] and used.lrs[3] == pytest.approx(0.5e-3)


def test_validation_uses_exactly_val_samples_records(tmp_path):
    from lumina_lightning.training.run import validation_batches

    cfg = load_recipe(tiny_recipe(tmp_path, data={"val_samples": 6, "batch_size": 4})).config
    batches = validation_batches(cfg)
    assert [len(b["indices"]) for b in batches] == [4, 2]
    assert all(len(b["captions"]) == len(b["pixels"]) == len(b["indices"]) for b in batches)
    whole = validation_batches(load_recipe(tiny_recipe(tmp_path, "r8.yaml", data={"val_samples": 8, "batch_size": 4})).config)
    assert torch.equal(batches[1]["pixels"], whole[1]["pixels"][:2])  # the first 6 of the same order
    assert batches[1]["indices"].tolist() == whole[1]["indices"][:2].tolist()


def test_init_from_previous_stage_export_and_parent_run(tmp_path):
    tracking = {"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                "artifact_location": (tmp_path / "artifacts").as_uri(), "experiment": "lineage"}
    s1 = run(tiny_recipe(tmp_path / "s1", output_dir=str(tmp_path / "s1/run"), stage="s1", tracking=tracking),
             "trainer.max_steps=3")
    exported = load_nextdit(s1.export_dir)
    captured = {}
    original = NextDiTModule.configure_model

    def spy(self):
        original(self)
        captured.setdefault("w", {k: v.clone() for k, v in self.model.state_dict().items()})

    NextDiTModule.configure_model = spy
    try:
        s2 = run(tiny_recipe(tmp_path / "s2", output_dir=str(tmp_path / "s2/run"), stage="s2", tracking=tracking,
                             model={"size": "NextDiT_debug", "init_from": str(s1.export_dir),
                                    "overrides": {"in_channels": 3, "cap_feat_dim": 32, "patch_size": 2}},
                             data={"resolution": 16}),
                 "trainer.max_steps=1")
    finally:
        NextDiTModule.configure_model = original
    for k, v in exported.state_dict().items():
        assert torch.equal(captured["w"][k], v), k
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking["tracking_uri"])
    assert client.get_run(s2.mlflow_run_id).data.tags["mlflow.parentRunId"] == s1.mlflow_run_id


def test_data_prediction_trains_exports_and_guards_the_hand_off(tmp_path):
    from lumina_lightning.training.recipe import RecipeError

    recipe = tiny_recipe(tmp_path, objective={"prediction": "data"}, data={"batch_size": 8},
                         trainer={"max_steps": 16, "checkpoint_every_n_steps": 16})
    with pytest.raises(RecipeError, match="objective.prediction"):
        load_recipe(recipe, ["objective.prediction=eps"])
    result = run(recipe)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert json.loads((result.export_dir / "pipeline.json").read_text())["prediction"] == "data"
    pipe = load_pipeline(result.export_dir)
    assert pipe.prediction == "data"
    # it learned: the fixed-noise, fixed-t validation loss (of the velocity the output stands for) is
    # well below that of the untrained model (the per-step v-loss is too noisy to compare: 1/(1-t)^2)
    from lumina_lightning.eval.metrics import validation_loss
    from lumina_lightning.models.nextdit import NextDiT

    manifest = load_recipe(recipe).config.data.val_path
    trained = validation_loss(pipe, manifest, width=16, height=16, max_records=16)["mean"]
    pipe.model = NextDiT(pipe.model.config).eval()
    untrained = validation_loss(pipe, manifest, width=16, height=16, max_records=16)["mean"]
    assert trained < 0.7 * untrained, (trained, untrained)
    pipe = load_pipeline(result.export_dir)
    assert torch.isfinite(pipe("a red circle", width=16, height=16, steps=2, solver="euler").latents).all()
    # a velocity stage cannot start from a data-prediction export (nor the other way round)
    with pytest.raises(ValueError, match="objective.prediction='data'"):
        run(tiny_recipe(tmp_path / "s2", output_dir=str(tmp_path / "s2/run"),
                        model={"size": "NextDiT_debug", "init_from": str(result.export_dir),
                               "overrides": {"in_channels": 3, "cap_feat_dim": 32, "patch_size": 2}}),
            "trainer.max_steps=1")


def test_mismatched_init_from_lists_keys(tmp_path):
    s1 = run(tiny_recipe(tmp_path / "s1", output_dir=str(tmp_path / "s1/run")), "trainer.max_steps=1")
    from lumina_lightning.models import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        run(tiny_recipe(tmp_path / "s2", output_dir=str(tmp_path / "s2/run"),
                        model={"size": "NextDiT_debug", "init_from": str(s1.export_dir),
                               "overrides": {"in_channels": 3, "cap_feat_dim": 32, "patch_size": 4}},
                        data={"patch": 4}),
            "trainer.max_steps=1")


def test_atomic_checkpoint_io_keeps_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, target)
    before = target.read_bytes()

    def dies_half_way(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")  # a truncated write, then the process is killed
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_checkpoint_exits_cleanly_and_resumes(tmp_path, sig, code):
    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 100000, "checkpoint_every_n_steps": 2,
                                            "enable_progress_bar": False, "log_every_n_steps": 1,
                                            "accelerator": "cpu", "devices": 1})
    proc = subprocess.Popen([sys.executable, "-m", "lumina_lightning", "train", str(recipe)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 180
    while time.time() < deadline and not any(ckpts.glob("step=*.ckpt")):
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert "Traceback" not in out, out
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    step = last["global_step"]
    assert step >= 2
    resumed = run(recipe, f"trainer.max_steps={step + 2}", "resume=auto")
    assert resumed.global_step == step + 2 and len(resumed.losses) == 2


def test_consecutive_stages_reuse_the_text_encoder_and_its_cache(tmp_path):
    from lumina_lightning.training.run import build_encoders

    cfg = load_recipe(tiny_recipe(tmp_path)).config
    te1, _, _ = build_encoders(cfg)
    te1.encode(["a photo of a red circle"])
    te2, _, _ = build_encoders(load_recipe(tiny_recipe(tmp_path, "b.yaml", stage="next")).config)
    assert te2 is te1 and "a photo of a red circle" in te2._cache
    # a different encoder setting builds a fresh one (features would differ)
    te3, _, _ = build_encoders(load_recipe(tiny_recipe(tmp_path, "c.yaml", text_encoder={"max_length": 16})).config)
    assert te3 is not te1 and te3.max_length == 16


def test_ema_in_bf16_averages_in_fp32():
    """DeepSpeed bf16 casts the EMA copy to bf16; its (1 − decay) steps must not be rounded away."""
    from lumina_lightning.modules.ema import ema_update, fp32_shadow

    def pair():
        model, ema = torch.nn.Linear(4, 4, bias=False), torch.nn.Linear(4, 4, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            model.weight.fill_(1.01)  # bf16 steps are 2^-7 = 0.0078 at 1.0
            ema.weight.fill_(1.0)
        return model, ema

    model, ema = pair()
    assert fp32_shadow(model, model) is None  # an fp32 EMA needs no shadow
    for _ in range(100):
        ema_update(ema, model, 0.95)
    assert torch.all(ema.weight == 1.0)  # each 0.05 * 0.01 step is under half a bf16 step: stalled
    model, ema = pair()
    shadow = fp32_shadow(ema, model)
    for _ in range(100):
        ema_update(ema, model, 0.95, shadow=shadow)
    expected = 1.01 - 0.01 * 0.95**100  # = 1.0099408
    assert torch.allclose(shadow[0], torch.full((4, 4), expected), atol=1e-6)
    assert torch.all(ema.weight == torch.tensor(expected, dtype=torch.bfloat16))  # 1.0078125, rounded once


def test_half_precision_training_keeps_the_ema_average_in_fp32(tmp_path):
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import train

    result = train(load_recipe(tiny_recipe(tmp_path, trainer={"precision": "bf16-true", "max_steps": 3})))
    module = result.module
    ema = [p for p in module.ema_model.parameters() if p.dtype == torch.bfloat16]
    shadow = module._ema_shadow[0]
    assert ema and shadow is not None and all(s.dtype == torch.float32 for s in shadow)
    trained = [p for p, q in zip(module.ema_model.parameters(), module.model.parameters()) if q.requires_grad]
    assert all(torch.equal(p, s.to(torch.bfloat16)) for p, s in zip(trained, shadow))


def test_lr_schedules_by_hand():
    from lumina_lightning.training.schedules import lr_factor

    # warm-up 10 of 110 steps, then 100 decay steps
    assert lr_factor(0, total=110, warmup=10, schedule="cosine") == pytest.approx(0.1)
    assert lr_factor(9, total=110, warmup=10, schedule="linear") == pytest.approx(1.0)
    assert lr_factor(60, total=110, warmup=10, schedule="linear") == pytest.approx(0.5)
    assert lr_factor(60, total=110, warmup=10, schedule="cosine", min_ratio=0.2) == pytest.approx(0.6)
    assert lr_factor(35, total=110, warmup=10, schedule="cosine") == pytest.approx(0.5 * (1 + 2**-0.5))
    assert lr_factor(110, total=110, warmup=10, schedule="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(500, total=110, schedule="linear") == 0.0
    assert lr_factor(500, total=110, schedule="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total=1, schedule="step")


def test_recipe_schedule_is_validated(tmp_path):
    from lumina_lightning.training.recipe import RecipeError, load_recipe

    cfg = load_recipe(tiny_recipe(tmp_path), ["optim.schedule=cosine", "optim.min_lr_ratio=0.1"]).config
    assert cfg.optim.schedule == "cosine" and cfg.optim.min_lr_ratio == 0.1
    with pytest.raises(RecipeError, match="optim.schedule"):
        load_recipe(tiny_recipe(tmp_path), ["optim.schedule=cosin"])


def test_stop_signal_with_gradient_accumulation_loses_no_micro_batch(tmp_path):
    """A stop requested mid-accumulation waits for the optimizer step: stop + resume == straight run."""
    import lightning.pytorch as pl

    from lumina_lightning.training.callbacks import GracefulStop

    class SignalAtThirdMicroBatch(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx == 2:  # the first micro-batch of the second step (accumulate 2)
                for cb in trainer.callbacks:
                    if isinstance(cb, GracefulStop):
                        cb.requested = signal.SIGTERM

    common = ["trainer.max_steps=4", "trainer.accumulate_grad_batches=2", "trainer.checkpoint_every_n_steps=100"]
    straight = run(tiny_recipe(tmp_path / "a", output_dir=str(tmp_path / "a/run")), *common)
    first = run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), *common,
                extra_callbacks=[SignalAtThirdMicroBatch()])
    assert first.stopped_by_signal and first.global_step == 2 and len(first.indices) == 4  # finished step 2
    second = run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), *common, "resume=auto")
    assert first.indices + second.indices == straight.indices
    for (name, p), q in zip(straight.module.model.state_dict().items(), second.module.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_the_step_lightning_forces_at_an_epoch_end_validates_and_logs(tmp_path, monkeypatch):
    """24 micro-batches per epoch, accumulate 5: Lightning steps at micro-batches 5, 10, 15, 20 and 24."""
    bins = []
    original = NextDiTModule.log_bins
    monkeypatch.setattr(NextDiTModule, "log_bins", lambda self: (bins.append(self.global_step), original(self))[1])
    result = run(tiny_recipe(tmp_path), "trainer.max_steps=5", "trainer.accumulate_grad_batches=5",
                 "trainer.log_every_n_steps=1", "validation.every_n_steps=1000", "trainer.checkpoint_every_n_steps=100")
    assert result.global_step == 5 and len(result.indices) == 24
    assert bins == [1, 2, 3, 4, 5]
    assert set(result.validation) == {"raw", "ema"}  # the last step always validates


def test_half_precision_resume_keeps_the_fp32_ema_average(tmp_path):
    common = ["trainer.precision=bf16-true", "trainer.checkpoint_every_n_steps=3", "ema.decay=0.95"]
    straight = run(tiny_recipe(tmp_path / "a", output_dir=str(tmp_path / "a/run")), "trainer.max_steps=6", *common)
    run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), "trainer.max_steps=3", *common)
    second = run(tiny_recipe(tmp_path / "b", output_dir=str(tmp_path / "b/run")), "trainer.max_steps=6", *common,
                 "resume=auto")
    for (name, p), q in zip(straight.module.model.state_dict().items(), second.module.model.state_dict().values()):
        assert torch.equal(p, q), name
    for (name, p), q in zip(straight.module.ema_model.state_dict().items(), second.module.ema_model.state_dict().values()):
        assert torch.equal(p, q), name
    for x, y in zip(straight.module._ema_shadow[0], second.module._ema_shadow[0]):
        assert torch.equal(x, y)


# --- data review (round 2): data.system with a cache, val_path root, synthetic spec, data errors ---------


def test_a_cache_built_for_data_system_trains_and_a_mismatch_says_how_to_build_it(tmp_path):
    """The run expects the cache's prompts to use data.system (the template the batches report) when set."""
    from lumina_lightning.data.cache import CacheIdentityError
    from lumina_lightning.data.cli import main as data_main
    from training_utils import tiny_text_encoder

    synth = tiny_synthetic()
    cache = tmp_path / "cache"
    assert data_main(["cache", "--data", str(synth / "train.jsonl"), "--out", str(cache), "--resolution", "16",
                      "--patch", "2", "--vae", "pixel", "--text-encoder", tiny_text_encoder(), "--max-length", "32",
                      "--prompt-template", "record", "--default-system", "align", "--feature-dtype", "float32"]) == 0
    recipe = tiny_recipe(tmp_path, data={"cache_dir": str(cache), "system": "align"}, objective={"system": "base"})
    result = run(recipe, "trainer.max_steps=1")
    assert result.global_step == 1
    plain = tiny_recipe(tmp_path, "plain.yaml", data={"cache_dir": str(cache)}, objective={"system": "base"},
                        output_dir=str(tmp_path / "run2"))
    with pytest.raises(CacheIdentityError, match="--prompt-template record --default-system base"):
        run(plain, "trainer.max_steps=1")


def test_validation_manifest_paths_resolve_against_its_own_folder_not_data_root(tmp_path):
    import shutil

    from lumina_lightning.training.run import validation_batches

    synth = tiny_synthetic()
    val_dir = tmp_path / "valset"
    (val_dir / "pics").mkdir(parents=True)
    rows = []
    for line in open(synth / "test.jsonl"):
        row = json.loads(line)
        new = row["image"].replace("images/", "pics/")
        shutil.copy(synth / row["image"], val_dir / new)
        rows.append(json.dumps({**row, "image": new}))
    (val_dir / "val.jsonl").write_text("\n".join(rows) + "\n")
    # data.root is the training manifest's image root (here: the synthetic folder, which has no pics/)
    cfg = load_recipe(tiny_recipe(tmp_path, data={"root": str(synth), "val_path": str(val_dir / "val.jsonl"),
                                                  "val_samples": 4})).config
    batches = validation_batches(cfg)
    assert sum(len(b["indices"]) for b in batches) == 4


def test_ensure_synthetic_regenerates_when_data_synthetic_changed(tmp_path):
    import types

    from lumina_lightning.training.run import ensure_synthetic

    path = tmp_path / "synthetic" / "train.jsonl"
    for spec, n, width in (({"n": 8, "n_test": 6, "size": 16, "seed": 0}, 8, 16),
                           ({"n": 10, "n_test": 6, "size": 24, "seed": 1}, 10, 24)):
        ensure_synthetic(types.SimpleNamespace(data=types.SimpleNamespace(path=str(path), synthetic=spec)))
        rows = [json.loads(line) for line in open(path)]
        assert (len(rows), rows[0]["width"]) == (n, width)
    before = path.stat().st_mtime_ns
    ensure_synthetic(types.SimpleNamespace(data=types.SimpleNamespace(path=str(path), synthetic={
        "n": 10, "n_test": 6, "size": 24, "seed": 1})))
    assert path.stat().st_mtime_ns == before  # the same spec: reused
    with pytest.raises(ValueError, match=r"data.synthetic: unknown synthetic dataset arguments \['nn'\]"):
        ensure_synthetic(types.SimpleNamespace(data=types.SimpleNamespace(path=str(path), synthetic={"nn": 3})))


def test_lumina_train_reports_unusable_data_without_a_traceback(tmp_path, capsys):
    from lumina_lightning.training.run import main

    manifest = tmp_path / "gone.jsonl"
    manifest.write_text("".join(json.dumps({"image": f"missing{i}.png", "caption": "a red circle", "width": 16,
                                            "height": 16}) + "\n" for i in range(8)))
    recipe = tiny_recipe(tmp_path, data={"path": str(manifest), "val_path": None})
    assert main([str(recipe)]) == 2
    assert "no readable sample left" in capsys.readouterr().err


def test_captions_cut_at_max_length_are_counted_in_the_run(tmp_path):
    """Captions longer than text_encoder.max_length lose their ends: the run says how many, in its log
    and as the MLflow metric data/captions_truncated, instead of training on them silently."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 2}, text_encoder={"max_length": 16},
                         tracking={"enabled": True, "tracking_uri": uri, "experiment": "t"},
                         data={"caption_weights": {"long": 1.0}, "batch_size": 4})
    result = run(recipe)
    metrics = mlflow.MlflowClient(tracking_uri=uri).get_run(result.mlflow_run_id).data.metrics
    assert metrics["data/captions_truncated"] >= 4  # every long caption of both batches


def test_a_run_resumed_after_a_stop_keeps_saving_to_last_ckpt(tmp_path):
    """A signal before the first periodic checkpoint: GracefulStop writes last.ckpt itself. The resumed
    run's checkpoints must go to last.ckpt too (what the next resume=auto reads), not to last-v1.ckpt
    beside a last.ckpt frozen at the step of the stop."""
    import os

    import lightning.pytorch as pl

    class SignalAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 100, "checkpoint_every_n_steps": 1000})
    stopped = run(recipe, extra_callbacks=[SignalAt()])
    ckpts = tmp_path / "run" / "checkpoints"
    stop_step = torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"]
    assert stopped.exit_code == 143 and stop_step == 4  # the step under way when the signal came finishes
    resumed = run(recipe, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2", "resume=auto")
    assert resumed.global_step == 6
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6


def test_last_ckpt_holds_the_final_step_of_a_run_that_ends_between_saves(tmp_path):
    """max_steps 5 with a save every 3 steps: Lightning alone leaves last.ckpt at step 3, so a later
    resume=auto (a raised max_steps) would go back and train steps 4-5 again."""
    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 5, "checkpoint_every_n_steps": 3})
    result = run(recipe)
    ckpts = tmp_path / "run" / "checkpoints"
    assert result.global_step == 5
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 5
    assert sorted(p.name for p in ckpts.glob("last*")) == ["last.ckpt"]


def test_a_stop_writes_last_ckpt_once(tmp_path):
    """GracefulStop saves last.ckpt at the stop; the end of training must not write it a second time
    (a 2.6B checkpoint twice in a scheduler's grace period)."""
    import os

    import lightning.pytorch as pl

    from lumina_lightning.training import callbacks

    class SignalAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)

    writes = []
    original = callbacks.atomic_write

    def counting(target, write):
        writes.append(Path(target).name)
        return original(target, write)

    recipe = tiny_recipe(tmp_path, trainer={"max_steps": 100, "checkpoint_every_n_steps": 1000})
    callbacks.atomic_write = counting
    try:
        stopped = run(recipe, extra_callbacks=[SignalAt()])
    finally:
        callbacks.atomic_write = original
    assert stopped.exit_code == 143
    assert writes.count("last.ckpt") == 1, writes


def test_step_checkpoint_keeps_model_checkpoint_state_key():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lumina_lightning.training.callbacks import StepCheckpoint

    kwargs = dict(every_n_train_steps=3, monitor="step", mode="max", save_last=True)
    assert StepCheckpoint(**kwargs).state_key == ModelCheckpoint(**kwargs).state_key
