"""MLflow logging of an evaluation (the ``mlflow`` client directly; no Lightning logger involved).

The store is chosen like training runs choose theirs (``training/run.py``): an explicit URI, else
``MLFLOW_TRACKING_URI``, else the store the checkpoint's training run logged to, else — only when asked
to track (``--track``) — ``sqlite:///mlruns.db``; ``--no-track`` logs nowhere; experiments
created here on a local store keep artifacts in ``./mlartifacts``. When the checkpoint lives in a
training run folder (``run_info.json``), the eval run is tagged with that run's id and, in the
same experiment, nested under it in the UI.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from lumina_lightning.training.session import flatten

__all__ = ["tracking_uri_for", "is_tracking_server", "metric_key", "metrics_of", "params_of", "log_to_mlflow"]

DEFAULT_EXPERIMENT = "lumina-lightning"  # the training recipes' default, so eval runs sit beside them


def tracking_uri_for(explicit: str | None = None, track: bool | None = False, checkpoint: str | None = None) -> str | None:
    """Where to log (absolute, see :func:`~lumina_lightning.training.session.absolute_tracking_uri`):
    ``track=False``: nowhere; else explicit → ``MLFLOW_TRACKING_URI`` → the store the checkpoint's
    training run logged to (its ``run_info.json``), so an evaluation of a tracked run sits beside it →
    (``track=True``) the local sqlite store.

    Without ``track=True`` a recorded store is used only where it is a local sqlite file or folder that
    exists: a run folder copied from elsewhere names stores of another machine (a server there, or a
    path that logging would create here), which are not written to unasked.
    """
    from lumina_lightning.training.session import absolute_tracking_uri, default_tracking_uri

    if track is False:
        return None
    if explicit:
        return absolute_tracking_uri(explicit)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return default_tracking_uri()
    recorded = _training_run_info(checkpoint).get("tracking_uri")
    if recorded:
        recorded = absolute_tracking_uri(recorded)
        if track or _local_store_exists(recorded):
            return recorded
    return default_tracking_uri() if track else None


def _local_store_exists(uri: str) -> bool:
    """Whether ``uri`` names a local store already on this machine (a sqlite file, a folder)."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///"):]).is_file()
    if uri.startswith("file:"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(uri).path)).is_dir()
    return "://" not in uri and ":" not in uri.split("/")[0] and Path(uri).is_dir()


def is_tracking_server(uri: str) -> bool:
    """Whether ``uri`` is a tracking server, which decides where artifacts go (a local
    ``artifact_location`` sent to it would keep a remote run's artifacts on this machine's disk)."""
    return uri.split(":", 1)[0] in ("http", "https", "databricks")


def metric_key(key: str) -> str:
    """``key`` as a name MLflow accepts: each ``/``-separated part keeps alphanumerics, ``_ - . `` and
    space, anything else becomes ``_``, and a part of dots only (``..``) becomes underscores.

    Why: part of a key is data (a tag such as ``colors?`` from a hand-written prompt file, passed
    programmatically), and MLflow refuses the whole batch on one bad name. Colons are replaced too
    (MLflow refuses them on Windows).
    """
    parts = []
    for part in str(key).split("/"):
        part = re.sub(r"[^\w\-. ]", "_", part)
        parts.append("_" * len(part) if not part.strip(".") else part)
    return "/".join(p or "_" for p in parts)[:250]  # MLflow's key length limit


def params_of(results: dict[str, Any]) -> dict[str, str]:
    """Run parameters: checkpoint, prompt set, sampler settings and detector settings."""
    params = {"checkpoint": results.get("checkpoint"), "prompts_file": results.get("prompts_file"),
              "manifest": results.get("manifest")}
    params.update(flatten(results.get("settings", {}), "sampler."))
    params.update(flatten(results.get("detector", {}), "detector."))
    if results.get("compare"):
        params["compare.reference_preset"] = results["compare"]["reference_preset"]
    return {metric_key(k): (json.dumps(v) if isinstance(v, (list, dict)) else str(v))[:6000] for k, v in params.items()}


