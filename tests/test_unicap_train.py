"""UniCap fine-tuning: recipe validation, freezing/LoRA, a tiny tracked run that learns and exports."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from lumina_lightning.modules.unicap import (
    UNICAP_META,
    configure_trainable,
    load_captioner,
    load_vlm,
    trainable_summary,
    vision_and_language_parts,
    wrap_classes,
)
from lumina_lightning.training.recipe import RecipeError, load_recipe
from lumina_lightning.training.unicap_config import UniCapRecipe
from lumina_lightning.training.unicap_run import train_unicap
from test_unicap_helpers import tiny_vlm, unicap_recipe

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# recipes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["unicap_finetune.yaml", "tiny/unicap_finetune.yaml"])
def test_shipped_unicap_recipes_validate(name):
    loaded = load_recipe(ROOT / "recipes" / name)
    assert loaded.task == "unicap" and isinstance(loaded.config, UniCapRecipe)
    cfg = loaded.config
    assert cfg.data.level_weights and all(w >= 0 for w in cfg.data.level_weights.values())
    if name.startswith("tiny"):
        assert cfg.model.build_tiny is not None and cfg.trainer.accelerator == "cpu"
        assert cfg.data.path == "runs/tiny/synthetic/train.jsonl" and cfg.data.synthetic  # shared with the stages
    else:
        assert cfg.trainer.strategy == "deepspeed_stage_3" and cfg.trainer.precision == "bf16-mixed"
        assert cfg.trainer.devices == 8 and cfg.model.path.startswith("/")


@pytest.mark.parametrize("override, message", [
    ("model.lorra.r=8", "did you mean `model.lora`"),
    ("trainer.strategy=deepspeed_stage3", "did you mean 'deepspeed_stage_3'"),
    ("data.level_weights={short: -1}", "data.level_weights.short"),
    ("data.batch_size=two", "`data.batch_size` must be int"),
    ("optim.loss_reduction=mean", "optim.loss_reduction"),
    ("data.val_path=null", "validation.eval_samples"),
    ("model.lora.r=0", "model.lora"),
    # caption levels without an instruction (typos) would silently train / validate nothing
    ("validation.eval_level=shrot", "`validation.eval_level` = 'shrot' has no instruction \\(did you mean 'short'"),
    ("validation.levels=[short, lnog]", "`validation.levels[1]` = 'lnog'"),
    ("data.level_weights={short: 1, tag: 1}",
     "`data.level_weights.tag` = 'tag' has no instruction \\(did you mean 'tags'"),
    ("data.level_weights={long_xx: 1}", "<level>_<lang> variants"),
])
def test_bad_unicap_recipes_name_the_key(override, message):
    with pytest.raises(RecipeError, match=message.replace("{", r"\{").replace("[", r"\[")):
        load_recipe(ROOT / "recipes/tiny/unicap_finetune.yaml", [override])


def test_known_levels_language_variants_and_new_instructions_validate():
    cfg = load_recipe(ROOT / "recipes/tiny/unicap_finetune.yaml", [
        "data.level_weights={long_de: 1, short: 2, alt: 1}", "data.instructions={alt: Describe the colours.}",
        "validation.levels=[alt, tags_zh]", "validation.eval_level=alt"]).config
    assert cfg.validation.eval_level == "alt" and cfg.data.level_weights["long_de"] == 1


def test_everything_frozen_is_rejected(tmp_path):
    path = unicap_recipe(tmp_path, model={"path": "x", "freeze_vision_tower": True, "freeze_language_model": True,
                                          "train_projector": False})
    with pytest.raises(RecipeError, match="nothing would train"):
        load_recipe(path)


# ------------------------------------------------------------------------------------------------
# what trains
# ------------------------------------------------------------------------------------------------


def _cfg(**model):
    cfg = UniCapRecipe()
    for key, value in model.items():
        if key.startswith("lora_"):
            setattr(cfg.model.lora, key[5:], value)
        else:
            setattr(cfg.model, key, value)
    return cfg.model


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_freeze_options_and_lora_change_what_trains():
    base = load_vlm(tiny_vlm())
    parts = vision_and_language_parts(base)
    vision, projector, language = (set(parts[k]) for k in ("vision", "projector", "language"))
    assert vision and projector and language and not parts["other"]
    assert any("merger" in n for n in projector) and any("lm_head" in n for n in language)
    assert {c.__name__ for c in wrap_classes(base)} == {"Qwen2VLDecoderLayer", "Qwen2VLVisionBlock"}

    full = configure_trainable(load_vlm(tiny_vlm()), _cfg())
    assert _trainable(full) == vision | projector | language
    no_vision = configure_trainable(load_vlm(tiny_vlm()), _cfg(freeze_vision_tower=True))
    assert _trainable(no_vision) == projector | language
    no_lm = configure_trainable(load_vlm(tiny_vlm()), _cfg(freeze_language_model=True))
    assert _trainable(no_lm) == vision | projector
    only_projector = configure_trainable(load_vlm(tiny_vlm()), _cfg(freeze_vision_tower=True,
                                                                     freeze_language_model=True))
    assert _trainable(only_projector) == projector
    no_projector = configure_trainable(load_vlm(tiny_vlm()), _cfg(freeze_vision_tower=True, train_projector=False))
    assert _trainable(no_projector) == language

    lora = configure_trainable(load_vlm(tiny_vlm()), _cfg(lora_enabled=True, lora_r=4, lora_alpha=8))
    names = _trainable(lora)
    assert names and all("lora_" in n for n in names)
    assert all("language_model" in n for n in names)  # the default targets are the LM projections
    summary = trainable_summary(lora)
    assert summary["trainable"] == summary["trainable_language"] < summary["total"] // 5

    # one optimizer step moves exactly the trainable parameters
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    ids = torch.tensor([[5, 6, 7, 8]])
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # LoRA B starts at zero: the second step also moves A
        lora(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    moved = {n for n, p in lora.named_parameters() if not torch.equal(before[n], p.detach())}
    assert moved == names


# ------------------------------------------------------------------------------------------------
# a tiny run
# ------------------------------------------------------------------------------------------------


def test_default_lora_targets_leave_a_qwen25_vision_tower_alone():
    """Qwen2.5-VL's vision MLP is also named gate/up/down_proj: name lists would adapt it too."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "mrope_section": [2, 1, 1]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0])
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    assert any(n.endswith("mlp.gate_proj") and "visual" in n for n, _ in model.named_modules())
    model = configure_trainable(model, _cfg(lora_enabled=True, lora_r=2))
    names = _trainable(model)
    assert names and not [n for n in names if "visual" in n]
    adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names}
    assert adapted == {f"{p}_proj" for p in ("q", "k", "v", "o", "gate", "up", "down")}


