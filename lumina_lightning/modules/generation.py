"""``NextDiTModule``: the Lightning module that trains a Unified Next-DiT with rectified flow.

Spec §3–§5. One training step:

1. latents from the frozen autoencoder (or the offline cache);
2. per sample, from a generator seeded by (seed, epoch, sample index, copy) — so the draws do not
   depend on the number of ranks, the batch composition or a resume, and the listings of a record
   that a source ratio >= 2 repeats in an epoch differ (``copy``) — caption dropout (the *whole*
   prompt, system template included, becomes ""), logit-normal t shifted toward noise by the
   resolution shift, and the noise;
3. prompt features from the frozen text encoder (``template + caption``, ``hidden_states[-2]``);
4. the velocity loss, plus the unweighted auxiliary loss on 4×-pooled latents (own t and noise);
5. AdamW (0.9, 0.95, eps 1e-15, wd 0; ``optim.name: muon`` for Muon on the blocks' matrices),
   constant LR (optional warm-up), clipping at 2.0, then the EMA update (decay 0.95 per step by
   default, as the official code).

Defaults and the official code agree except where marked DEVIATION in ``training/config.py``.
The frozen encoders are held outside the registered submodules: they are neither sharded nor
checkpointed, and strategies never see them.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch

from lumina_lightning.encoders.text import build_prompt, pad_rows
from lumina_lightning.flow import (
    TimestepBins,
    interpolate,
    per_sample_mse,
    pool_latents,
    sample_timesteps,
    stratified_timesteps,
    time_shift,
    training_shift,
    velocity_from_output,
    velocity_target,
)
from lumina_lightning.models.config import NextDiTConfig, config_for
from lumina_lightning.models.nextdit import NextDiT
from lumina_lightning.modules.ema import ema_copy_, ema_update, fp32_shadow, is_low_precision, trained_ema_params
from lumina_lightning.modules.steplog import log_step_rates, log_validation, logging_step, step_started
from lumina_lightning.training.config import RecipeConfig
from lumina_lightning.training.parallelize import (
    builds_partitioned,
    clip_grad_norm,
    gathered,
    parallelize,
    uses_deepspeed,
)

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SALT_TRAIN = 0x4C554D31  # "LUM1": separates training draws from other seeded streams


def sample_generator(seed: int, epoch: int, index: int, salt: int = _SALT_TRAIN, copy: int = 0) -> torch.Generator:
    """A CPU generator for one sample's random draws, independent of ranks, batches and resumes.

    ``copy`` is the batch's ``copies`` entry: which listing of the record in the epoch the sample is.
    """
    # copy 0 keeps the key it had before copies existed, so data without repeats draws as before
    extra = [int(copy)] if copy else []
    mixed = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), salt, *extra]).generate_state(2)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


class NextDiTModule(pl.LightningModule):
    """Trains a Next-DiT from a validated :class:`RecipeConfig` (see ``training/recipe.py``).

    Args:
        recipe: the training recipe.
        text_encoder, autoencoder: frozen encoders (built by the train verb; see ``training/run.py``).
        pipeline_spec: the ``pipeline.json`` content describing those encoders, stored in every
            checkpoint so a ``.ckpt`` can be sampled from directly.
        val_batches: optional fixed validation batches (pixels/latents + captions).
    """

    def __init__(
        self,
        recipe: RecipeConfig,
        *,
        text_encoder: Any,
        autoencoder: Any,
        pipeline_spec: dict[str, Any] | None = None,
        val_batches: list[dict[str, Any]] | None = None,
        output_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.recipe = recipe
        self.nextdit_config: NextDiTConfig = config_for(recipe.model.size, **recipe.model.overrides)
        self._frozen = {"text_encoder": text_encoder, "autoencoder": autoencoder}
        self.pipeline_spec = pipeline_spec
        self.val_batches = val_batches or []
        self.output_dir = Path(output_dir) if output_dir else None
        self._check_encoders()
        self.model: NextDiT | None = None
        self.ema_model: NextDiT | None = None
        self.bins = TimestepBins(20)  # since the last log, logged as train_t/loss_binNN
        self.run_bins = TimestepBins(20)  # whole run (this process), for the loss-by-t plot
        self.nonfinite_in_a_row = 0  # optimizer steps
        self.nonfinite_total = 0
        self._window_nonfinite = False  # a micro-batch since the last optimizer step had a non-finite loss
        self.loss_history: list[float] = []  # this process's training losses, for reports and tests
        self.index_history: list[list[int]] = []  # sample ids of each step (proves the data position on resume)
        self._step_started: float | None = None
        self._skipped = False
        self._ema_shadow: tuple[list[torch.Tensor] | None] | None = None  # (fp32 average or None,) once built
        self._init_state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None] | None = None
        self._pipeline = None
        res = recipe.data.resolution
        shift = recipe.objective.shift
        # The official shift uses the stage's image-token count (spec §5); computed once here.
        self.shift = (
            training_shift(res, autoencoder.downsample, self.nextdit_config.patch_size) if shift == "auto" else float(shift)
        )

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------
    @property
    def text_encoder(self) -> Any:
        return self._frozen["text_encoder"]

    @property
    def autoencoder(self) -> Any:
        return self._frozen["autoencoder"]

    def _check_encoders(self) -> None:
        cfg = self.nextdit_config
        if self.autoencoder.latent_channels != cfg.in_channels:
            raise ValueError(
                f"model.in_channels={cfg.in_channels} but the autoencoder gives {self.autoencoder.latent_channels} "
                f"latent channels; set model.overrides.in_channels={self.autoencoder.latent_channels}"
            )
        hidden = getattr(self.text_encoder, "hidden_size", None)
        if hidden is not None and hidden != cfg.cap_feat_dim:
            raise ValueError(
                f"model.cap_feat_dim={cfg.cap_feat_dim} but the text encoder gives {hidden}-dim features; "
                f"set model.overrides.cap_feat_dim={hidden}"
            )

    def set_initial_weights(self, state: dict[str, torch.Tensor], ema_state: dict[str, torch.Tensor] | None) -> None:
        """Weights to start from (``model.init_from``), applied when the model is built."""
        self._init_state = (state, ema_state)

    def configure_model(self) -> None:
        if self.model is not None:
            return
        strategy = self.trainer.strategy if self._trainer is not None else None
        # Under ZeRO-3 the parameters are partitioned while they are built: initialise and load
        # them gathered instead (same values; see parallelize.gathered)
        deferred = builds_partitioned(strategy)
        model = NextDiT(self.nextdit_config, initialize=not deferred)
        if deferred:
            with gathered(strategy, model):  # before the EMA is built: the same draws as a plain build
                model.initialize_weights()
        ema = NextDiT(self.nextdit_config, initialize=not deferred) if self.recipe.ema.enabled else None
        with gathered(strategy, model, ema):
            if self._init_state is not None:
                state, ema_state = self._init_state
                from lumina_lightning.models.io import check_state_dict

                check_state_dict(model, state, str(self.recipe.model.init_from))
                model.load_state_dict(state, strict=False)
                if ema is not None:
                    ema.load_state_dict(ema_state if ema_state is not None else state, strict=False)
                self._init_state = None
            elif ema is not None:
                ema_copy_(ema, model)
        if ema is not None:
            # Frozen; left in train mode on purpose: Next-DiT has no dropout or batch norm, so the
            # mode changes nothing, and Lightning warns about eval-mode submodules at fit start.
            ema.requires_grad_(False)
        mesh = None
        param_dtype = torch.bfloat16 if "bf16" in str(self.recipe.trainer.precision) else None
        if strategy is not None and getattr(strategy, "_device_mesh", None) is not None:
            mesh = strategy.device_mesh["data_parallel"]  # ModelParallelStrategy: (data_parallel, tensor_parallel)
        for m, train in ((model, True), (ema, False)):
            if m is None:
                continue
            parallelize(
                m,
                strategy=strategy,
                mesh=mesh,
                gradient_checkpointing=train and self.recipe.model.gradient_checkpointing,
                compile_blocks=self.recipe.model.compile,
                attention_backend=self.recipe.model.attention_backend,
                fsdp_param_dtype=param_dtype,
            )
        self.model, self.ema_model = model, ema

    def on_fit_start(self) -> None:
        # Frozen encoders follow the module to its device (they are not registered submodules).
        for name in ("text_encoder", "autoencoder"):
            enc = self._frozen[name]
            if isinstance(enc, torch.nn.Module):
                enc.to(self.device)
        self._val_cache = None
        self._ema_shadow = None  # rebuilt from the (possibly restored or cast) EMA at the first update

    def configure_optimizers(self) -> Any:
        o = self.recipe.optim
        from lumina_lightning.training.optim import build_optimizer
        from lumina_lightning.training.schedules import lambda_scheduler

        optimizer = build_optimizer(self.model, o)  # AdamW, or Muon + AdamW (optim.name)

        # Constant LR like the official code; a linear warm-up or a decay only when asked (DEVIATION).
        schedule = lambda_scheduler(optimizer, o, self.recipe.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ------------------------------------------------------------------------------------------
    # the objective
    # ------------------------------------------------------------------------------------------
    def prompts_for(self, captions: list[str], systems: list[str | None], drop: list[bool]) -> list[str]:
        default = self.recipe.objective.system
        return ["" if d else build_prompt(c, s or default) for c, s, d in zip(captions, systems, drop)]

    def encode_batch(self, batch: dict[str, Any], drop: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, caption features, caption mask) for a batch, applying caption dropout."""
        if "latents" in batch:
            latents = batch["latents"].to(self.device, torch.float32)
        else:
            latents = self.autoencoder.encode(batch["pixels"].to(self.device)).float()
        n = latents.shape[0]
        systems = batch.get("systems") or [None] * n
        if "cap_feats" in batch:
            # cached features are for the un-dropped prompts; dropped rows take the "" encoding
            feats, mask = batch["cap_feats"].to(self.device).float(), batch["cap_mask"].to(self.device).bool()
            if any(drop):
                empty_f, empty_m = self.text_encoder.encode([""])
                rows = [empty_f[0, : int(empty_m[0].sum())].to(self.device) if d else feats[i, : int(mask[i].sum())]
                        for i, d in enumerate(drop)]
                feats, mask = pad_rows(rows)
        else:
            feats, mask = self.text_encoder.encode(self.prompts_for(batch["captions"], systems, drop))
        return latents, feats.to(self.device), mask.to(self.device)

    def draw(self, batch: dict[str, Any], latents: torch.Tensor) -> dict[str, Any]:
        """Per-sample random draws (dropout, t, noise; and the auxiliary pair), reproducible anywhere."""
        o = self.recipe.objective
        epoch = int(batch.get("epoch", 0))
        indices = [int(i) for i in batch["indices"]]
        copies = [int(c) for c in batch["copies"]] if "copies" in batch else [0] * len(indices)
        gens = [sample_generator(self.recipe.seed, epoch, i, copy=c) for i, c in zip(indices, copies)]
        shape = latents.shape[1:]
        aux_shape = None
        if o.aux_loss and self.aux_possible(latents):
            aux_shape = (shape[0], shape[1] // o.aux_pool, shape[2] // o.aux_pool)
        out: dict[str, list] = {"drop": [], "t": [], "noise": [], "t_aux": [], "noise_aux": []}
        kw = dict(mean=o.lognorm_mean, std=o.lognorm_std)
        for g in gens:
            out["drop"].append(bool(torch.rand((), generator=g).item() < o.caption_dropout))
            out["t"].append(sample_timesteps(1, o.timestep_sampler, generator=g, **kw))
            out["noise"].append(torch.randn(shape, generator=g))
            if aux_shape is not None:
                out["t_aux"].append(sample_timesteps(1, o.timestep_sampler, generator=g, **kw))
                out["noise_aux"].append(torch.randn(aux_shape, generator=g))
        dev = latents.device if latents.device.type != "meta" else torch.device("cpu")
        draws = {
            "drop": out["drop"],
            "t": time_shift(torch.cat(out["t"]), self.shift).to(dev),
            "noise": torch.stack(out["noise"]).to(dev),
        }
        if aux_shape is not None:
            draws["t_aux"] = time_shift(torch.cat(out["t_aux"]), self.shift).to(dev)
            draws["noise_aux"] = torch.stack(out["noise_aux"]).to(dev)
        return draws

    def aux_possible(self, latents: torch.Tensor) -> bool:
        f, p = self.recipe.objective.aux_pool, self.nextdit_config.patch_size
        h, w = latents.shape[-2:]
        return h % f == 0 and w % f == 0 and (h // f) % p == 0 and (w // f) % p == 0 and h // f >= p and w // f >= p

    def flow_losses(self, model: torch.nn.Module, latents, feats, mask, draws) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample main loss (B,) and auxiliary pooled loss (B,) or None."""
        t, x0 = draws["t"], draws["noise"].to(latents.dtype)
        main = per_sample_mse(self.velocity(model, interpolate(x0, latents, t), t, feats, mask),
                              velocity_target(x0, latents))
        aux = None
        if "t_aux" in draws:
            small = pool_latents(latents, self.recipe.objective.aux_pool)
            ta, xa = draws["t_aux"], draws["noise_aux"].to(latents.dtype)
            aux = per_sample_mse(self.velocity(model, interpolate(xa, small, ta), ta, feats, mask),
                                 velocity_target(xa, small))
        return main, aux

    def velocity(self, model: torch.nn.Module, xt: torch.Tensor, t: torch.Tensor, feats, mask) -> torch.Tensor:
        """The model's velocity at ``(xt, t)``, whatever its output means (``objective.prediction``):
        the loss is always the velocity loss (JiT's v-loss for ``data``)."""
        return velocity_from_output(model(xt, t, feats, mask), xt, t, self.recipe.objective.prediction)

    def latent_shape(self, batch: dict[str, Any]) -> torch.Size:
        """Shape of the batch's latents without encoding (the draws need it first)."""
        if "latents" in batch:
            return batch["latents"].shape
        n, _, h, w = batch["pixels"].shape
        f = self.autoencoder.downsample
        return torch.Size((n, self.autoencoder.latent_channels, h // f, w // f))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        n = len(batch["indices"])
        with torch.no_grad():
            draws = self.draw(batch, torch.empty(self.latent_shape(batch), device="meta"))
            draws = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in draws.items()}
            latents, feats, mask = self.encode_batch(batch, draws["drop"])
        main, aux = self.flow_losses(self.model, latents, feats, mask, draws)
        loss = main.mean() + (aux.mean() if aux is not None else 0.0)

        bad = not bool(torch.isfinite(loss.detach()))
        bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            # no backward for this micro-batch; optimizer_step skips the whole step it belongs to
            self._window_nonfinite = True
            return None
        self.loss_history.append(float(loss.detach()))
        self.index_history.append([int(i) for i in batch["indices"]])

        self.bins.update(draws["t"], main.detach())
        self.run_bins.update(draws["t"], main.detach())
        tokens = (latents.shape[-2] // self.nextdit_config.patch_size) * (latents.shape[-1] // self.nextdit_config.patch_size)
        self._batch_info = (n, n * tokens + int(mask.sum()))
        self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, batch_size=n, sync_dist=False)
        if logging_step(self):
            self.log("train/loss_main", main.mean().detach(), on_step=True, batch_size=n)
            if aux is not None:
                self.log("train/loss_aux", aux.mean().detach(), on_step=True, batch_size=n)
            self.log("train/caption_dropout_rate", float(np.mean(draws["drop"])), on_step=True, batch_size=n)
        return loss

    # ------------------------------------------------------------------------------------------
    # optimisation: clipping, EMA, throughput
    # ------------------------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if uses_deepspeed(self.trainer.strategy):
            # DeepSpeed clips inside its engine (the Trainer's gradient_clip_val is set for it)
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        total = clip_grad_norm(self, list(self.model.parameters()), self.recipe.optim.grad_clip)
        if total is not None and logging_step(self):
            self.log("train/grad_norm", total.detach().float(), on_step=True, prog_bar=False)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self.global_step

        def closure() -> Any:
            result = optimizer_closure()  # the step's last micro-batch: training_step and backward
            if self._window_nonfinite:
                # A micro-batch of this step had a non-finite loss: skip the step, not just that
                # micro-batch, or the other micro-batches' gradients would make a partial update.
                # Without gradients, and with None for a result (Lightning's mark of a skipped
                # backward, which its AMP scaler also honours), the optimizer leaves every weight and
                # its state as they are, as when the only micro-batch was bad; the LR schedule and
                # the step counter still advance, as they do then.
                optimizer.zero_grad(set_to_none=True)
                return None
            return result

        super().optimizer_step(epoch, batch_idx, optimizer, closure)
        self._skipped, self._window_nonfinite = self._window_nonfinite, False
        if self._skipped:
            self._count_skipped_step(step)
        else:
            self.nonfinite_in_a_row = 0
        # The EMA moves right after the weights, before any callback (ModelCheckpoint saves in
        # on_train_batch_end), so a checkpoint always holds the EMA of the weights it holds.
        if self.ema_model is not None and not self._skipped:
            if self._ema_shadow is None:  # built at the first update, after any cast or restore
                self._ema_shadow = (self._restored_shadow() or fp32_shadow(self.ema_model, self.model),)
            ema_update(self.ema_model, self.model, self.recipe.ema.decay, shadow=self._ema_shadow[0])

    def _count_skipped_step(self, step: int) -> None:
        """Count an optimizer step skipped for a non-finite loss; stop after too many in a row."""
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        self.log("train/nonfinite_steps", float(self.nonfinite_total), rank_zero_only=True)
        limit = self.recipe.trainer.max_nonfinite_steps
        log.warning("non-finite loss at step %d: step skipped (%d in a row, limit %d)",
                    step, self.nonfinite_in_a_row, limit)
        if self.nonfinite_in_a_row >= limit:
            raise RuntimeError(
                f"{self.nonfinite_in_a_row} non-finite losses in a row (trainer.max_nonfinite_steps={limit}); "
                "stopping. Lower optim.lr, check the data, or use 32-true precision to find the cause."
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = step_started(self)
        self._skipped = False
        self._step_at_start = self.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if outputs is None:
            return
        # Whether an optimizer step has just completed. Not (batch_idx + 1) % accumulate == 0: Lightning
        # also steps on an epoch's last micro-batch, where that test would skip the step's validation
        # (even the final one) and fold its t-bin losses into the next step.
        stepped = self.global_step != getattr(self, "_step_at_start", self.global_step)
        log_step_rates(self, self._step_started, getattr(self, "_batch_info", None), "tokens_per_s")
        every = max(1, self.recipe.trainer.log_every_n_steps)
        if stepped and self.global_step % every == 0:
            self.log_bins()
        v = self.recipe.validation
        step = self.global_step
        last = step >= self.trainer.max_steps  # the final step always validates and renders (unless switched off)
        if stepped and v.every_n_steps and (last or step % v.every_n_steps == 0):
            self.run_validation()
        if stepped and v.sample_every_n_steps and (last or step % v.sample_every_n_steps == 0):
            self.render_samples()

    def log_bins(self) -> None:
        sums = self.bins.sums.clone()
        counts = self.bins.counts.clone().double()
        if self.trainer.world_size > 1:
            packed = self.trainer.strategy.reduce(torch.cat([sums, counts]).to(self.device), reduce_op="sum").cpu()
            sums, counts = packed[: len(sums)], packed[len(sums):]
        means = {i: float(sums[i] / counts[i]) for i in range(len(sums)) if counts[i] > 0}
        for i, value in means.items():
            self.log(f"train_t/loss_bin{i:02d}", value, on_step=True, rank_zero_only=True)
        self._last_bins = means
        self.bins.reset()

    # ------------------------------------------------------------------------------------------
    # validation: fixed-timestep loss and sample grids
    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _prepared_val(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if getattr(self, "_val_cache", None) is None:
            prepared = []
            for batch in self.val_batches:
                n = len(batch["indices"])
                latents, feats, mask = self.encode_batch(batch, [False] * n)
                prepared.append((latents, feats, mask))
            self._val_cache = prepared
        return self._val_cache

    @torch.no_grad()
    def validation_losses(self, model: torch.nn.Module) -> tuple[float, list[float]]:
        """Mean loss over the validation set at ``n_timesteps`` fixed stratified t with fixed noise."""
        v = self.recipe.validation
        ts = stratified_timesteps(v.n_timesteps)
        per_t = []
        was_training = model.training
        model.eval()
        for k, t in enumerate(ts.tolist()):
            total, count = 0.0, 0
            for b, (latents, feats, mask) in enumerate(self._prepared_val()):
                g = torch.Generator().manual_seed(v.seed * 1_000_003 + k * 1009 + b)
                x0 = torch.randn(latents.shape, generator=g).to(latents)
                tt = torch.full((latents.shape[0],), t, device=latents.device)
                losses = per_sample_mse(self.velocity(model, interpolate(x0, latents, tt), tt, feats, mask),
                                        velocity_target(x0, latents))
                total += float(losses.sum())
                count += latents.shape[0]
            per_t.append(total / max(count, 1))
        model.train(was_training)
        return float(np.mean(per_t)), per_t

    def run_validation(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        results, metrics, by_t = {}, {}, {}
        for name, model in (("raw", self.model), ("ema", self.ema_model)):
            if model is None:
                continue
            mean, per_t = self.validation_losses(model)
            results[name] = mean
            by_t[name] = per_t
            metrics[f"val/loss_{name}"] = mean
            for k, value in enumerate(per_t):
                metrics[f"val_t/{name}_t{k}"] = value
        metrics["val/loss"] = results.get("ema", results.get("raw"))
        log_validation(self, metrics)
        self.last_validation = results
        self.last_validation_by_t = by_t  # at stratified_timesteps(validation.n_timesteps), for the run's plot
        return results

    def sampling_model(self) -> NextDiT:
        return self.ema_model if self.ema_model is not None else self.model

    @torch.no_grad()
    def render_samples(self) -> Any:
        """A grid of the fixed validation prompts/seeds rendered with the library's sampler."""
        v = self.recipe.validation
        if not v.prompts:
            return None
        from lumina_lightning.sampling.pipeline import LuminaPipeline

        model = self.sampling_model()
        was_training = model.training
        pipe = LuminaPipeline(model, self.text_encoder, self.autoencoder, device=self.device,
                              default_system=self.recipe.objective.system,
                              prediction=self.recipe.objective.prediction)
        seeds = [v.seeds[i % len(v.seeds)] for i in range(len(v.prompts))]
        size = self.recipe.data.resolution
        kwargs = {k: val for k, val in (("steps", v.steps), ("cfg_scale", v.cfg_scale)) if val is not None}
        result = pipe(list(v.prompts), seed=seeds, width=v.width or size, height=v.height or size,
                      preset=v.preset, **kwargs)
        model.train(was_training)
        grid = make_grid(result.images, [p[:40] for p in v.prompts])
        self.last_grid = grid
        if self.trainer.is_global_zero:
            name = f"samples/step_{self.global_step:07d}.png"
            if self.output_dir is not None:
                (self.output_dir / "samples").mkdir(parents=True, exist_ok=True)
                grid.save(self.output_dir / name)
            for lg in self.loggers:
                if hasattr(lg, "experiment") and hasattr(lg, "run_id") and lg.run_id:
                    lg.experiment.log_image(lg.run_id, grid, artifact_file=name)
        return grid

    # ------------------------------------------------------------------------------------------
    # checkpoints
    # ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["nextdit_config"] = self.nextdit_config.to_dict()
        checkpoint["nextdit_prefix"] = "model."
        checkpoint["nextdit_ema_prefix"] = "ema_model." if self.ema_model is not None else None
        if self.pipeline_spec is not None:
            checkpoint["lumina_pipeline"] = self.pipeline_spec
        checkpoint["lumina_counters"] = {"nonfinite_total": self.nonfinite_total}
        checkpoint["lumina_torch_rng"] = torch.get_rng_state()
        shadow = self._ema_shadow[0] if self._ema_shadow is not None else None
        if shadow is not None and self._shadow_is_whole(shadow):
            # the EMA's fp32 average (half-precision runs): without it a resumed run would restart the
            # average from the rounded EMA and drift from the straight run. Only where every rank holds
            # whole tensors (one device, DDP, ZeRO-1/2); sharded runs rebuild it from the EMA on resume.
            checkpoint["lumina_ema_fp32"] = [t.detach().cpu() for t in shadow]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_total = int(checkpoint.get("lumina_counters", {}).get("nonfinite_total", 0))
        if "lumina_torch_rng" in checkpoint:
            torch.set_rng_state(checkpoint["lumina_torch_rng"])
        self._loaded_shadow = checkpoint.get("lumina_ema_fp32")

    def _shadow_is_whole(self, shadow: list[torch.Tensor]) -> bool:
        params = trained_ema_params(self.ema_model, self.model)
        return len(params) == len(shadow) and all(tuple(t.shape) == tuple(p.shape) for t, p in zip(shadow, params))

    def _restored_shadow(self) -> list[torch.Tensor] | None:
        """The checkpoint's fp32 EMA average, once, where it fits this run's EMA (else None: rebuild)."""
        loaded, self._loaded_shadow = getattr(self, "_loaded_shadow", None), None
        if loaded is None or not is_low_precision(self.ema_model, self.model) or not self._shadow_is_whole(loaded):
            return None
        from lumina_lightning.training.parallelize import local_tensor

        params = trained_ema_params(self.ema_model, self.model)
        return [t.to(device=local_tensor(p).device, dtype=torch.float32) for t, p in zip(loaded, params)]


def make_grid(images: list, labels: list[str] | None = None, cols: int | None = None) -> Any:
    """Paste images into one grid (Pillow only), with an optional caption strip under each."""
    from PIL import Image, ImageDraw

    cols = cols or min(len(images), 4)
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    strip = 12 if labels else 0
    grid = Image.new("RGB", (cols * w, rows * (h + strip)), "white")
    draw = ImageDraw.Draw(grid)
    for i, img in enumerate(images):
        x, y = (i % cols) * w, (i // cols) * (h + strip)
        grid.paste(img, (x, y))
        if labels:
            draw.text((x + 1, y + h), labels[i][: max(4, w // 6)], fill="black")
    return grid