def metrics_of(results: dict[str, Any]) -> dict[str, float]:
    """Numeric results under stable names (``geneval/overall``, ``geneval/<tag>``, ``val_loss``, ...)."""
    m: dict[str, float] = {}
    if results.get("overall") is not None:
        m["geneval/overall"] = results["overall"]
    for tag, acc in results.get("tags", {}).items():
        m[f"geneval/{tag}"] = acc
    for key in ("correct_images", "correct_prompts"):
        if results.get(key) is not None:
            m[f"geneval/{key}"] = results[key]
    dv = results.get("detector_validation")
    if dv:
        m["detector_gt/overall"] = dv["overall"]
        m["detector_gt/min_tag"] = dv["min_tag"]
        for tag, acc in dv["tags"].items():
            m[f"detector_gt/{tag}"] = acc
        if dv.get("native"):
            m["detector_gt_native/overall"] = dv["native"]["overall"]
            m["detector_gt_native/min_tag"] = dv["native"]["min_tag"]
        if dv.get("autoencoder"):
            m["detector_gt_autoencoder/overall"] = dv["autoencoder"]["overall"]
            m["detector_gt_autoencoder/min_tag"] = dv["autoencoder"]["min_tag"]
    u = results.get("undersized") or {}
    if u.get("share") is not None:
        m["undersized/share"] = u["share"]
        m["undersized/overall_without"] = u["overall_without"]
    ci = results.get("ci95") or {}
    if ci.get("overall"):
        m["geneval_ci95/overall_low"], m["geneval_ci95/overall_high"] = ci["overall"]
    for tag, (low, high) in (ci.get("tags") or {}).items():
        m[f"geneval_ci95/{tag}_low"], m[f"geneval_ci95/{tag}_high"] = low, high
    pb = results.get("prompt_blind") or {}
    if pb.get("overall") is not None:
        m["prompt_blind/overall"] = pb["overall"]
        for tag, acc in pb["tags"].items():
            m[f"prompt_blind/{tag}"] = acc
    pr = results.get("paired") or {}
    if pr.get("difference") is not None:
        m["paired/difference"] = pr["difference"]
        m["paired/low"], m["paired/high"] = pr["interval"]
    vl = results.get("val_loss")
    if vl:
        m["val_loss"] = vl["mean"]
        for k, v in enumerate(vl["per_t"]):
            m[f"val_loss_t/t{k}"] = v
    cmp_ = results.get("compare")
    if cmp_:
        for key in ("psnr", "ssim", "reference_overall", "overall_delta", "speedup"):
            if cmp_.get(key) is not None:
                m[f"compare/{key}"] = cmp_[key]
    for key, value in results.get("timings", {}).items():
        if isinstance(value, (int, float)):
            m[f"time/{key}"] = value
    if results.get("settings", {}).get("nfe_per_image") is not None:
        m["nfe_per_image"] = results["settings"]["nfe_per_image"]
    return {metric_key(k): float(v) for k, v in m.items()}


def _training_run_info(checkpoint: str | None) -> dict[str, Any]:
    """The ``run_info.json`` of the training run that wrote ``checkpoint`` (``{}`` if none)."""
    if not checkpoint:
        return {}
    p = Path(checkpoint).resolve()
    for folder in (p, p.parent, p.parent.parent):
        info = folder / "run_info.json"
        if info.is_file():
            try:
                found = json.loads(info.read_text())
            except (OSError, ValueError):
                return {}
            return found if isinstance(found, dict) else {}
    return {}


def log_to_mlflow(
    results: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str | None = None,
    track: bool | None = None,
    tags: dict[str, str] | None = None,
    log_images: bool = True,
) -> dict[str, str] | None:
    """Log params, metrics and the output folder (reports, plots, grids, results, images) as a run.

    Returns ``{"run_id", "tracking_uri", "experiment", "experiment_id"}`` (also stored in
    ``results["mlflow"]`` and ``out_dir/results.json``), or ``None`` when no store is configured.
    ``track``: see :func:`tracking_uri_for` (``None``: where a URI is given, or the checkpoint's
    training run was tracked).
    """
    uri = tracking_uri_for(tracking_uri, track, results.get("checkpoint"))
    if uri is None:
        return None
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    out = Path(out_dir)
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        # local stores keep artifacts in ./mlartifacts, as training runs do (training/run.py);
        # a tracking server decides for itself
        artifact_location = None if is_tracking_server(uri) else Path("mlartifacts").resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_location)
    else:
        experiment_id = exp.experiment_id
    run_tags = {"kind": "eval", "lumina.eval.preset": str(results.get("settings", {}).get("preset")),
                **(tags or {})}
    parent = _training_run_info(results.get("checkpoint")).get("mlflow_run_id")
    if parent:
        run_tags["lumina.trained_by_run"] = parent
        try:
            if client.get_run(parent).info.experiment_id == experiment_id:
                run_tags["mlflow.parentRunId"] = parent
        except Exception:  # the training run may live in another store; the tag above still names it
            pass
    name = run_name or f"eval-{results.get('settings', {}).get('preset', 'official')}"
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    run_id = run.info.run_id
    info = {"run_id": run_id, "tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id}
    results["mlflow"] = info
    status = "FAILED"
    try:
        import time

        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in params_of(results).items()]
        metrics = [Metric(k, v, now, 0) for k, v in metrics_of(results).items()]
        for start in range(0, max(len(params), len(metrics)), 100):  # MLflow's batch limits
            client.log_batch(run_id, metrics=metrics[start:start + 100], params=params[start:start + 100],
                             tags=[RunTag("lumina.eval.out_dir", str(out.resolve()))] if start == 0 else [])
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        for name_ in ("results.json", "results.jsonl", "report.md", "report.html"):
            if (out / name_).is_file():
                client.log_artifact(run_id, str(out / name_))
        for folder in ("plots", "grids") + (("images",) if log_images else ()):
            if (out / folder).is_dir():
                client.log_artifacts(run_id, str(out / folder), artifact_path=folder)
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status=status)
    return info