def test_tiny_run_learns_tracks_validates_and_exports(tmp_path):
    recipe = unicap_recipe(
        # logging every 5 steps: validation at 12 and 24 is off Lightning's logging steps
        tmp_path, trainer={"max_steps": 24, "checkpoint_every_n_steps": 12, "log_every_n_steps": 5},
        validation={"every_n_steps": 12},
        tracking={"enabled": True, "tracking_uri": f"sqlite:///{tmp_path / 'mlruns.db'}",
                  "artifact_location": (tmp_path / "artifacts").as_uri(), "experiment": "t"},
    )
    result = train_unicap(load_recipe(recipe))
    assert result.exit_code == 0 and result.global_step == 24 and len(result.losses) == 24
    losses = result.losses
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses  # the caption loss clearly falls
    assert [v["step"] for v in result.val_history] == [12.0, 24.0]
    assert result.val_history[-1]["val/loss"] < result.val_history[0]["val/loss"]
    for key in ("color", "shape", "count", "binding", "all"):
        assert 0.0 <= result.metrics[f"acc_{key}"] <= 1.0
    assert json.loads((result.output_dir / "eval.json").read_text())["step"] == 24
    captions = (result.output_dir / "captions" / "step_0000024.txt").read_text()
    assert "generated:" in captions and "reference:" in captions and "] tags" in captions

    # the export is a transformers folder + processor + instruction table that `caption` loads
    export = result.export_dir
    assert (export / "config.json").is_file() and (export / "model.safetensors").is_file()
    assert (export / "tokenizer.json").is_file() and (export / "preprocessor_config.json").is_file()
    meta = json.loads((export / UNICAP_META).read_text())
    assert meta["format"] == "full" and meta["instructions"]["short"].startswith("Describe")
    captioner = load_captioner(export)
    trained = result.module.model.state_dict()
    for name, value in captioner.model.state_dict().items():
        assert torch.equal(value, trained[name].cpu()), name

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.data.tags["stage"] == "unicap_test" and run.data.tags["task"] == "unicap"
    assert run.data.params["optim.lr"] == "0.005" and run.data.params["data.batch_size"] == "8"
    assert int(run.data.params["model.params.trainable"]) > 0
    for metric in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/acc_color", "val/acc_all"):
        assert metric in run.data.metrics, metric
    # both validations reach MLflow, beside the training metrics of the step they follow
    history = sorted((h.step, h.value) for h in client.get_metric_history(run.info.run_id, "val/loss"))
    assert [s for s, _ in history] == [11, 23]
    assert history[-1][1] == pytest.approx(result.val_history[-1]["val/loss"])
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"recipe", "captions", "export", "eval.json"} <= top
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "captions")]
    assert logged == ["captions/step_0000012.txt", "captions/step_0000024.txt"]


