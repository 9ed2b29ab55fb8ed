"""`lumina pipeline` run again: what a re-run reuses, retrains, moves aside and reports.

Most tests stub `train` as tests/test_recipes.py does (each call writes a last.ckpt and an export whose
weights differ per call); where the claim is about what a real run writes (a re-export of the same
weights, the step a run resumes from, the dataset it trains on), the tiny NextDiT_debug trains for real.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from training_utils import tiny_recipe

from lumina_lightning.training import pipeline as pl
from lumina_lightning.training.recipe import RecipeError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def _stub_train(monkeypatch, tmp_path):
    """Stub training; returns the list of (stage, loaded config, had last.ckpt) calls."""
    from training_utils import stub_stage_training

    return stub_stage_training(monkeypatch, tmp_path, entry=lambda c, had: (c.stage, c, had),
                               weights_text=lambda c, n: f"{c.stage} call {n}", pipeline_json=True)


def _pipeline(path: Path, output_dir: Path, stages: list[Path], extra: str = "") -> Path:
    path.write_text(f"name: two\noutput_dir: {json.dumps(str(output_dir))}\nstages:\n"
                    + "".join(f"  - recipe: {s}\n" for s in stages)
                    + "teacache_calibration: {enabled: false}\neval: {enabled: false}\n" + extra)
    return path


def _tiny_stages(tmp_path: Path, **sections) -> list[Path]:
    """Two NextDiT_debug stages (4 steps at 16 px, checkpoints every 2), the second from the first's export."""
    common = {"resume": "auto", **sections}
    return [tiny_recipe(tmp_path, "s1.yaml", stage="s1", **common),
            tiny_recipe(tmp_path, "s2.yaml", stage="s2", model={"init_from": "stage-1-export"}, **common)]


def _records(out: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob(f"*/{pl.STAGE_RECORD}"))}


# ------------------------------------------------------------------------------------------------
# 1. keys that cannot change the weights, and a moved pipeline folder
# ------------------------------------------------------------------------------------------------


