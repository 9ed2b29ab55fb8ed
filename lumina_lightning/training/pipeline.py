"""``lumina pipeline PIPELINE.yaml``: the end-to-end progressive run, one command.

synthetic data → (optional) UniCap fine-tune + re-captioning → stage 1 → stage 2 → stage 3 → offline
mini-GenEval of every stage (EMA and raw weights of the last) → a summary with per-stage numbers
and wall times, where the MLflow runs are, and how to open the Gradio app on the result.

The pipeline file names recipes; it adds no training logic of its own. ``--smoke`` applies the
file's ``smoke`` overrides (a few steps, a few prompts) so tests can run the same command quickly.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lumina_lightning.fileio import content_digest as _content_digest
from lumina_lightning.fileio import move_aside as _move_aside
from lumina_lightning.fileio import weights_hash as _weights_hash

log = logging.getLogger("lumina_lightning.pipeline")


@dataclass
class SyntheticStep:
    """Generate the synthetic compositional dataset into ``out`` unless it is already there.

    The stages (and the captioner) train on this set: a recipe's own ``data.synthetic`` is switched
    off in a pipeline (see ``_data_overrides``), so ``synthetic.n=200`` trains every stage on 200 images.
    """

    out: str = "runs/tiny/synthetic"
    n: int = 4000
    n_test: int = 300
    size: int = 64
    seed: int = 0


@dataclass
class UniCapStep:
    """Fine-tune the tiny captioner, then re-caption the training images for the stages."""

    enabled: bool = False
    recipe: str = "recipes/tiny/unicap_finetune.yaml"
    overrides: list[str] = field(default_factory=list)
    levels: list[str] = field(default_factory=lambda: ["short", "long", "tags"])
    limit: int | None = None
    max_new_tokens: int = 48


@dataclass
class StageStep:
    """One training stage: a recipe plus dotted overrides."""

    recipe: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class EvalStep:
    """Mini-GenEval settings (see ``lumina eval``).

    ``device`` is where the exports are sampled, for evaluation and for TeaCache's calibration:
    ``cpu`` (the default, so scores match a CPU run of the same pipeline), ``cuda`` / ``cuda:N``, or
    ``auto`` (CUDA where there is one). Sampling stays fp32 on CUDA too (``load_pipeline``'s default):
    the scores then differ from CPU ones only by kernel rounding.
    """

    enabled: bool = True
    prompts: str = "runs/tiny/synthetic/test_geneval.jsonl"
    manifest: str | None = "runs/tiny/synthetic/test.jsonl"
    preset: str = "official"
    images_per_prompt: int = 2
    min_images_per_task: int = 0
    seed: int = 0
    max_prompts: int | None = None
    max_per_tag: int | None = None
    batch_size: int = 32
    steps: int | None = None
    cfg_scale: float | None = None
    every_stage: bool = True
    compare_raw: bool = True
    device: str = "cpu"


@dataclass
class TeaCacheCalibrationStep:
    """Fit TeaCache coefficients for each stage's export and store them, with ``threshold``, in its
    ``pipeline.json`` defaults (``LuminaPipeline.calibrate_teacache``): the released v1/v2 polynomials
    were fitted on the 2.6B model and barely skip, or skip badly, on any other, so without this the
    ``fast`` preset's cache does not mean on these exports what it means on the released model.

    ``prompts`` captions are taken from the start of the stage's training manifest (never the
    evaluation prompts), each sampled from ``seeds``. Presets without TeaCache (``official``) are
    unaffected (see ``resolve_settings``).
    """

    enabled: bool = True
    threshold: float = 0.1
    prompts: int = 4
    seeds: list[int] = field(default_factory=lambda: [101, 102])


# the paired comparisons a `no_worse` target may name (see _comparisons)
COMPARISONS = ("final_vs_stage1", "ema_vs_raw")


@dataclass
class Targets:
    """Quality bars the final model (EMA weights) is reported against — in the summary, never enforced.

    Attributes:
        scores: minimum mini-GenEval per task (a GenEval tag) or ``overall``; judged on the point
            estimate, printed with its 95 % interval.
        no_worse: paired comparisons (``final_vs_stage1``, ``ema_vs_raw``) whose first model must not
            be measurably worse than the second: met while the paired interval reaches 0 or above.
    """

    scores: dict[str, float] = field(default_factory=dict)
    no_worse: list[str] = field(default_factory=list)


@dataclass
class PipelineConfig:
    """An end-to-end pipeline; ``smoke`` holds overrides for ``--smoke`` (e.g. ``stages.*`` steps).

    ``stage_overrides`` are dotted recipe overrides applied to every stage after its own and after
    ``--smoke``'s (``stage_smoke_overrides``), e.g. ``stage_overrides=[trainer.accelerator=gpu]`` on the
    command line to train the tiny pipeline on a GPU (with ``eval.device=cuda`` to sample there too).
    Every stage's recipe is loaded with its overrides before the first one trains, so a bad key fails
    in seconds, not after stage 1.
    """

    name: str = "tiny"
    output_dir: str = "runs/${name}"
    synthetic: SyntheticStep = field(default_factory=SyntheticStep)
    unicap: UniCapStep = field(default_factory=UniCapStep)
    stages: list[StageStep] = field(default_factory=list)
    teacache_calibration: TeaCacheCalibrationStep = field(default_factory=TeaCacheCalibrationStep)
    eval: EvalStep = field(default_factory=EvalStep)
    targets: Targets = field(default_factory=Targets)
    stage_overrides: list[str] = field(default_factory=list)
    stage_smoke_overrides: list[str] = field(default_factory=list)
    smoke: dict[str, Any] = field(default_factory=dict)


def load_pipeline_config(path: str | os.PathLike, overrides: list[str] = (), smoke: bool = False) -> PipelineConfig:
    """Read and validate a pipeline YAML (unknown keys name the file and the closest key)."""
    from omegaconf import OmegaConf

    from lumina_lightning.training.recipe import (
        RecipeError,
        _deep_merge,
        _load_file,
        _nest,
        build_dataclass,
        check_section,
        parse_override,
    )

    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"pipeline file {path} does not exist")
    # `defaults: [pipeline]` merges other pipeline files first, as in recipes (recipes/tiny/latent_pipeline.yaml);
    # each file's stage entries are checked, and the recipe paths it names resolved, in that file
    data = _load_file(path, (), [], PipelineConfig, per_file=_check_pipeline_file)
    if smoke:
        data = _deep_merge(data, data.get("smoke") or {})
    for item in overrides:
        keys, value = parse_override(item)
        patch = _nest(keys, value)
        where = f"command line ({item})"
        check_section(patch, PipelineConfig, where)
        _check_steps(patch, where, path)  # recipe paths on the command line are relative to the pipeline file
        data = _deep_merge(data, patch)
    # under the schema's defaults, so `${name}` in the default `output_dir` resolves in a file that sets no output_dir
    data = _deep_merge(dataclasses.asdict(PipelineConfig()), data)
    try:
        resolved = OmegaConf.to_container(OmegaConf.create(data), resolve=True)
        stages = [build_dataclass(StageStep, s, str(path), "stages.") for s in resolved.pop("stages", [])]
        cfg = build_dataclass(PipelineConfig, resolved, str(path))
    except RecipeError:
        raise
    except Exception as err:  # omegaconf's InterpolationKeyError, or a key no check above caught
        raise RecipeError(f"{path}: cannot build the pipeline: {type(err).__name__}: {err}") from None
    cfg.stages = stages
    if not cfg.stages:
        raise RecipeError(f"{path}: `stages` is empty; list at least one stage recipe")
    cfg.unicap.recipe = _beside(cfg.unicap.recipe, path)  # the schema's default, which no file rebased
    _check_stage_names(cfg, path, smoke)
    _check_targets(cfg.targets, str(path))
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", cfg.eval.device):
        raise RecipeError(f"{path}: `eval.device` must be cpu, cuda, cuda:N or auto, got {cfg.eval.device!r}")
    c = cfg.teacache_calibration
    if c.enabled and (not c.threshold > 0 or c.prompts < 1 or not c.seeds):
        raise RecipeError(f"{path}: teacache_calibration needs threshold > 0, prompts >= 1 and at least one seed "
                          f"(got threshold={c.threshold}, prompts={c.prompts}, seeds={c.seeds})")
    return cfg


def _check_targets(targets: Targets, where: str) -> None:
    from lumina_lightning.data.synth import TAGS
    from lumina_lightning.training.recipe import RecipeError

    for key, value in targets.scores.items():
        if key != "overall" and key not in TAGS:
            raise RecipeError(f"{where}: `targets.scores.{key}` is not a task; use `overall` or one of {list(TAGS)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= value <= 1.0:
            raise RecipeError(f"{where}: `targets.scores.{key}` must be a score in [0, 1], got {value!r}")
    for name in targets.no_worse:
        if name not in COMPARISONS:
            raise RecipeError(f"{where}: `targets.no_worse` names {name!r}; known comparisons: {list(COMPARISONS)}")


def _check_pipeline_file(data: dict[str, Any], path: Path) -> None:
    """One pipeline file's own keys, before `defaults` merge them: its stage entries and its `smoke`
    section fit the schema, and the recipes it names are read relative to *it*, not to a pipeline
    that inherits them from another folder."""
    _check_steps(data, str(path), path)
    if data.get("smoke") is not None:
        from lumina_lightning.training.recipe import check_section

        check_section(data["smoke"], PipelineConfig, str(path), "smoke.")
        _check_steps(data["smoke"], str(path), path, "smoke.")


def _check_steps(section: dict[str, Any], where: str, pipeline_file: Path, prefix: str = "") -> None:
    """Check ``section``'s stage entries against :class:`StageStep` and resolve its recipe paths."""
    from lumina_lightning.training.recipe import RecipeError, check_section

    for i, entry in enumerate(section.get("stages") or []):
        check_section(entry, StageStep, where, f"{prefix}stages[{i}].")
        if not entry.get("recipe"):
            raise RecipeError(f"{where}: `{prefix}stages[{i}]` names no `recipe`")
        entry["recipe"] = _beside(entry["recipe"], pipeline_file)
    unicap = section.get("unicap")
    if isinstance(unicap, dict) and isinstance(unicap.get("recipe"), str):
        unicap["recipe"] = _beside(unicap["recipe"], pipeline_file)