def test_lora_run_checkpoints_adapters_only_and_exports_an_adapter(tmp_path):
    recipe = unicap_recipe(tmp_path, model={"path": tiny_vlm(), "dtype": "fp32",
                                            "lora": {"enabled": True, "r": 4, "alpha": 8}},
                           trainer={"max_steps": 3, "checkpoint_every_n_steps": 3},
                           validation={"eval_samples": 2, "n_captions": 1, "levels": ["short"]})
    result = train_unicap(load_recipe(recipe))
    ckpt = torch.load(result.last_checkpoint, map_location="cpu", weights_only=False)
    keys = list(ckpt["state_dict"])
    assert keys and all("lora_" in k for k in keys)  # frozen base weights stay in model.path
    export = result.export_dir
    assert (export / "adapter_config.json").is_file() and not (export / "model.safetensors").exists()
    assert json.loads((export / UNICAP_META).read_text())["format"] == "lora"
    captioner = load_captioner(export)  # base from unicap.json, adapter merged
    assert not any("lora_" in n for n, _ in captioner.model.named_parameters())
    merged = result.module.model.merge_and_unload().state_dict()
    for name, value in captioner.model.state_dict().items():
        assert torch.allclose(value, merged[name], atol=1e-6), name

    # an adapter folder transformers and peft load as such: no base config.json beside the adapter
    # (transformers would look for full weights), the base named by its absolute path
    assert not (export / "config.json").exists() and not (export / "generation_config.json").exists()
    adapter_config = json.loads((export / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_vlm()).resolve())
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    auto = AutoModelForImageTextToText.from_pretrained(str(export))
    assert any("lora_" in n for n, _ in auto.named_parameters())
    peft_model = PeftModel.from_pretrained(load_vlm(adapter_config["base_model_name_or_path"]), str(export))
    for name, value in peft_model.merge_and_unload().state_dict().items():
        assert torch.allclose(value, merged[name], atol=1e-6), name