def test_tracking_checkpoint_cadence_and_a_moved_folder_reuse_every_stage(tmp_path, monkeypatch):
    calls = _stub_train(monkeypatch, tmp_path)
    stages = [RECIPES / "tiny" / "stage1_lowres.yaml", RECIPES / "tiny" / "stage2_highres.yaml"]
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", stages)
    # a manifest in the pipeline's folder, as the captioner's captions are (the first stage's data.path)
    (tmp_path / "out" / "captions").mkdir(parents=True)
    (tmp_path / "out" / "captions" / "m.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')

    def run(folder, *extra):
        cfg = pl.load_pipeline_config(path, [f"output_dir={tmp_path / folder}", *extra])
        cfg.stages[0].overrides = [f"data.path={tmp_path / folder / 'captions' / 'm.jsonl'}"]
        return pl.run_pipeline(cfg)
    run("out")
    assert [c[0] for c in calls] == ["tiny_stage1_lowres", "tiny_stage2_highres"]

    calls.clear()
    reporting = ("stage_overrides=[tracking.enabled=true, tracking.experiment=other, trainer.checkpoint_every_n_steps=7, "
                 "trainer.keep_checkpoints=5, trainer.log_every_n_steps=3, trainer.enable_progress_bar=false]")
    again = run("out", reporting)
    assert calls == [] and all(e["reused"] for e in again["stages"])

    # the whole pipeline folder moved: the stages are where it is now, and the summary says so
    (tmp_path / "out").rename(tmp_path / "moved")
    moved = run("moved")
    assert calls == [] and all(e["reused"] for e in moved["stages"])
    assert [e["export"] for e in moved["stages"]] == [str(tmp_path / "moved" / s / "export")
                                                       for s in ("tiny_stage1_lowres", "tiny_stage2_highres")]

    # validation settings stay in the fingerprint (the recorded validation loss comes from them)
    run("moved", "stage_overrides=[validation.every_n_steps=5]")
    assert [c[0] for c in calls] == ["tiny_stage1_lowres", "tiny_stage2_highres"]


# ------------------------------------------------------------------------------------------------
# records written by the previous version (its fingerprint formula, no weights hash) stay valid
# ------------------------------------------------------------------------------------------------


def _previous_version_fingerprint(loaded, parent_digest, inputs):
    """The fingerprint the version before this one wrote (a verbatim copy of its formula): the whole
    recipe but `resume`, the parent export by name/size/mtime (content_digest)."""
    from lumina_lightning.fileio import content_digest

    recipe = {k: v for k, v in loaded.resolved.items() if k != "resume"}
    data_path = loaded.config.data.path
    data = content_digest(data_path) if data_path and Path(data_path).is_file() else None
    found = {"recipe": recipe, "parent": parent_digest, "inputs": inputs, "data": data}
    sources = pl._listed_manifests(data_path)
    if sources:
        found["sources"] = {name: content_digest(path) for name, path in sources.items()}
    val_path = loaded.config.data.val_path
    if val_path and Path(val_path).is_file():
        found["val"] = {"file": content_digest(val_path),
                        "sources": {n: content_digest(p) for n, p in pl._listed_manifests(val_path).items()}}
    return hashlib.sha256(json.dumps(found, sort_keys=True, default=str).encode()).hexdigest()[:20]


def test_records_of_the_previous_version_are_upgraded_not_retrained(tmp_path, monkeypatch, caplog):
    from lumina_lightning.fileio import weights_hash

    calls = _stub_train(monkeypatch, tmp_path)
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", _tiny_stages(tmp_path))
    current = pl._stage_fingerprint
    monkeypatch.setattr(pl, "_stage_fingerprint",
                        lambda loaded, parent, inputs, **k: _previous_version_fingerprint(
                            loaded, parent.digest if parent else None, inputs))
    pl.run_pipeline(pl.load_pipeline_config(path))
    monkeypatch.setattr(pl, "_stage_fingerprint", current)
    out = tmp_path / "out"
    for stage, record in _records(out).items():  # as the previous version wrote them: no weights hash
        del record["export_weights"]
        (out / stage / pl.STAGE_RECORD).write_text(json.dumps(record))
    old = {stage: r["fingerprint"] for stage, r in _records(out).items()}

    calls.clear()
    with caplog.at_level(logging.INFO, logger="lumina_lightning.pipeline"):
        again = pl.run_pipeline(pl.load_pipeline_config(path))
    assert calls == [] and all(e["reused"] for e in again["stages"])
    assert not list(out.glob("*.replaced-*"))
    records = _records(out)
    assert all(records[s]["fingerprint"] != old[s] for s in ("s1", "s2"))  # upgraded to today's formula
    assert records["s1"]["export_weights"] == weights_hash(out / "s1" / "export")  # hashed once, kept
    assert "keeps its weights (record updated)" in caplog.text

    # the upgraded records hold today's fingerprint: the keys it leaves out no longer retrain ...
    pl.run_pipeline(pl.load_pipeline_config(path, ["stage_overrides=[tracking.enabled=true]"]))
    assert calls == []
    # ... while a change that matters still does, from that stage on
    changed = pl.load_pipeline_config(path)
    changed.stages[1].overrides = ["optim.lr=0.05"]
    pl.run_pipeline(changed)
    assert [c[0] for c in calls] == ["s2"]


def test_a_previous_version_record_of_other_training_is_not_upgraded(tmp_path, monkeypatch, caplog):
    """Before this version, --smoke's quick settings beat stage_overrides: a smoke run with
    `trainer.max_steps=3` for every stage trained smoke's 2 steps. Its record must not pass for today's
    recipe, which trains 3: the stage trains again (a record whose recipe is the same is upgraded, above)."""
    calls = _stub_train(monkeypatch, tmp_path)
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", _tiny_stages(tmp_path),
                     extra="stage_smoke_overrides: [trainer.max_steps=2]\n")
    args = ["stage_overrides=[trainer.max_steps=3]"]
    current_fp, current_order = pl._stage_fingerprint, pl._stage_overrides
    monkeypatch.setattr(pl, "_stage_fingerprint", lambda loaded, parent, inputs, **k: _previous_version_fingerprint(
        loaded, parent.digest if parent else None, inputs))
    monkeypatch.setattr(pl, "_stage_overrides", lambda cfg, stage, smoke, previous_version=False: current_order(
        cfg, stage, smoke, previous_version=True))  # the previous version's order: smoke last
    pl.run_pipeline(pl.load_pipeline_config(path, args), smoke=True)
    assert [c[1].trainer.max_steps for c in calls] == [2, 2]
    monkeypatch.setattr(pl, "_stage_fingerprint", current_fp)
    monkeypatch.setattr(pl, "_stage_overrides", current_order)

    calls.clear()
    with caplog.at_level(logging.INFO, logger="lumina_lightning.pipeline"):
        again = pl.run_pipeline(pl.load_pipeline_config(path, args), smoke=True)
    assert [(c[0], c[1].trainer.max_steps) for c in calls] == [("s1", 3), ("s2", 3)]
    assert not any(e.get("reused") for e in again["stages"])
    assert "keeps its weights (record updated)" not in caplog.text