def _check_stage_names(cfg: PipelineConfig, path: Path, smoke: bool) -> None:
    """Refuse two stages with one `stage` name: each trains in `<output_dir>/<stage>`, so the second
    would resume from the first's checkpoints and overwrite its export."""
    from lumina_lightning.training.recipe import RecipeError, parse_override, peek_key

    seen: dict[str, int] = {}
    for i, stage in enumerate(cfg.stages):
        name = peek_key(Path(stage.recipe), "stage")
        for item in _stage_overrides(cfg, stage, smoke):  # a `stage=` override renames it
            keys, value = parse_override(item)
            name = value if keys == ["stage"] else name
        if name is not None and name in seen:  # a recipe without a name fails in its own load
            j = seen[name]
            raise RecipeError(
                f"{path}: stages[{j}] ({cfg.stages[j].recipe}) and stages[{i}] ({stage.recipe}) both train stage "
                f"`{name}`, so they would share the folder {cfg.output_dir}/{name}; give one its own name "
                f"(`overrides: [stage=...]`)")
        seen[name] = i


def _stage_overrides(cfg: PipelineConfig, stage: StageStep, smoke: bool, previous_version: bool = False) -> list[str]:
    """A stage's own overrides, then ``--smoke``'s, then the pipeline's for every stage.

    What the user sets for every stage (``stage_overrides``, e.g. on the command line) wins over
    ``--smoke``'s quick settings, while ``--smoke`` still cuts short a stage whose own entry sets, say,
    ``trainer.max_steps`` (recipes/tiny/shapes_pipeline.yaml). ``previous_version``: the order of
    the versions before this one (smoke last), whose fingerprints stage records may hold.
    """
    quick = list(cfg.stage_smoke_overrides) if smoke else []
    if previous_version:
        return list(stage.overrides) + list(cfg.stage_overrides) + quick
    return list(stage.overrides) + quick + list(cfg.stage_overrides)


def _stage_recipe(cfg: PipelineConfig, stage: StageStep, i: int, smoke: bool, captions: Path | None, root: Path,
                  previous_export: str | None, previous_version: bool = False) -> Any:
    """Stage ``i``'s recipe as this pipeline trains it: its overrides (:func:`_stage_overrides`), the
    captions manifest for the first stage, its folder under the pipeline's folder ``root``, the previous
    stage's export as ``model.init_from`` (where its recipe starts from one), and the pipeline's dataset
    (:func:`_data_overrides`). ``previous_version``: as the versions before this one built it (smoke
    overrides last, no dataset overrides), for :func:`_upgrade_record`.
    """
    from lumina_lightning.training.recipe import load_recipe

    overrides = _stage_overrides(cfg, stage, smoke, previous_version)
    # paths go in JSON-quoted: overrides are YAML, where a bare path with " #" is cut and one with ": " a mapping
    if captions is not None and i == 0:
        # the versions before this one named the captions under output_dir as spelled (relative by default)
        spelled = Path(cfg.output_dir) / captions.relative_to(root) if previous_version and captions.is_relative_to(root) \
            else captions
        overrides.append(f"data.path={json.dumps(str(spelled))}")
    named = load_recipe(stage.recipe, overrides).config
    overrides.append(f"output_dir={json.dumps(str(root / named.stage))}")
    if named.model.init_from and previous_export:
        overrides.append(f"model.init_from={json.dumps(previous_export)}")
    if not previous_version:
        overrides += _data_overrides(cfg, stage.recipe, load_recipe(stage.recipe, overrides))
    return load_recipe(stage.recipe, overrides)


def _unicap_recipe(cfg: PipelineConfig, smoke: bool, previous_version: bool = False) -> Any:
    """The captioner's recipe as the pipeline trains it (see :func:`_stage_recipe`), under this
    pipeline's folder, as every stage: a smoke run must not resume a real run's captioner."""
    from lumina_lightning.training.recipe import load_recipe

    quick, own = list(UNICAP_SMOKE_OVERRIDES if smoke else ()), list(cfg.unicap.overrides)
    overrides = own + quick if previous_version else quick + own  # the user's own win, as for the stages
    overrides.append(f"output_dir={json.dumps(str(Path(cfg.output_dir).resolve() / 'unicap'))}")
    if not previous_version:
        overrides += _data_overrides(cfg, cfg.unicap.recipe, load_recipe(cfg.unicap.recipe, overrides))
    return load_recipe(cfg.unicap.recipe, overrides)