@pytest.mark.parametrize("cut,total", [(3, 6), (14, 17)])  # 96 records / batch 8: epoch 1 starts at step 12
def test_resume_continues_to_the_same_weights(tmp_path, cut, total):
    common = dict(validation={"eval_samples": 0}, optim={"schedule": "constant", "warmup_steps": 0})
    straight = train_unicap(load_recipe(unicap_recipe(tmp_path / "a", trainer={"max_steps": total}, **common)))
    first = train_unicap(load_recipe(unicap_recipe(tmp_path / "b", trainer={"max_steps": cut,
                                                                            "checkpoint_every_n_steps": cut},
                                                   **common)))
    resumed = train_unicap(load_recipe(unicap_recipe(tmp_path / "b", resume="auto", trainer={"max_steps": total},
                                                     **common)))
    assert resumed.global_step == total
    # same data position, optimizer state and LR schedule: the same losses and weights as one straight run
    assert first.losses + resumed.losses == pytest.approx(straight.losses, abs=1e-5)
    for (name, a), (_, b) in zip(straight.module.model.named_parameters(), resumed.module.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def _strategy_run(tmp_path: Path, steps: int, port: int, **trainer) -> tuple[dict, dict, dict]:
    """Fine-tune in a fresh interpreter with ``trainer`` settings; (result, exported weights, base weights)."""
    from training_utils import run_script

    recipe = unicap_recipe(tmp_path, trainer={"max_steps": steps, **trainer}, validation={"eval_samples": 0})
    out = run_script(ROOT / "tests" / "scripts" / "unicap_strategy_run.py", str(recipe), str(tmp_path / "w.pt"),
                     port=port)
    assert out.returncode == 0, out.stderr[-4000:]
    result = torch.load(tmp_path / "w.pt")
    assert result["exit_code"] == 0 and result["step"] == steps
    # read back on the CPU in fp32 whatever the host: the comparison is of the exported values, not of
    # the bf16-on-CUDA copy ``device="auto"`` would make on a GPU host
    exported = load_captioner(result["export"], device="cpu", dtype="fp32").model.state_dict()
    return result, exported, load_vlm(tiny_vlm(), dtype="fp32").state_dict()


@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["fsdp1", "deepspeed_stage_2", "deepspeed_stage_3", "fsdp"])
def test_gpu_strategies_fine_tune(tmp_path, strategy):
    import math

    result, exported, start = _strategy_run(tmp_path, 4, 29651, accelerator="gpu", strategy=strategy,
                                            devices=min(torch.cuda.device_count(), 2), precision="bf16-mixed")
    assert all(math.isfinite(v) for v in result["losses"])
    moved = [k for k, v in result["weights"].items() if k in start and not torch.allclose(v.float().cpu(), start[k], atol=1e-3)]
    assert moved  # the fine-tune changed the weights
    for name, value in result["weights"].items():
        assert torch.allclose(exported[name].float(), value.float().cpu(), atol=1e-2), name


def test_fsdp2_fine_tune_exports_the_gathered_weights(tmp_path):
    """FSDP2 on CPU (gloo): parameters are DTensors even on one rank; the export holds the full weights."""
    result, exported, start = _strategy_run(tmp_path, 2, 29652, strategy="fsdp", devices=1)
    assert any(not torch.equal(exported[k], start[k]) for k in start)  # trained weights, not the base
    for name, value in result["weights"].items():
        assert torch.equal(exported[name], value), name


def test_unreadable_held_out_images_are_left_out_of_validation(tmp_path, caplog):
    """The last validation runs after all the training and before the export: a bad held-out image
    must not cost the run (training data already skips and counts them)."""
    from test_unicap_helpers import bad_images
    from training_utils import tiny_synthetic

    synth = tiny_synthetic()
    rows = [json.loads(line) for line in (synth / "test.jsonl").read_text().splitlines()]
    for r in rows:
        r["image"] = str(synth / r["image"])
    broken, missing = bad_images(tmp_path / "bad")
    rows[1]["image"], rows[3]["image"] = str(broken), str(missing)
    val = tmp_path / "val.jsonl"
    val.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = unicap_recipe(tmp_path, data={"val_path": str(val)}, trainer={"max_steps": 2})
    result = train_unicap(load_recipe(recipe))
    assert result.export_dir is not None and (result.export_dir / "config.json").exists()
    assert result.validation["val/acc_all"] >= 0  # captions of the readable images were scored
    captioned = {c["image"] for c in result.module.last_captions}
    assert str(broken) not in captioned and str(missing) not in captioned and len(captioned) >= 6
    assert str(broken) in caplog.text and str(missing) in caplog.text


