"""MLflow stores named relative to the current folder (``sqlite:///mlruns.db``, ``file:./mlruns``) are made
absolute once, when a command starts, so what a run records names the same store from any folder; and
`lumina eval` logs beside the training run of the checkpoint it evaluates without a flag."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from training_utils import tiny_recipe

from lumina_lightning.training.session import absolute_tracking_uri


def test_relative_local_stores_become_absolute_and_others_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///mlruns.db") == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert absolute_tracking_uri("sqlite:///sub/x.db") == f"sqlite:///{tmp_path / 'sub' / 'x.db'}"
    assert absolute_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("file:./mlruns") == (tmp_path / "mlruns").as_uri()
    assert absolute_tracking_uri("file:///abs/mlruns") == "file:///abs/mlruns"
    assert absolute_tracking_uri("./mlruns") == str(tmp_path / "mlruns")
    assert absolute_tracking_uri("mlruns") == str(tmp_path / "mlruns")
    for kept in ("http://host:5000", "https://x/y", "databricks", "postgresql://u@h/db", "/abs/mlruns"):
        assert absolute_tracking_uri(kept) == kept


def test_a_run_records_its_relative_store_absolute_and_eval_logs_beside_it_from_elsewhere(tmp_path, monkeypatch,
                                                                                           capsys):
    import mlflow

    from lumina_lightning.eval.cli import build_parser
    from lumina_lightning.eval.cli import _log as eval_log
    from lumina_lightning.eval.tracking import tracking_uri_for
    from lumina_lightning.training.recipe import load_recipe
    from lumina_lightning.training.run import train

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel.db")
    recipe = tiny_recipe(tmp_path, output_dir=str(tmp_path / "run"), stage="s1",
                         tracking={"enabled": True, "experiment": "rel"})
    result = train(load_recipe(recipe, ["trainer.max_steps=2"]))
    store = f"sqlite:///{work / 'rel.db'}"
    assert result.tracking_uri == store
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["tracking_uri"] == store

    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    export = str(result.export_dir)
    assert tracking_uri_for(None, None, export) == store  # the checkpoint's own store
    assert tracking_uri_for(None, False, export) is None  # --no-track
    out = elsewhere / "eval"
    out.mkdir()
    results = {"checkpoint": export, "overall": 0.5, "tags": {"colors": 0.5}, "settings": {"preset": "fast"}}
    args = build_parser().parse_args(["--ckpt", export, "--prompts", "p.jsonl", "--out", str(out),
                                      "--experiment", "rel"])
    info = eval_log(results, out, args)
    assert info["tracking_uri"] == store and not (elsewhere / "mlruns.db").exists()
    run = mlflow.MlflowClient(tracking_uri=store).get_run(info["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == result.mlflow_run_id  # nested under the training run

    # a checkpoint of an untracked run, no flag: nothing logged, and the output says so
    (tmp_path / "run" / "run_info.json").write_text(json.dumps({"mlflow_run_id": None, "tracking_uri": None}))
    assert eval_log(dict(results), out, args) is None
    assert "not logged to MLflow" in capsys.readouterr().out
    args = build_parser().parse_args(["--ckpt", export, "--prompts", "p.jsonl", "--out", str(out), "--no-track"])
    assert eval_log(dict(results), out, args) is None and "not logged" not in capsys.readouterr().out


@pytest.mark.parametrize("same_store", [True, False])
def test_a_stage_is_nested_under_its_parent_run_only_in_the_parents_store(tmp_path, monkeypatch, same_store):
    from types import SimpleNamespace as NS

    from lumina_lightning.training.session import make_logger

    monkeypatch.chdir(tmp_path)
    parent_store = "sqlite:///mlruns.db" if same_store else f"sqlite:///{tmp_path / 'other.db'}"
    cfg = NS(tracking=NS(enabled=True, tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}", artifact_location=None,
                         tags={}, experiment="nest", run_name=None), stage="s2")
    logger, uri = make_logger(cfg, NS(path=Path("r.yaml")),
                              parent={"mlflow_run_id": "abc123", "tracking_uri": parent_store})
    assert uri == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert logger.tags["lumina.init_from_run"] == "abc123"
    assert ("mlflow.parentRunId" in logger.tags) is same_store


def test_eval_and_sample_device_help_names_every_form_they_accept():
    """``lumina eval`` hands --device to the resolver of ``lumina sample`` (eval/cli.py), so both --help texts must
    name the same forms, and each named form must be one the resolver takes (a CUDA one may only lack a GPU)."""
    import torch

    from lumina_lightning.eval.cli import build_parser as eval_parser
    from lumina_lightning.sampling.cli import build_parser as sample_parser
    from lumina_lightning.sampling.cli import resolve_device

    for parser in (eval_parser(), sample_parser()):
        [device] = [a for a in parser._actions if "--device" in a.option_strings]
        forms = device.help.split(" (")[0].split(" | ")
        assert sorted(forms) == ["cpu", "cuda", "cuda:N"], (parser.prog, device.help)
    for form in ("cpu", "cuda", "cuda:0"):
        try:
            assert resolve_device(form) == form
        except ValueError as err:  # only for want of a GPU, never "not a device"
            assert form.startswith("cuda") and not torch.cuda.is_available() and "no CUDA GPU" in str(err)


def test_eval_uses_a_recorded_store_only_where_it_is_local_and_exists_unless_asked(tmp_path, monkeypatch):
    """A run folder copied from another machine names its stores (a server, a path there): `lumina eval`
    does not send results there, nor create that path here, without --track."""
    from lumina_lightning.eval.tracking import tracking_uri_for

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)

    def recorded(uri: str) -> str:
        (tmp_path / "run" / "run_info.json").write_text(json.dumps({"mlflow_run_id": "r", "tracking_uri": uri}))
        return str(export)

    server, missing = "http://198.51.100.7:5000", f"sqlite:///{tmp_path / 'cluster' / 'mlruns.db'}"
    assert tracking_uri_for(None, None, recorded(server)) is None
    assert tracking_uri_for(None, None, recorded(missing)) is None and not (tmp_path / "cluster").exists()
    assert tracking_uri_for(None, True, recorded(server)) == server  # --track: its own store first
    assert tracking_uri_for(None, True, recorded(missing)) == missing
    (tmp_path / "here.db").write_bytes(b"")
    assert tracking_uri_for(None, None, recorded("sqlite:///here.db")) == f"sqlite:///{tmp_path / 'here.db'}"
    (tmp_path / "mlruns").mkdir()
    assert tracking_uri_for(None, None, recorded((tmp_path / "mlruns").as_uri())) == (tmp_path / "mlruns").as_uri()
    assert tracking_uri_for(None, True, None) == f"sqlite:///{tmp_path / 'mlruns.db'}"