def _captions_path(cfg: PipelineConfig) -> Path:
    """Where the captioner's captions of the training images go (the first stage's ``data.path``):
    absolute, so that stage 1's fingerprint names it relative to the pipeline's folder (``_under_root``)
    however ``output_dir`` is spelled, and a folder moved whole keeps its stages."""
    return Path(cfg.output_dir).resolve() / "captions" / "train_unicap.jsonl"


def _data_overrides(cfg: PipelineConfig, recipe: str, loaded: Any) -> list[str]:
    """``data.synthetic=null`` for a recipe that generates the synthetic dataset itself when it runs
    alone (``data.synthetic``): in a pipeline the synthetic step has made it, with the pipeline's
    ``synthetic`` settings, and the stage trains on that set. Left on, the recipe's own settings would
    regenerate it in place (``ensure_synthetic``: ``synthetic.n=200`` would train on the recipe's 4,000
    images) or write a synthetic set into a folder that holds none (the captions' folder).

    Refused where the recipe reads its own set (its ``data.path``, not overridden) outside
    ``synthetic.out``: the stage would train on another dataset than the one the pipeline makes.
    """
    from lumina_lightning.training.recipe import RecipeError, load_recipe

    data = loaded.config.data
    if not data.synthetic:
        return []
    try:
        own = load_recipe(recipe).config.data.path
    except RecipeError:
        own = None  # a recipe that needs its overrides to load: its data.path is not its own
    folder = Path(data.path).expanduser().resolve().parent if data.path else None
    if data.path and data.path == own and folder != Path(cfg.synthetic.out).expanduser().resolve():
        raise RecipeError(
            f"{recipe} trains on data.path={data.path}, the synthetic dataset its `data.synthetic` generates "
            f"when it runs alone, but this pipeline generates its dataset into synthetic.out={cfg.synthetic.out}, "
            f"so the stage would train on another set than the pipeline's. {_use_own_set(folder)} the stage at "
            f"the pipeline's set (e.g. `stage_overrides=[data.path={Path(cfg.synthetic.out) / Path(data.path).name}]`)")
    return ["data.synthetic=null"]


def _use_own_set(folder: Path) -> str:
    """Advice to generate the pipeline's set into a stage's own folder, given only where that folder is
    empty or holds a generated synthetic set: one holding the user's files would be written over."""
    from lumina_lightning.data.synth import holds_foreign_files

    return "Point" if holds_foreign_files(folder) else f"Set `synthetic.out={folder}`, or point"


def _trained_on_other_data(cfg: PipelineConfig, before: Any) -> bool:
    """Whether a version before this one, which let a stage's ``data.synthetic`` (its recipe as that
    version built it: ``before``) regenerate the pipeline's dataset, trained it on another set than the
    pipeline's ``synthetic`` settings make: then its record must not be upgraded (:func:`_data_overrides`)."""
    from lumina_lightning.data.synth import synthetic_config

    data = before.config.data
    if not data.synthetic or not data.path:
        return False
    if Path(data.path).expanduser().resolve().parent != Path(cfg.synthetic.out).expanduser().resolve():
        return False  # the captions manifest: the synthetic set it generated there was never read
    s = cfg.synthetic
    try:
        return synthetic_config(**data.synthetic) != synthetic_config(n=s.n, n_test=s.n_test, size=s.size, seed=s.seed)
    except (TypeError, ValueError):
        return True


def _beside(recipe: str, pipeline_file: Path) -> str:
    candidate = (pipeline_file.parent / recipe).resolve()
    if Path(recipe).is_absolute() or not candidate.exists():
        return recipe
    return str(candidate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lumina pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pipeline", help="pipeline YAML, e.g. recipes/tiny/pipeline.yaml")
    # default=[]: else argparse counts this nargs="*" positional as required (see training/run.py)
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="key=value overrides of the pipeline file")
    p.add_argument("--smoke", action="store_true", help="apply the file's `smoke` overrides (a quick check)")
    p.add_argument("--skip-eval", action="store_true", help="train only")
    return p


def main(argv: list[str] | None = None) -> int:
    from lumina_lightning.cli import parse_args_with_input
    from lumina_lightning.training.recipe import find_recipe

    args = parse_args_with_input(build_parser(), argv, "pipeline", "pipeline file", find=find_recipe)
    from lumina_lightning.training.recipe import RecipeError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_pipeline_config(args.pipeline, args.overrides, smoke=args.smoke)
        if args.skip_eval:
            cfg.eval.enabled = False
        summary = run_pipeline(cfg, smoke=args.smoke)
    except RecipeError as err:
        print(f"pipeline error: {err}", file=sys.stderr)
        return 2
    if summary.get("stopped"):
        return int(summary.get("exit_code") or 1)  # a signal's own code (130 / 143), as `lumina train`
    return 0 if summary.get("ok") else 1


# ------------------------------------------------------------------------------------------------