class _SeenBatches(pl.Callback):
    """Records the record indices of every training batch."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append(list(batch["meta"]["indices"]))


def test_resume_after_stops_between_periodic_checkpoints(tmp_path):
    """A run stopped by max_steps (or max_time) between periodic checkpoints writes last.ckpt with
    Lightning's epoch counted as finished (one more per stop): the resumed runs must still finish
    the data epoch (12 steps) and go on like one straight run — same batches, same weights."""
    common = dict(validation={"eval_samples": 0}, optim={"schedule": "constant", "warmup_steps": 0})
    seen = _SeenBatches()
    straight = train_unicap(load_recipe(unicap_recipe(tmp_path / "a", trainer={"max_steps": 14}, **common)),
                            extra_callbacks=[seen])
    batches, losses = [], []
    for i, steps in enumerate((3, 5, 14)):
        part = _SeenBatches()
        result = train_unicap(load_recipe(unicap_recipe(
            tmp_path / "b", resume="auto" if i else None,
            trainer={"max_steps": steps, "checkpoint_every_n_steps": 100}, **common)), extra_callbacks=[part])
        assert result.global_step == steps
        batches += part.batches
        losses += result.losses
    assert batches == seen.batches
    assert losses == pytest.approx(straight.losses, abs=1e-5)
    for (name, a), (_, b) in zip(straight.module.model.named_parameters(), result.module.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_lora_resume_with_dropout_continues_to_the_same_weights(tmp_path):
    """LoRA dropout draws from the torch RNG: the checkpoint carries its state, so a resumed run
    draws the straight run's dropout masks."""
    common = dict(validation={"eval_samples": 0}, optim={"schedule": "constant", "warmup_steps": 0},
                  model={"path": tiny_vlm(), "dtype": "fp32",
                         "lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.3}})
    straight = train_unicap(load_recipe(unicap_recipe(tmp_path / "a", trainer={"max_steps": 6}, **common)))
    first = train_unicap(load_recipe(unicap_recipe(tmp_path / "b", trainer={"max_steps": 3,
                                                                            "checkpoint_every_n_steps": 3}, **common)))
    assert "lumina_torch_rng" in torch.load(first.last_checkpoint, map_location="cpu", weights_only=False)
    resumed = train_unicap(load_recipe(unicap_recipe(tmp_path / "b", resume="auto", trainer={"max_steps": 6},
                                                     **common)))
    assert first.losses + resumed.losses == pytest.approx(straight.losses, abs=1e-6)
    for (name, a), (_, b) in zip(straight.module.model.named_parameters(), resumed.module.model.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_with_another_model_path_is_refused(tmp_path):
    """Frozen weights are not in the checkpoint: resuming it on another model.path would mix models."""
    import shutil

    other = tmp_path / "other-vlm"
    shutil.copytree(tiny_vlm(), other)
    common = dict(validation={"eval_samples": 0}, trainer={"max_steps": 1, "checkpoint_every_n_steps": 1})
    train_unicap(load_recipe(unicap_recipe(tmp_path, **common)))
    with pytest.raises(ValueError, match=f"{Path(tiny_vlm()).resolve()}.*{other.resolve()}"):
        train_unicap(load_recipe(unicap_recipe(tmp_path, resume="auto", model={"path": str(other)}, **common)))