def test_a_previous_version_record_with_relative_captions_is_upgraded_not_retrained(tmp_path, monkeypatch):
    """Before this version, stage 1 of a UniCap pipeline with the default relative output_dir trained on
    the captions under their relative path; today's absolute path must not retrain it after an upgrade."""
    calls = _stub_train(monkeypatch, tmp_path)
    stages = _tiny_stages(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = _pipeline(tmp_path / "p.yaml", Path("runs/tiny"), stages, extra="unicap: {enabled: true}\n")

    def fake_unicap(cfg, synth, summary, smoke):  # what _unicap returns, the captioner stubbed
        out = pl._captions_path(cfg)
        if not out.exists():
            out.parent.mkdir(parents=True)
            out.write_text('{"image": "a.png", "caption": "a red square"}\n')
        return out

    monkeypatch.setattr(pl, "_unicap", fake_unicap)
    monkeypatch.setattr(pl, "_unicap_recipe", lambda cfg, smoke, previous_version=False: None)
    current_fp, current_captions = pl._stage_fingerprint, pl._captions_path
    monkeypatch.setattr(pl, "_stage_fingerprint", lambda loaded, parent, inputs, **k: _previous_version_fingerprint(
        loaded, parent.digest if parent else None, inputs))
    monkeypatch.setattr(pl, "_captions_path", lambda cfg: Path(cfg.output_dir) / "captions" / "train_unicap.jsonl")
    pl.run_pipeline(pl.load_pipeline_config(path))
    assert [c[0] for c in calls] == ["s1", "s2"] and not Path(calls[0][1].data.path).is_absolute()
    monkeypatch.setattr(pl, "_stage_fingerprint", current_fp)
    monkeypatch.setattr(pl, "_captions_path", current_captions)

    calls.clear()
    again = pl.run_pipeline(pl.load_pipeline_config(path))
    assert calls == [] and all(e["reused"] for e in again["stages"])
    assert not list((tmp_path / "runs" / "tiny").glob("*.replaced-*"))


def test_captions_fingerprint_alike_for_a_relative_absolute_or_moved_output_dir(tmp_path, monkeypatch):
    """With UniCap on, stage 1 trains on the captions under the pipeline's folder. The tiny pipeline's
    output_dir is relative (runs/${name}): spelled absolute, or moved whole, stage 1 must keep its
    fingerprint (a relative captions path escaped _under_root and retrained every stage)."""
    import dataclasses

    stages = _tiny_stages(tmp_path)
    monkeypatch.chdir(tmp_path)
    path = _pipeline(tmp_path / "p.yaml", Path("runs/tiny"), stages, extra="unicap: {enabled: true}\n")

    def stage1_fingerprint(out: str) -> str:
        cfg = pl.load_pipeline_config(path, [f"output_dir={out}"])
        captions = pl._captions_path(cfg)
        if not captions.exists():
            captions.parent.mkdir(parents=True)
            captions.write_text('{"image": "a.png", "caption": "a red square"}\n')
        root = Path(cfg.output_dir).resolve()
        loaded = pl._stage_recipe(cfg, cfg.stages[0], 0, False, captions, root, None)
        assert Path(loaded.config.data.path).is_absolute()
        inputs = {"synthetic": dataclasses.asdict(cfg.synthetic), "captions": pl._content_digest(captions)}
        return pl._stage_fingerprint(loaded, None, inputs, root=root)

    relative = stage1_fingerprint("runs/tiny")
    assert stage1_fingerprint(str(tmp_path / "runs" / "tiny")) == relative
    shutil.move(tmp_path / "runs" / "tiny", tmp_path / "runs" / "moved")
    assert stage1_fingerprint("runs/moved") == relative


# ------------------------------------------------------------------------------------------------
# 2. the same weights exported again keep the later stages; 6. a resumed stage says so
# ------------------------------------------------------------------------------------------------


def _safetensors(path: Path, header: str, data: bytes) -> None:
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_weights_hash_counts_tensor_values_not_the_header_order(tmp_path):
    from lumina_lightning.fileio import content_digest, weights_hash

    tensor = '"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    a, b, c = (tmp_path / n for n in ("a", "b", "c"))
    for folder in (a, b, c):
        folder.mkdir()
    # the safetensors writer orders __metadata__ by a per-process hash map: two saves of one tensor
    _safetensors(a / "model.safetensors", '{"__metadata__":{"format":"x","config":"{}"},' + tensor + "}", b"\0" * 8)
    _safetensors(b / "model.safetensors", '{"__metadata__":{"config":"{}","format":"x"},' + tensor + "}", b"\0" * 8)
    _safetensors(c / "model.safetensors", '{"__metadata__":{"format":"x","config":"{}"},' + tensor + "}", b"\1" * 8)
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert weights_hash(a) == weights_hash(b) != weights_hash(c)
    assert weights_hash(tmp_path / "missing") is None and content_digest(a) != content_digest(c)


def test_a_deleted_export_is_exported_again_and_a_resumed_stage_says_from_where(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pl, "_synthetic", lambda step: tmp_path)
    out = tmp_path / "out"
    path = _pipeline(tmp_path / "p.yaml", out, _tiny_stages(tmp_path))
    first = pl.run_pipeline(pl.load_pipeline_config(path))
    assert [e["resumed_from_step"] for e in first["stages"]] == [None, None]

    # stage 1's export deleted: it resumes at max_steps and exports the same weights again (new file
    # dates, and safetensors headers in another order), so stage 2 is kept
    shutil.rmtree(out / "s1" / "export")
    capsys.readouterr()
    again = pl.run_pipeline(pl.load_pipeline_config(path))
    s1, s2 = again["stages"]
    assert not s1.get("reused") and s1["resumed_from_step"] == 4 and s1["loss_first"] is None
    assert s2["reused"] and not list(out.glob("*.replaced-*"))

    # stage 2 interrupted after step 2 of 4: it resumes there, and the summary says its losses and
    # seconds cover steps 3-4 only
    ckpts = out / "s2" / "checkpoints"
    shutil.copy(ckpts / "step=0000002.ckpt", ckpts / "last.ckpt")
    shutil.rmtree(out / "s2" / "export")
    record = _records(out)["s2"]
    (out / "s2" / pl.STAGE_RECORD).write_text(json.dumps({"fingerprint": record["fingerprint"]}))
    capsys.readouterr()
    resumed = pl.run_pipeline(pl.load_pipeline_config(path))
    s2 = resumed["stages"][1]
    assert s2["resumed_from_step"] == 2 and s2["steps"] == 4 and s2["loss_first"] is not None
    printed = capsys.readouterr().out
    assert "| s2 (resumed from step 2) |" in printed and "(steps 3–4 only)" in printed
    assert json.loads((out / "summary.json").read_text())["stages"][1]["resumed_from_step"] == 2


# ------------------------------------------------------------------------------------------------
# 3. an export changed since it was recorded is moved aside, not overwritten
# ------------------------------------------------------------------------------------------------


def test_a_changed_export_is_moved_aside_before_it_is_exported_again(tmp_path, monkeypatch, caplog):
    calls = _stub_train(monkeypatch, tmp_path)
    out = tmp_path / "out"
    path = _pipeline(tmp_path / "p.yaml", out, _tiny_stages(tmp_path))
    pl.run_pipeline(pl.load_pipeline_config(path))
    weights = out / "s1" / "export" / "transformer" / "model.safetensors"
    weights.write_text("edited by hand")

    calls.clear()
    with caplog.at_level(logging.WARNING, logger="lumina_lightning.pipeline"):
        pl.run_pipeline(pl.load_pipeline_config(path))
    assert (calls[0][0], calls[0][2]) == ("s1", True)  # the same stage, resumed: not moved aside whole
    aside = list((out / "s1").glob("export.replaced-*"))
    assert len(aside) == 1 and (aside[0] / "transformer" / "model.safetensors").read_text() == "edited by hand"
    assert str(out / "s1" / "export") in caplog.text and str(aside[0]) in caplog.text
    assert not list(out.glob("*.replaced-*"))


# ------------------------------------------------------------------------------------------------
# 4. stages train on the pipeline's synthetic dataset
# ------------------------------------------------------------------------------------------------


def test_stages_train_on_the_pipelines_synthetic_set(tmp_path):
    """The stage's recipe asks for 48 images of its own (`data.synthetic`), the pipeline for 24
    (`synthetic.n=24`): the stage trains on the pipeline's 24, which are not regenerated."""
    synth = tmp_path / "synth"
    stage = tiny_recipe(tmp_path, "s.yaml", stage="s", trainer={"max_steps": 2, "accelerator": "cpu", "devices": 1,
                                                                "enable_progress_bar": False},
                        data={"path": str(synth / "train.jsonl"), "val_path": None, "resolution": 16, "patch": 2,
                              "batch_size": 4, "num_workers": 0, "caption_weights": {"short": 1.0},
                              "synthetic": {"n": 48, "n_test": 8, "size": 16, "seed": 0}})
    extra = f"synthetic: {{out: {json.dumps(str(synth))}, n: 48, n_test: 8, size: 16, seed: 0}}\n"
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", [stage], extra)
    summary = pl.run_pipeline(pl.load_pipeline_config(path, ["synthetic.n=24"]))
    assert summary["ok"]
    assert json.loads((synth / "synth_config.json").read_text())["n_train"] == 24
    assert len((synth / "train.jsonl").read_text().splitlines()) == 24

    # the first stage of a pipeline with captions reads them: no synthetic set is written beside them
    cfg = pl.load_pipeline_config(path, ["synthetic.n=24"])
    captions = tmp_path / "captions" / "train_unicap.jsonl"
    assert pl._stage_recipe(cfg, cfg.stages[0], 0, False, captions, tmp_path, None).config.data.synthetic is None


def test_a_stage_reading_its_own_synthetic_set_elsewhere_is_refused(tmp_path, monkeypatch):
    calls = _stub_train(monkeypatch, tmp_path)
    stages = [RECIPES / "tiny" / "stage1_lowres.yaml"]
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", stages, f"synthetic: {{out: {tmp_path / 'mine'}}}\n")
    with pytest.raises(RecipeError, match=r"synthetic.out=.*mine.*another set") as err:
        pl.run_pipeline(pl.load_pipeline_config(path))
    assert "runs/tiny/synthetic/train.jsonl" in str(err.value) and calls == []
    # pointed at the pipeline's set, it runs
    pl.run_pipeline(pl.load_pipeline_config(path, [f"stage_overrides=[data.path={tmp_path / 'mine' / 'train.jsonl'}]"]))
    assert calls[0][1].data.path == str(tmp_path / "mine" / "train.jsonl") and calls[0][1].data.synthetic is None


def test_the_refusal_suggests_generating_into_a_stages_own_folder_only_if_nothing_of_the_users_is_there(
        tmp_path, monkeypatch):
    """Following "set synthetic.out=<the stage's folder>" must not generate over the user's own files."""
    calls = _stub_train(monkeypatch, tmp_path)
    own = tmp_path / "own"
    stage = tiny_recipe(tmp_path, "own.yaml", stage="s1",
                        data={"path": str(own / "train.jsonl"), "synthetic": {"n": 20, "size": 16}})
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", [stage], f"synthetic: {{out: {tmp_path / 'pipe'}}}\n")
    with pytest.raises(RecipeError, match=r"Set `synthetic.out=.*own`, or point the stage at the pipeline's set"):
        pl.run_pipeline(pl.load_pipeline_config(path))
    own.mkdir()
    (own / "train.jsonl").write_text('{"image": "a.png", "caption": "mine"}\n')  # the user's files there
    with pytest.raises(RecipeError, match=r"another set than the pipeline's. Point the stage") as err:
        pl.run_pipeline(pl.load_pipeline_config(path))
    assert "synthetic.out=" + str(own) not in str(err.value) and calls == []


# ------------------------------------------------------------------------------------------------
# 5. TeaCache calibration switched off
# ------------------------------------------------------------------------------------------------


def test_calibration_and_guidance_scale_switched_off_are_removed_from_the_exports(tmp_path, monkeypatch, caplog):
    from lumina_lightning.sampling.pipeline_io import update_pipeline_defaults

    _stub_train(monkeypatch, tmp_path)
    out = tmp_path / "out"
    path = _pipeline(tmp_path / "p.yaml", out, _tiny_stages(tmp_path))
    pl.run_pipeline(pl.load_pipeline_config(path))
    for stage in ("s1", "s2"):  # what an earlier run's calibration stored (_calibrate_teacache)
        update_pipeline_defaults(out / stage / "export", teacache_version=[1.0, -2.0, 0.5], teacache=0.1, cfg_scale=2.0)

    with caplog.at_level(logging.INFO, logger="lumina_lightning.pipeline"):
        again = pl.run_pipeline(pl.load_pipeline_config(path))
    assert all(e["reused"] and "teacache" not in e for e in again["stages"])
    for stage in ("s1", "s2"):
        # the calibration gone, and the guidance scale too: this pipeline sets no eval.cfg_scale, so a fresh
        # run would store none
        defaults = json.loads((out / stage / "export" / "pipeline.json").read_text())["defaults"]
        assert defaults == {}
    assert caplog.text.count("teacache_calibration is off: removed the calibration") == 2
    assert caplog.text.count("eval.cfg_scale is not set: removed the guidance scale") == 2

    # with eval.cfg_scale set, every (reused) export gets that scale, and a calibration stays off
    path = _pipeline(tmp_path / "p.yaml", out, _tiny_stages(tmp_path), extra="")
    text = path.read_text().replace("eval: {enabled: false}", "eval: {enabled: false, cfg_scale: 3.5}")
    path.write_text(text)
    again = pl.run_pipeline(pl.load_pipeline_config(path))
    assert all(e["reused"] for e in again["stages"])
    for stage in ("s1", "s2"):
        assert json.loads((out / stage / "export" / "pipeline.json").read_text())["defaults"] == {"cfg_scale": 3.5}


# ------------------------------------------------------------------------------------------------
# 7. what the user sets for every stage wins over --smoke
# ------------------------------------------------------------------------------------------------


def test_explicit_stage_overrides_win_over_smoke_ones(tmp_path, monkeypatch):
    calls = _stub_train(monkeypatch, tmp_path)
    stages = _tiny_stages(tmp_path)
    path = _pipeline(tmp_path / "p.yaml", tmp_path / "out", stages,
                     "stage_smoke_overrides: [trainer.max_steps=2, validation.every_n_steps=3]\n")
    data = yaml.safe_load(path.read_text())
    data["stages"][0] = {"recipe": str(stages[0]), "overrides": ["trainer.max_steps=100"]}  # the file's own
    path.write_text(yaml.safe_dump(data))
    smoke = pl.load_pipeline_config(path, ["stage_overrides=[trainer.max_steps=5]"], smoke=True)
    pl.run_pipeline(smoke, smoke=True)
    assert [(c[0], c[1].trainer.max_steps, c[1].validation.every_n_steps) for c in calls] == [("s1", 5, 3), ("s2", 5, 3)]
    calls.clear()
    pl.run_pipeline(pl.load_pipeline_config(path, smoke=True), smoke=True)  # --smoke still shortens a stage's own steps
    assert [c[1].trainer.max_steps for c in calls] == [2, 2]

    cfg = pl.load_pipeline_config(RECIPES / "tiny" / "pipeline.yaml",
                                  [f"output_dir={tmp_path / 'u'}", "unicap.overrides=[trainer.max_steps=7]"], smoke=True)
    assert pl._unicap_recipe(cfg, smoke=True).config.trainer.max_steps == 7
