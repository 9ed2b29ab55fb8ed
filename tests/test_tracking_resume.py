"""A resumed training goes on logging into the MLflow run it started, for both tasks' shared session code."""

from __future__ import annotations

import json

from training_utils import tiny_recipe

from lumina_lightning.training.recipe import load_recipe
from lumina_lightning.training.run import train


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    """Train 2 steps, then resume to 4 with a longer max_steps: one MLflow run with the loss at steps 0-3,
    its params as first logged, and the changed one tagged; a resume tracked elsewhere starts a new run."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    tracking = {"enabled": True, "tracking_uri": uri, "experiment": "t",
                "artifact_location": (tmp_path / "artifacts").as_uri()}
    recipe = tiny_recipe(tmp_path, resume="auto", tracking=tracking,
                         trainer={"max_steps": 2, "log_every_n_steps": 1, "checkpoint_every_n_steps": 1})
    first = train(load_recipe(recipe))
    # optim.lr 0.001 -> 0.0015: a changed value that starts with the logged one still counts as changed
    second = train(load_recipe(recipe, ["trainer.max_steps=4", "optim.lr=0.0015"]))
    assert second.global_step == 4
    assert second.mlflow_run_id == first.mlflow_run_id
    assert json.loads((first.output_dir / "run_info.json").read_text())["mlflow_run_id"] == first.mlflow_run_id

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(first.mlflow_run_id)
    steps = sorted(h.step for h in client.get_metric_history(first.mlflow_run_id, "train/loss"))
    assert steps == [0, 1, 2, 3]
    assert run.data.params["trainer.max_steps"] == "2"  # MLflow keeps a param's first value
    assert run.data.tags["lumina.resume_changed_params"] == "optim.lr, trainer.max_steps"
    assert len(client.search_runs([run.info.experiment_id])) == 1

    # tracked at another URI than run_info.json records: a new run there (the old one is not reachable)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    third = train(load_recipe(recipe, ["trainer.max_steps=5", f"tracking.tracking_uri={other}"]))
    assert third.mlflow_run_id != first.mlflow_run_id
    assert json.loads((first.output_dir / "run_info.json").read_text())["mlflow_run_id"] == third.mlflow_run_id