def run_pipeline(cfg: PipelineConfig, smoke: bool = False) -> dict[str, Any]:
    """Run every step; returns (and writes ``<output_dir>/summary.json``) the per-stage results."""
    import torch

    from lumina_lightning.training.recipe import RecipeError
    from lumina_lightning.training.run import train

    out = Path(cfg.output_dir)
    root = out.resolve()
    captions = _captions_path(cfg) if cfg.unicap.enabled else None
    # fail on a bad recipe, override or dataset now, not after hours of stage 1
    if cfg.unicap.enabled:
        try:
            _unicap_recipe(cfg, smoke)
        except RecipeError as e:
            raise RecipeError(f"unicap {cfg.unicap.recipe}: {e}") from None
    for i, stage in enumerate(cfg.stages):
        try:
            _stage_recipe(cfg, stage, i, smoke, captions, root, None)
        except RecipeError as e:
            raise RecipeError(f"stage {stage.recipe}: {e}") from None
    if cfg.eval.enabled and cfg.eval.device.startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"eval.device={cfg.eval.device}, but this host has no CUDA device (use cpu or auto)")

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"name": cfg.name, "smoke": smoke, "stages": [], "ok": False}
    # written now, so a run interrupted anywhere (a stage, TeaCache calibration, an evaluation) leaves
    # "ok": false, never the previous run's finished summary
    _write(out, {**summary, "started": time.strftime("%Y-%m-%d %H:%M:%S")})

    t0 = time.perf_counter()
    synth = _synthetic(cfg.synthetic)
    summary["synthetic"] = {"dir": str(synth), "seconds": round(time.perf_counter() - t0, 1)}

    caption_manifest = None
    if cfg.unicap.enabled:
        caption_manifest = _unicap(cfg, synth, summary, smoke)
        if caption_manifest is None:  # the captioner's training was stopped by a signal
            _write(out, summary)
            return summary

    inputs = {"synthetic": dataclasses.asdict(cfg.synthetic),
              "captions": _content_digest(caption_manifest) if caption_manifest is not None else None}
    previous_export: str | None = None
    previous: ParentWeights | None = None
    for i, stage in enumerate(cfg.stages):
        # Every stage writes under the pipeline's folder, and a stage that starts from a previous
        # one (`model.init_from` in its recipe) starts from *this* pipeline's previous export — so a
        # smoke run never resumes or initialises from a real run's checkpoints.
        loaded = _stage_recipe(cfg, stage, i, smoke, caption_manifest, root, previous_export)
        stage_dir = Path(loaded.config.output_dir)
        init_from = loaded.config.model.init_from
        parent = previous if init_from and init_from == previous_export else (
            ParentWeights(_content_digest(init_from)) if init_from else None)
        fingerprint = _stage_fingerprint(loaded, parent, inputs, root=root)
        t0 = time.perf_counter()
        print(f"\n=== stage {i + 1}/{len(cfg.stages)}: {loaded.config.stage} ({stage.recipe}) ===", flush=True)
        record = _read_record(stage_dir)
        if record.get("fingerprint") not in (None, fingerprint):
            before = _stage_recipe(cfg, stage, i, smoke, caption_manifest, root, previous_export, previous_version=True)
            if not _trained_on_other_data(cfg, before):
                record = _upgrade_record(stage_dir, record, loaded, parent, inputs, fingerprint, previous=before)
        export_dir = stage_dir / "export"
        # the autoencoder's weights: a conv autoencoder folder retrained in place keeps its path
        ae_path = loaded.config.autoencoder.path if loaded.config.autoencoder.kind != "pixel" else None
        ae_digest = _content_digest(ae_path)
        changed = record.get("fingerprint") != fingerprint or bool(
            record.get("entry") and record.get("autoencoder_digest") != ae_digest)
        if not changed and record.get("entry") and record.get("export_digest") == _content_digest(export_dir):
            # the same recipe on the same parent weights and data, and its export is whole: training
            # it again would only resume at max_steps and re-export the same weights
            log.info("stage %s: reused (unchanged): same recipe, inputs and parent weights as the run that "
                     "exported %s", loaded.config.stage, export_dir)
            # the export where it is now (the pipeline's folder may have moved since)
            entry = {**record["entry"], "export": str(export_dir), "reused": True}
            digest, tracking_uri = record["export_digest"], record.get("tracking_uri")
            weights = record.get("export_weights") or _record_export_weights(stage_dir, record, export_dir)
        else:
            if changed and stage_dir.is_dir() and any(stage_dir.iterdir()):
                # resume=auto would continue (or, at max_steps, just re-export) the old run whatever changed
                aside = _move_aside(stage_dir)
                log.warning("stage %s: its recipe, inputs or parent weights changed since %s was trained (or it "
                            "has no pipeline record); moved that folder to %s and training this stage afresh",
                            loaded.config.stage, stage_dir, aside)
            elif not changed:
                _set_aside_changed_export(f"stage {loaded.config.stage}", export_dir, record)
            stage_dir.mkdir(parents=True, exist_ok=True)
            # written first, so an interrupted stage resumes from its last.ckpt on the next run
            _write_record(stage_dir, {"fingerprint": fingerprint})
            resumed_from = _resume_step(loaded)
            result = train(loaded)
            if result.exit_code:
                summary["stopped"] = f"stage {loaded.config.stage} stopped by {result.stopped_by_signal}"
                summary["exit_code"] = result.exit_code  # 130 / 143: `lumina pipeline` exits with it
                _write(out, summary)
                return summary
            entry = {
                "stage": loaded.config.stage,
                "recipe": stage.recipe,
                "resolution": loaded.config.data.resolution,
                "steps": result.global_step,
                # the losses and seconds below cover this run only: the steps after this one
                "resumed_from_step": resumed_from,
                "train_seconds": round(time.perf_counter() - t0, 1),
                "loss_first": _mean(result.losses[:20]),
                "loss_last": _mean(result.losses[-20:]),
                "val_loss": result.validation,
                "export": str(result.export_dir),
                "mlflow_run_id": result.mlflow_run_id,
            }
            export_dir, tracking_uri = result.export_dir, result.tracking_uri
            digest, weights = _content_digest(export_dir), _weights_hash(export_dir)
            _write_record(stage_dir, {"fingerprint": fingerprint, "export_digest": digest, "export_weights": weights,
                                      "entry": entry, "tracking_uri": tracking_uri,
                                      "autoencoder_digest": _content_digest(ae_path)})
            del result
        if cfg.eval.cfg_scale is not None and export_dir is not None:
            # The export is judged with the pipeline's guidance scale (eval.cfg_scale), so `lumina
            # sample` / `demo` on it start from the same one instead of the preset's.
            from lumina_lightning.sampling.pipeline_io import update_pipeline_defaults

            update_pipeline_defaults(export_dir, cfg_scale=float(cfg.eval.cfg_scale))
        elif export_dir is not None:
            # a re-run with eval.cfg_scale unset leaves the export as a fresh run would: the preset's scale
            _drop_export_defaults(export_dir, ("cfg_scale",), "eval.cfg_scale is not set: removed the guidance "
                                  "scale an earlier run stored")
        if cfg.teacache_calibration.enabled and export_dir is not None:
            entry["teacache"] = _calibrate_teacache(cfg.teacache_calibration, export_dir,
                                                    loaded.config.data.path, entry["resolution"],
                                                    device=_sampling_device(cfg.eval))
        elif export_dir is not None:
            _drop_teacache_calibration(export_dir)
        summary["stages"].append(entry)
        summary["tracking_uri"] = tracking_uri
        previous_export, previous = str(export_dir), ParentWeights(digest, weights)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if cfg.eval.enabled:
        last = len(summary["stages"]) - 1
        for i, entry in enumerate(summary["stages"]):
            if not cfg.eval.every_stage and i != last:
                continue
            variants = [("ema", "auto")] + ([("raw", False)] if (cfg.eval.compare_raw and i == last) else [])
            for label, ema in variants:
                t0 = time.perf_counter()
                res = _evaluate(cfg, entry["export"], out / "eval" / f"{entry['stage']}_{label}", ema,
                                size=entry["resolution"])
                entry.setdefault("geneval", {})[label] = {
                    "overall": res.get("overall"),
                    "tags": res.get("tags"),
                    "ci95": res.get("ci95"),
                    "prompt_blind": res.get("prompt_blind"),
                    # the detector on ground-truth renders at this stage's size: the score's ceiling
                    "detector_ceiling": (res.get("detector_validation") or {}).get("overall"),
                    # ... and on the renders passed through a latent model's autoencoder (None in pixel space)
                    "detector_ceiling_autoencoder": ((res.get("detector_validation") or {}).get("autoencoder")
                                                     or {}).get("overall"),
                    "undersized": res.get("undersized"),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
        summary["comparisons"] = _comparisons(summary, out / "eval")
        summary["targets"] = judge_targets(cfg.targets, summary)
    summary["total_seconds"] = round(time.perf_counter() - started, 1)
    summary["ok"] = True
    _write(out, summary)
    _print_summary(summary, out)
    return summary


STAGE_RECORD = "pipeline_stage.json"
# Recipe keys that cannot change what a stage trains or exports, left out of its fingerprint, so that
# moving the pipeline's folder or switching MLflow on does not retrain every stage: where it writes
# and how it resumes, what it reports on the way (MLflow, progress bar, log cadence; none of them
# draws from a random generator) and which training checkpoints it keeps (last.ckpt is written at
# every save, and a resume from any checkpoint continues the run exactly). Validation and sample-grid
# settings stay in: the stage's recorded validation loss comes from them.
UNWEIGHED_KEYS = ("output_dir", "resume", "tracking", "trainer.log_every_n_steps", "trainer.enable_progress_bar",
                  "trainer.checkpoint_every_n_steps", "trainer.keep_checkpoints")
# the keys the fingerprints of earlier versions left out
RESUME_KEYS = ("resume",)


@dataclass(frozen=True)
class ParentWeights:
    """The weights a stage starts from (``model.init_from``), as its fingerprint names them.

    ``weights``: :func:`~lumina_lightning.fileio.weights_hash` of this pipeline's previous export, taken
    once when it was exported. A re-export of the same weights keeps it (a stage whose export folder
    was deleted resumes at ``max_steps`` and exports them again, with new file dates), so the later
    stages are not retrained. ``digest``: the export's name/size/mtime ``content_digest``, which the
    fingerprints of earlier versions hold, and what names an ``init_from`` from outside the pipeline
    (hashing that on every run would read it whole).
    """

    digest: str | None
    weights: str | None = None

    @property
    def identity(self) -> str | None:
        return self.weights or self.digest


def _stage_fingerprint(loaded: Any, parent: ParentWeights | str | None, inputs: dict[str, Any], legacy: bool = False,
                       *, formula: str = "current", root: Path | None = None) -> str:
    """What a stage's weights depend on: its resolved recipe, the weights it starts from and the data
    inputs, including the contents of its ``data.path`` file, of the manifests a data YAML there lists,
    and of ``data.val_path`` (a manifest edited in place keeps its path). The images they list are not
    read, which would cost a pass over the dataset.

    The recipe counts without :data:`UNWEIGHED_KEYS`, without ``model.init_from`` where ``parent``
    names its weights, and with the pipeline's folder ``root`` written as ``<output_dir>`` in its
    paths (the captions manifest, the previous export): a pipeline folder moved whole keeps its stages.

    ``formula``: ``previous`` (or ``legacy=True``, older still) computes what the records of earlier
    versions hold (see :func:`_upgrade_record`): the whole recipe but ``resume``, ``parent`` by its
    ``digest`` (and ``legacy`` without the data YAML's manifests and ``data.val_path``).
    """
    if not isinstance(parent, ParentWeights):
        parent = ParentWeights(parent) if parent is not None else None
    formula = "legacy" if legacy else formula
    data_path = loaded.config.data.path
    data = _content_digest(data_path) if data_path and Path(data_path).is_file() else None
    if formula == "current":
        recipe = _weights_recipe(loaded.resolved, parent is not None and parent.identity is not None, root)
        found = {"recipe": recipe, "parent": parent.identity if parent else None, "inputs": inputs, "data": data}
    else:
        recipe = {k: v for k, v in loaded.resolved.items() if k not in RESUME_KEYS}
        found = {"recipe": recipe, "parent": parent.digest if parent else None, "inputs": inputs, "data": data}
    if formula == "legacy":  # what records written before the two keys below hold
        return hashlib.sha256(json.dumps(found, sort_keys=True, default=str).encode()).hexdigest()[:20]
    # keys added only where there is something to record, so that a stage without them keeps the
    # fingerprint it was trained under
    sources = _listed_manifests(data_path)
    if sources:
        found["sources"] = {name: _content_digest(path) for name, path in sources.items()}
    val_path = loaded.config.data.val_path
    if val_path and Path(val_path).is_file():
        found["val"] = {"file": _content_digest(val_path),
                        "sources": {n: _content_digest(p) for n, p in _listed_manifests(val_path).items()}}
    blob = json.dumps(found, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _weights_recipe(resolved: dict[str, Any], parent_named: bool, root: Path | None) -> dict[str, Any]:
    """The part of a resolved recipe a stage's weights depend on (see :func:`_stage_fingerprint`)."""
    recipe = copy.deepcopy(resolved)
    for key in UNWEIGHED_KEYS + (("model.init_from",) if parent_named else ()):
        *path, last = key.split(".")
        section = recipe
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section.pop(last, None)
    return _under_root(recipe, str(root)) if root is not None else recipe


def _under_root(value: Any, root: str) -> Any:
    """``value`` with every path string in the folder ``root`` written relative to it (``<output_dir>/...``)."""
    if isinstance(value, dict):
        return {k: _under_root(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_under_root(v, root) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root.rstrip(os.sep) + os.sep)):
        return "<output_dir>" + value[len(root):]
    return value


def _upgrade_record(stage_dir: Path, record: dict[str, Any], loaded: Any, parent: ParentWeights | str | None,
                    inputs: dict[str, Any], fingerprint: str, previous: Any = None) -> dict[str, Any]:
    """A record whose fingerprint an earlier version computed: where the stage is what it was, its
    record gets today's fingerprint. Without this, a re-run after an upgrade would move every finished
    stage aside and train it again (days, for the real recipes).

    ``previous`` is the stage's recipe as that version built it (its overrides in their order then);
    ``loaded`` is tried too (a record matching a formula on today's recipe is as safe). Accepted: the
    previous formula (the whole recipe but ``resume``, the parent weights by name/size/mtime), whatever
    the newly left-out keys hold; and the older one (without a data YAML's manifests and
    ``data.val_path``) where none of those files changed after the record was written.
    """
    old = record.get("fingerprint")
    if not old or old == fingerprint:
        return record
    # the recipe as the previous version built it counts only where it trains what today's does: with
    # --smoke, the user's stage_overrides used to lose to smoke's, so a record of 2 smoke steps must not
    # pass for today's 5 (its data.synthetic, nulled since, is checked by _trained_on_other_data)
    recipes = [loaded] + ([previous] if previous is not None and _same_training(previous, loaded) else [])
    if any(old == _stage_fingerprint(r, parent, inputs, formula="previous") for r in recipes):
        why = "fingerprinted by an earlier version (its whole recipe, its parent's weights by their file dates)"
    elif any(old == _stage_fingerprint(r, parent, inputs, legacy=True) for r in recipes) \
            and not _newly_covered_changed(stage_dir, loaded):
        why = "fingerprinted by an earlier version; its manifests are older than it"
    else:
        return record
    log.info("stage %s: record %s, so it keeps its weights (record updated)", loaded.config.stage, why)
    record = {**record, "fingerprint": fingerprint}
    _write_record(stage_dir, record)
    return record


def _same_training(a: Any, b: Any) -> bool:
    """Whether two builds of a stage's recipe train the same weights (their weighed keys agree), the
    ``data.synthetic`` switch aside."""
    def weighed(loaded: Any) -> dict[str, Any]:
        recipe = _weights_recipe(loaded.resolved, parent_named=False, root=None)
        if isinstance(recipe.get("data"), dict):
            recipe["data"] = {k: v for k, v in recipe["data"].items() if k != "synthetic"}
            if recipe["data"].get("path"):  # the same file, however spelled (earlier versions: relative captions)
                recipe["data"]["path"] = str(Path(recipe["data"]["path"]).expanduser().resolve())
        return recipe

    return weighed(a) == weighed(b)


def _newly_covered_changed(stage_dir: Path, loaded: Any) -> bool:
    """Whether a data YAML's manifests or ``data.val_path``, which legacy fingerprints did not cover,
    changed after the stage's record was written."""
    written = (stage_dir / STAGE_RECORD).stat().st_mtime
    cfg = loaded.config.data
    newly_covered = [*_listed_manifests(cfg.path).values(), *_listed_manifests(cfg.val_path).values()]
    if cfg.val_path and Path(cfg.val_path).is_file():
        newly_covered.append(Path(cfg.val_path))
    return any(f.stat().st_mtime > written for f in newly_covered)


def _record_export_weights(stage_dir: Path, record: dict[str, Any], export_dir: Path) -> str | None:
    """Hash the weights of an export whose record has no ``export_weights`` (an earlier version wrote
    it; the export is unchanged since, its ``export_digest`` says) once, and keep it in the record."""
    weights = _weights_hash(export_dir)
    log.info("%s: hashed the weights of %s once (records before this version name them by file dates)",
             stage_dir.name, export_dir)
    _write_record(stage_dir, {**record, "export_weights": weights})
    return weights


def _set_aside_changed_export(what: str, export_dir: Path, record: dict[str, Any]) -> None:
    """Move aside an export that changed since its record was written (edited by hand, copied over)
    before the run that resumes at ``max_steps`` writes its weights there again: it may be someone's work."""
    if not record.get("export_digest") or not export_dir.exists():
        return
    if _content_digest(export_dir) == record["export_digest"]:
        return
    aside = _move_aside(export_dir)
    log.warning("%s: its export %s changed since the pipeline recorded it (edited, or written by another run); "
                "moved it to %s, and exporting the stage's weights there again", what, export_dir, aside)


def _resume_step(loaded: Any) -> int | None:
    """The step a run of ``loaded`` resumes from (``resume: auto`` and a ``last.ckpt``), read from the
    checkpoint before it trains; ``None`` for a fresh run or a step this cannot read."""
    from lumina_lightning.training.session import resolve_resume

    try:
        path = resolve_resume(loaded.config.resume, Path(loaded.config.output_dir) / "checkpoints")
    except (OSError, ValueError):
        return None  # train() reports it
    if path is None:
        return None
    from lumina_lightning.models.io import read_checkpoint_meta

    try:
        # weights-only, and only the non-tensor entries of a sharded folder (FSDP's meta.pt, DeepSpeed's
        # client state); a .ckpt file is memory-mapped, so its tensors are not read
        return int(read_checkpoint_meta(path)["global_step"])
    except Exception as err:  # noqa: BLE001 - any unreadable checkpoint: the summary just cannot say
        log.info("%s: cannot read the step it resumes from in %s (%s: %s)", loaded.config.stage, path,
                 type(err).__name__, err)
        return None


def _listed_manifests(path: str | None) -> dict[str, Path]:
    """The manifest files a data YAML's ``META`` names (as written there -> resolved path); empty for a
    manifest, a folder or a YAML that does not parse (its own load reports that)."""
    if not path or Path(path).suffix not in (".yaml", ".yml") or not Path(path).is_file():
        return {}
    import yaml

    try:
        meta = (yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("META")
    except (yaml.YAMLError, AttributeError, OSError):
        return {}
    from lumina_lightning.data.records import _resolve

    folder = Path(path).expanduser().resolve().parent  # as read_data_yaml resolves its entries
    listed = {}
    for entry in meta if isinstance(meta, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("path"), str):
            resolved = Path(_resolve(entry["path"], folder))
            if resolved.is_file():
                listed[entry["path"]] = resolved
    return listed


def _read_record(stage_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((stage_dir / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def _write_record(stage_dir: Path, record: dict[str, Any]) -> None:
    from lumina_lightning.fileio import atomic_write_text

    atomic_write_text(stage_dir / STAGE_RECORD, json.dumps(record, indent=2, default=str))


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _synthetic(step: SyntheticStep) -> Path:
    """The pipeline's synthetic set in ``synthetic.out``: generated there (``origin="pipeline"``), kept
    where it holds the set asked for or a hand-made one, regenerated where this pipeline or a recipe made
    it with other arguments. Never written over a folder of the user's: one that holds files but no
    synthetic set, or a set ``lumina data synth`` made with other arguments, is refused; one whose
    maker is unknown (earlier versions recorded none) is moved aside first."""
    from lumina_lightning.data.synth import (
        check_generation_target,
        generate_synthetic,
        regenerate_in_place,
        synthetic_incomplete,
    )
    from lumina_lightning.fileio import move_aside

    out = Path(step.out)
    keep = "To train on that data, point the stages' data.path at it (stage_overrides)"
    # (a generation cut short leaves its marker: redone, never kept as a hand-made set)
    if (out / "train.jsonl").is_file() and (out / "test_geneval.jsonl").is_file() and not synthetic_incomplete(out):
        try:  # the arguments it was generated with (data.synth); a hand-made set without them is kept
            made = json.loads((out / "synth_config.json").read_text())
        except (OSError, ValueError):
            return out
        on_disk = {k: made.get(k) for k in ("n_train", "n_test", "size", "seed")}
        wanted = {"n_train": step.n, "n_test": step.n_test, "size": step.size, "seed": step.seed}
        if on_disk == wanted:
            return out
        differences = {k: (on_disk[k], wanted[k]) for k in wanted if on_disk[k] != wanted[k]}
        if not regenerate_in_place(out, differences, "the pipeline's synthetic step", keep, "synthetic.out"):
            log.warning("moved the synthetic dataset in %s to %s (delete that if it is not yours)", out, move_aside(out))
    else:
        check_generation_target(out, "the pipeline's synthetic step", keep, "synthetic.out")
    print(f"generating the synthetic dataset ({step.n} + {step.n_test} images at {step.size}px) into {out}", flush=True)
    generate_synthetic(out, step.n, step.size, step.seed, n_test=step.n_test, progress=True, origin="pipeline")
    return out


# --smoke on the captioner: a couple of steps, nothing tracked, a few images captioned
UNICAP_SMOKE_OVERRIDES = ("trainer.max_steps=2", "validation.every_n_steps=0", "tracking.enabled=false")
UNICAP_SMOKE_LIMIT = 16


def _unicap(cfg: PipelineConfig, synth: Path, summary: dict[str, Any], smoke: bool = False) -> Path | None:
    """Train (or reuse) the captioner, then caption (or finish captioning) the training images.

    Returns the captions manifest, or ``None`` where the captioner's training was stopped by a signal
    (``summary["stopped"]`` says so; its ``last.ckpt`` resumes on the next run).

    As a stage is: the captioner is reused when its resolved recipe and data are what its finished run
    was trained on, and trained afresh (the old folder moved aside) when they changed, so ``resume:
    auto`` only ever continues an interrupted run of the same recipe. The captions manifest is
    reused or completed only when the same captioner weights and settings wrote it; otherwise
    ``lumina caption --on-mismatch replace`` moves it aside and writes it anew.
    """
    from lumina_lightning.modules.caption_cli import main as caption_main
    from lumina_lightning.training.unicap_run import train_unicap

    t0 = time.perf_counter()
    loaded = _unicap_recipe(cfg, smoke)
    unicap_dir = Path(loaded.config.output_dir)
    print(f"\n=== UniCap: {loaded.config.stage} ({cfg.unicap.recipe}) ===", flush=True)
    inputs = {"synthetic": dataclasses.asdict(cfg.synthetic)}
    fingerprint = _stage_fingerprint(loaded, None, inputs, root=Path(cfg.output_dir).resolve())
    record = _read_record(unicap_dir)
    if record.get("fingerprint") not in (None, fingerprint):
        before = _unicap_recipe(cfg, smoke, previous_version=True)
        if not _trained_on_other_data(cfg, before):
            record = _upgrade_record(unicap_dir, record, loaded, None, inputs, fingerprint, previous=before)
    export: Path | None = unicap_dir / "export"
    if record.get("fingerprint") == fingerprint and record.get("export_digest") == _content_digest(export) \
            and record.get("export_digest"):
        log.info("UniCap: reused (unchanged): same recipe and data as the run that exported %s", export)
        metrics, reused = record.get("metrics"), True
    else:
        if record.get("fingerprint") != fingerprint and unicap_dir.is_dir() and any(unicap_dir.iterdir()):
            aside = _move_aside(unicap_dir)
            log.warning("UniCap: its recipe or data changed since %s was trained (or it has no pipeline record); "
                        "moved that folder to %s and training the captioner afresh", unicap_dir, aside)
        elif record.get("fingerprint") == fingerprint:
            _set_aside_changed_export("UniCap", export, record)
        unicap_dir.mkdir(parents=True, exist_ok=True)
        _write_record(unicap_dir, {"fingerprint": fingerprint})  # first: an interrupted run resumes next time
        result = train_unicap(loaded)
        export = getattr(result, "export_dir", None)
        if getattr(result, "exit_code", 0) or export is None:
            summary["stopped"] = (f"UniCap {loaded.config.stage} stopped by "
                                  f"{getattr(result, 'stopped_by_signal', None) or 'an early stop'}")
            summary["exit_code"] = getattr(result, "exit_code", 0) or 1
            return None
        metrics, reused = getattr(result, "metrics", None), False
        _write_record(unicap_dir, {"fingerprint": fingerprint, "export_digest": _content_digest(export),
                                   "metrics": metrics})

    out_manifest = _captions_path(cfg)
    limit = cfg.unicap.limit or (UNICAP_SMOKE_LIMIT if smoke else None)
    # `lumina caption` records what wrote the manifest (<output>.caption.json); a manifest written by
    # other weights, levels or settings is moved aside and written anew, one left unfinished is resumed
    argv = ["--model", str(export), "--input", str(synth / "train.jsonl"), "--output", str(out_manifest),
            "--levels", ",".join(cfg.unicap.levels), "--max-new-tokens", str(cfg.unicap.max_new_tokens),
            "--on-mismatch", "replace"]
    if limit:
        argv += ["--limit", str(limit)]
    code = caption_main(argv)
    if code:
        raise RuntimeError(f"captioning failed with exit code {code}")
    summary["unicap"] = {"seconds": round(time.perf_counter() - t0, 1), "manifest": str(out_manifest),
                         "metrics": metrics, "reused": reused}
    return out_manifest


def _sampling_device(e: EvalStep) -> str:
    import torch

    if e.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return e.device


def _calibrate_teacache(c: TeaCacheCalibrationStep, export: str | os.PathLike, data_path: str, size: int,
                        device: str = "cpu") -> dict[str, Any]:
    """Calibrate TeaCache on an export (its EMA weights, its own defaults, e.g. the guidance scale)
    and write the coefficients and threshold into its ``pipeline.json``."""
    from lumina_lightning.data.records import load_records
    from lumina_lightning.eval.metrics import preferred_caption
    from lumina_lightning.sampling.pipeline_io import load_pipeline, update_pipeline_defaults

    t0 = time.perf_counter()
    prompts = [preferred_caption(r.captions) for r in load_records(data_path).records[: c.prompts]]
    if not prompts:
        raise ValueError(f"teacache_calibration: no captions in {data_path}")
    pipe = load_pipeline(export, device=device)
    coeffs = pipe.calibrate_teacache(prompts, width=size, height=size, seeds=tuple(c.seeds))
    update_pipeline_defaults(export, teacache_version=coeffs, teacache=float(c.threshold))
    print(f"TeaCache calibrated for {export}: coefficients {[round(x, 4) for x in coeffs]}, threshold "
          f"{c.threshold} (in its pipeline.json; presets with TeaCache use them)", flush=True)
    return {"coefficients": coeffs, "threshold": float(c.threshold), "seconds": round(time.perf_counter() - t0, 1)}


def _drop_teacache_calibration(export: str | os.PathLike) -> None:
    """Remove the TeaCache calibration an earlier run stored in ``export``'s ``pipeline.json`` defaults
    (``teacache_version`` coefficients and their ``teacache`` threshold): with ``teacache_calibration``
    off, the export must not keep a calibration the summary no longer reports; presets with TeaCache
    then use the released coefficients again."""
    _drop_export_defaults(export, ("teacache_version", "teacache"),
                          "teacache_calibration is off: removed the calibration an earlier run stored",
                          only_if=lambda d: isinstance(d.get("teacache_version"), list))  # only calibration stores a list


def _drop_export_defaults(export: str | os.PathLike, keys: tuple[str, ...], message: str,
                          only_if: Callable[[dict[str, Any]], bool] | None = None) -> None:
    """Remove sampler defaults that only the pipeline writes into an export's ``pipeline.json`` (training's
    export stores none), when the pipeline no longer sets them, so a re-run leaves each export as a fresh
    run would."""
    from lumina_lightning.sampling.pipeline_io import PIPELINE_JSON, PipelineLoadError, update_pipeline_defaults

    file = Path(export) / PIPELINE_JSON
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # no pipeline.json to clean; loading the export reports it
    defaults = spec.get("defaults") if isinstance(spec, dict) else None
    if not isinstance(defaults, dict) or not any(k in defaults for k in keys) or (only_if and not only_if(defaults)):
        return
    try:
        update_pipeline_defaults(export, remove=keys)
    except PipelineLoadError:
        return  # not our pipeline.json: loading the export reports it
    log.info("%s in %s (%s)", message, file, ", ".join(f"{k}={defaults[k]!r}" for k in keys if k in defaults))


def _evaluate(cfg: PipelineConfig, export: str, out: Path, ema: Any, size: int) -> dict[str, Any]:
    """Mini-GenEval of one export at its stage's resolution (a 32 px stage is judged at 32 px)."""
    from lumina_lightning.eval.run import evaluate
    from lumina_lightning.sampling.pipeline_io import load_pipeline

    e = cfg.eval
    pipe = load_pipeline(export, ema=ema, device=_sampling_device(e))
    overrides = {k: v for k, v in (("steps", e.steps), ("cfg_scale", e.cfg_scale)) if v is not None}
    return evaluate(pipe, e.prompts, out, preset=e.preset, images_per_prompt=e.images_per_prompt,
                    min_images_per_task=e.min_images_per_task, seed=e.seed,
                    width=size, height=size,
                    manifest=e.manifest, max_prompts=e.max_prompts, max_per_tag=e.max_per_tag,
                    batch_size=e.batch_size,
                    sampler_overrides=overrides or None, progress=True,
                    # results.json says which export and which weights (EMA or raw) were judged
                    checkpoint=export, ema=ema)


def _comparisons(summary: dict[str, Any], eval_dir: Path) -> dict[str, Any]:
    """Paired score differences behind the pipeline's own checks: the final model against stage 1
    and EMA against raw weights (same prompts, same seeds; see ``geneval.paired_difference``)."""
    from lumina_lightning.eval.geneval import paired_difference
    from lumina_lightning.eval.run import read_results

    def rows(stage: dict[str, Any], label: str) -> list[dict[str, Any]] | None:
        folder = eval_dir / f"{stage['stage']}_{label}"
        if label not in stage.get("geneval", {}) or not (folder / "results.jsonl").is_file():
            return None
        return read_results(folder)

    stages = summary["stages"]
    pairs = {"final_vs_stage1": ((stages[-1], "ema"), (stages[0], "ema")),
             "ema_vs_raw": ((stages[-1], "ema"), (stages[-1], "raw"))}
    out: dict[str, Any] = {}
    for name, ((sa, la), (sb, lb)) in pairs.items():
        if sa is sb and la == lb:
            continue
        a, b = rows(sa, la), rows(sb, lb)
        if a and b:
            out[name] = {"a": f"{sa['stage']} ({la})", "b": f"{sb['stage']} ({lb})", **paired_difference(a, b)}
    return out


def judge_targets(targets: Targets, summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the measured value, its interval and ``met`` (``None`` when not measured)."""
    final = summary["stages"][-1].get("geneval", {}).get("ema") or {}
    ci = final.get("ci95") or {}
    out = []
    for key, bar in targets.scores.items():
        value = final.get("overall") if key == "overall" else (final.get("tags") or {}).get(key)
        interval = ci.get("overall") if key == "overall" else (ci.get("tags") or {}).get(key)
        out.append({"name": f"{key} >= {bar:g}", "kind": "score", "value": value, "interval": interval,
                    "met": None if value is None else bool(value >= bar)})
    for name in targets.no_worse:
        cmp_ = (summary.get("comparisons") or {}).get(name) or {}
        interval = cmp_.get("interval")
        label = f"{cmp_['a']} no worse than {cmp_['b']}" if cmp_ else f"{name}: no worse"
        out.append({"name": label, "kind": "paired", "value": cmp_.get("difference"), "interval": interval,
                    "met": None if interval is None else bool(interval[1] >= 0.0)})
    return out


def _write(out: Path, summary: dict[str, Any]) -> None:
    from lumina_lightning.fileio import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))


def _fmt_score(result: dict[str, Any] | None, interval: bool = False) -> str:
    if not result or result.get("overall") is None:
        return "–"
    text = f"{result['overall']:.3f}"
    ci = (result.get("ci95") or {}).get("overall") if interval else None
    return f"{text} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else text


def _fmt_losses(e: dict[str, Any]) -> str:
    if e.get("loss_first") is None and e.get("loss_last") is None:
        # e.g. a run resumed from a last.ckpt already at max_steps: it only exported
        return f"– (no steps trained in this run; resumed at step {e['steps']})"
    text = f"{e['loss_first']} → {e['loss_last']}"
    # a resumed run's losses (and seconds) are those of the steps after its checkpoint only
    return f"{text} (steps {e['resumed_from_step'] + 1}–{e['steps']} only)" if e.get("resumed_from_step") else text


def _fmt_stage(e: dict[str, Any]) -> str:
    notes = [*(["reused, unchanged"] if e.get("reused") else []),
             *([f"resumed from step {e['resumed_from_step']}"] if e.get("resumed_from_step") else [])]
    return e["stage"] + (f" ({'; '.join(notes)})" if notes else "")


def _through_ae(result: dict[str, Any] | None) -> str:
    value = (result or {}).get("detector_ceiling_autoencoder")
    return "" if value is None else f" ({value:.3f} through the autoencoder)"


def _print_summary(summary: dict[str, Any], out: Path) -> None:
    lines = ["", f"=== pipeline `{summary['name']}` finished in {summary['total_seconds'] / 60:.1f} min ===", ""]
    lines.append("| stage | res | steps | train s | loss first→last | val loss (EMA) | GenEval (EMA) [95 % interval] "
                 "| GenEval (raw) | detector on ground truth at this size |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    for e in summary["stages"]:
        g = e.get("geneval", {})
        val = (e.get("val_loss") or {}).get("ema")
        lines.append(
            f"| {_fmt_stage(e)} | {e['resolution']} | {e['steps']} | "
            f"{e['train_seconds']} | {_fmt_losses(e)} | {'–' if val is None else f'{val:.4f}'} | "
            f"{_fmt_score(g.get('ema'), interval=True)} | {_fmt_score(g.get('raw'))} | "
            f"{_fmt_score({'overall': (g.get('ema') or {}).get('detector_ceiling')})}{_through_ae(g.get('ema'))} |"
        )
    last = summary["stages"][-1]
    final = last.get("geneval", {}).get("ema") or {}
    tags = final.get("tags") or {}
    if tags:
        lines += ["", "final model, per task (EMA): " + ", ".join(f"{k} {v:.2f}" for k, v in tags.items())]
    if final.get("undersized"):
        from lumina_lightning.eval.report import undersized_text

        lines += [f"undersized credits (final model): {undersized_text(final['undersized'])}"]
    blind = final.get("prompt_blind") or {}
    if blind.get("tags"):
        # the chance level: what drawing a random correct scene of each task, whatever the prompt, scores
        lines += ["prompt-blind chance level:    " + ", ".join(f"{k} {v:.2f}" for k, v in blind["tags"].items())
                  + f"; overall {blind['overall']:.3f}"]
    for cmp_ in (summary.get("comparisons") or {}).values():
        if cmp_.get("difference") is not None:
            low, high = cmp_["interval"]
            lines.append(f"{cmp_['a']} − {cmp_['b']}: {cmp_['difference']:+.3f} [{low:+.3f}, {high:+.3f}] "
                         f"(paired over {cmp_['pairs']} images; an interval containing 0 is no measurable difference)")
    if summary.get("targets"):
        lines += ["", "targets (final model, EMA weights; reported, not enforced):"]
        for t in summary["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            sign = "+" if t["kind"] == "paired" else ""  # a paired difference, not a score
            value = "–" if t["value"] is None else f"{t['value']:{sign}.3f}"
            iv = f" [{t['interval'][0]:{sign}.2f}, {t['interval'][1]:{sign}.2f}]" if t["interval"] else ""
            lines.append(f"  {t['name']}: {value}{iv}  {verdict}")
    uri = summary.get("tracking_uri")
    if uri:
        lines += ["", f"MLflow runs: mlflow ui --backend-store-uri {shlex.quote(str(uri))}   (then open "
                  "http://127.0.0.1:5000)"]
    # quoted: a path with spaces pasted as printed must still be one argument
    lines += [f"Gradio app:  lumina demo --ckpt {shlex.quote(str(last['export']))}",
              f"summary:     {out / 'summary.json'}"]
    print("\n".join(lines), flush=True)
