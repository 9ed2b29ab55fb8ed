"""Bad command-line inputs give a one-line message naming the problem and exit code 2, never a traceback.

Every case here fails before any model loads, so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.fixture
def bad(tmp_path):
    """Paths of the wrong kind: a text file named like a checkpoint, garbage safetensors, a file, a folder."""
    (tmp_path / "x.ckpt").write_text("hello\n")
    (tmp_path / "x.safetensors").write_bytes(b"\xff" * 100)
    (tmp_path / "afile").write_text("a red circle\n")
    (tmp_path / "adir").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "index.json").write_text("{}")  # a cache already there
    (tmp_path / "latin1.yaml").write_bytes("stage: caf\xe9\n".encode("latin-1"))  # not UTF-8
    (tmp_path / "latin1.jsonl").write_bytes('\n{"image": "caf\xe9.png"}\n'.encode("latin-1"))  # line 2
    # synthetic manifests (test.jsonl) that the detector validation cannot use
    row = {"image": "nope.png", "meta": {"tag": "single_object", "prompt": "a photo of a circle",
                                         "include": [{"class": "circle", "count": 1}]}}
    (tmp_path / "badline.jsonl").write_text(f'{{"image": "a.png"}}\n\n{{"image": "b.png"}}\n{{"image": oops\n')
    (tmp_path / "list.jsonl").write_text('{"image": "a.png"}\n[1, 2]\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "untagged.jsonl").write_text('{"image": "a.png", "caption": "a red circle"}\n')
    (tmp_path / "noinclude.jsonl").write_text(json.dumps({**row, "meta": {**row["meta"], "include": []}}) + "\n")
    (tmp_path / "nosize.jsonl").write_text(json.dumps(row) + "\n")
    for name, text in (("pairbad", '{"tag": "colors", "correct": true}\n{oops\n'), ("pairrow", '{"image": "a.png"}\n')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.jsonl").write_text(text)  # an earlier eval's output, damaged
    return tmp_path


_NO_CUDA = pytest.mark.skipif("__import__('torch').cuda.is_available()", reason="needs a host without CUDA")


def _run(main, argv, capsys, bad):
    argv = [a.format(d=bad) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # parser.error
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.strip() and "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{d}/x.ckpt", "a"], "x.ckpt is not a readable training checkpoint"),
    (["--ckpt", "{d}/x.safetensors", "a"], "x.safetensors is not a readable .safetensors file"),
    (["--ckpt", "{d}/x.ckpt", "--out", "{d}/afile", "a"], "--out {d}/afile is a file, not a folder"),
    (["--ckpt", "{d}/x.ckpt", "--prompts-file", "{d}/adir"], "--prompts-file {d}/adir is a folder, not a file"),
    (["--ckpt", "{d}/x.ckpt", "a", "--width", "0"], "--width must be positive, got 0"),
    (["--ckpt", "{d}/x.ckpt", "a", "--device", "bogus"], "--device bogus is not a device"),
])
def test_sample_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.sampling.cli import main

    device = [] if "--device" in argv else ["--device", "cpu"]
    assert message.format(d=bad) in _run(main, [*argv, *device], capsys, bad)


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/adir"], "--prompts {d}/adir is a folder, not a file"),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--out", "{d}/afile"], "--out {d}/afile is a file"),
    (["--validate-detector", "--manifest", "{d}/adir"], "--manifest {d}/adir is a folder, not a file"),
    (["--images", "{d}/adir", "--ckpt", "{d}/x.ckpt"], "so --ckpt would be ignored"),
    (["--images", "{d}/adir", "--steps", "3", "--cfg", "2"], "so --steps, --cfg would be ignored"),
    pytest.param(["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--device", "cuda"],
                 "--device cuda but no CUDA GPU is visible", marks=_NO_CUDA),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--device", "bogus"], "--device bogus is not a device"),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text"),
    # a manifest is read line by line before any image is scored or any model loads: its own file:line
    (["--validate-detector", "--manifest", "{d}/badline.jsonl"], "{d}/badline.jsonl:4: malformed JSON line"),
    (["--images", "{d}/adir", "--manifest", "{d}/badline.jsonl"], "{d}/badline.jsonl:4: malformed JSON line"),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--manifest", "{d}/badline.jsonl"],
     "{d}/badline.jsonl:4: malformed JSON line"),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--paired-with", "{d}/pairbad"],
     "{d}/pairbad/results.jsonl:2: malformed JSON line"),
    (["--ckpt", "{d}/x.ckpt", "--prompts", "{d}/afile", "--paired-with", "{d}/pairrow"],
     "{d}/pairrow/results.jsonl:1: not a `lumina eval` result (no 'tag' and 'correct')"),
    (["--images", "{d}/adir", "--paired-with", "{d}/pairbad"], "{d}/pairbad/results.jsonl:2: malformed JSON line"),
    (["--validate-detector", "--manifest", "{d}/list.jsonl"], "{d}/list.jsonl:2: not a JSON object"),
    (["--validate-detector", "--manifest", "{d}/empty.jsonl"], "{d}/empty.jsonl: no records with GenEval metadata"),
    (["--validate-detector", "--manifest", "{d}/untagged.jsonl"], "{d}/untagged.jsonl: no records with GenEval"),
    (["--validate-detector", "--manifest", "{d}/noinclude.jsonl"], "{d}/noinclude.jsonl:1: meta: 'include' must be"),
    (["--validate-detector", "--manifest", "{d}/nosize.jsonl"],
     "{d}/nosize.jsonl:1: image {d}/nope.png does not exist, and without 'width' and 'height'"),
])
def test_eval_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.eval.cli import main

    device = [] if "--device" in argv else ["--device", "cpu"]
    assert message.format(d=bad) in _run(main, [*argv, *device], capsys, bad)


@pytest.mark.parametrize("argv, message", [
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina"], "x.ckpt is not a readable training checkpoint"),
    (["{d}/x.safetensors", "{d}/o", "--to", "lumina"], "x.safetensors is not a readable .safetensors file"),
    (["{d}/x.ckpt", "{d}/afile", "--to", "lumina"], "DST {d}/afile is a file, not a folder"),
    (["{d}/x.ckpt", "{d}/x.safetensors", "--to", "official"], "is a file, not a folder"),
    # --set values are checked against the config field's type before the (slow) read
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "axes_dims=abc"],
     "--set axes_dims: expected a list of 3 integers >= 1 (e.g. axes_dims=[32,32,32]), got 'abc'"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "axes_dims=[4,6"], "--set axes_dims: expected a list of 3"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "patch_size=abc"],
     "--set patch_size: expected an integer >= 1, got 'abc'"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "multiple_of=0"],
     "--set multiple_of: expected an integer >= 1, got 0"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "n_heads=2.5"], "--set n_heads: expected an integer >= 1"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "ffn_dim_multiplier=abc"],
     "--set ffn_dim_multiplier: expected a number > 0 or null, got 'abc'"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "norm_eps=-1"], "--set norm_eps: expected a number > 0"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "qk_norm=1"], "--set qk_norm: expected true or false"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "axis_dims=[4,6,6]"],
     "--set axis_dims: not a Next-DiT config field (did you mean axes_dims?)"),
    (["{d}/x.ckpt", "{d}/o", "--to", "lumina", "--set", "axes_dims"], "--set expects FIELD=VALUE, got 'axes_dims'"),
])
def test_convert_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.models.convert_cli import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)


@pytest.mark.parametrize("src, message", [
    ("{d}/nope", "no checkpoint or pipeline at {d}/nope"),
    ("{d}/adir", "{d}/adir is a directory but holds no known Next-DiT checkpoint"),
    ("{d}/afile", "{d}/afile: unknown checkpoint file type"),
])
def test_convert_bad_source_is_the_only_line(src, message, bad, capsys):
    """Named before the progress bar starts: no half-drawn bar in front of the message."""
    from lumina_lightning.models.convert_cli import main

    err = _run(main, [src, "{d}/o", "--to", "lumina"], capsys, bad)
    assert err.startswith(f"lumina convert: {message.format(d=bad)}") and err.count("\n") == 1, err


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: recipe\n"),
    (["{d}/adir"], "recipe {d}/adir is a folder, not a file"),
    (["recipes/tiny/stage1_lowres.yaml", "text_encoder.path={d}/nope"], "does not exist"),
    (["{d}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
    (["recipes/tiny/stage1_lowres.yaml", "optim.lr=-1"], "`optim.lr` must be > 0, got -1"),
    (["recipes/tiny/stage1_lowres.yaml", "trainer.checkpoint_every_n_steps=0"],
     "`trainer.checkpoint_every_n_steps` must be >= 1"),
    (["recipes/tiny/stage1_lowres.yaml", "validation.every_n_steps=-1"], "`validation.every_n_steps` must be >= 0"),
    (["recipes/tiny/stage1_lowres.yaml", "output_dir={d}/my run #2"], "would read ' #' as the start of a comment"),
])
def test_train_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.training.run import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)


@pytest.mark.parametrize("argv, message", [
    ([], "the following arguments are required: pipeline\n"),
    (["{d}/adir"], "pipeline file {d}/adir is a folder, not a file"),
    (["{d}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
])
def test_pipeline_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.training.pipeline import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)


@pytest.mark.parametrize("argv, message", [
    (["synth", "--out", "{d}/afile", "--n", "2"], "--out {d}/afile is a file, not a folder"),
    (["cache", "--data", "{d}/nope", "--out", "{d}/c", "--resolution", "32", "--text-encoder", "minilm"],
     "--data {d}/nope does not exist"),
    (["cache", "--data", "{d}/adir", "--out", "{d}/afile", "--resolution", "32", "--text-encoder", "minilm"],
     "--out {d}/afile is a file, not a folder"),
    pytest.param(["cache", "--data", "{d}/adir", "--out", "{d}/c", "--resolution", "32", "--text-encoder", "minilm",
                  "--device", "cuda"], "no CUDA GPU is visible", marks=_NO_CUDA),
    # refused before the encoders load: the VAE named here does not exist, and it is not what fails
    (["cache", "--data", "{d}/adir", "--out", "{d}/cache", "--resolution", "32", "--text-encoder", "minilm",
      "--vae", "{d}/nope"], "--out {d}/cache already holds a cache; pass --append"),
    (["cache", "--data", "{d}/adir", "--out", "{d}/c", "--resolution", "32", "--text-encoder", "minilm",
      "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["inspect", "{d}/latin1.jsonl"], "latin1.jsonl:2: not UTF-8 text"),
    (["inspect", "{d}/latin1.yaml"], "latin1.yaml: not UTF-8 text"),
])
def test_data_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.data.cli import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)


@pytest.mark.parametrize("argv, message", [
    (["--model", "{d}/nope"], "--model {d}/nope does not exist"),
    (["--model", "{d}/adir", "--input", "{d}/nope"], "--input {d}/nope does not exist"),
    (["--model", "{d}/adir", "--output", "{d}/adir"], "--output {d}/adir is a folder, not a file"),
    (["--model", "{d}/adir", "--levels", "short", "--eval-level", "long"], "--eval-level long is not among --levels"),
    pytest.param(["--model", "{d}/adir", "--device", "cuda"], "no CUDA GPU is visible", marks=_NO_CUDA),
])
def test_caption_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.modules.caption_cli import main

    defaults = {"--input": "{d}/afile", "--output": "{d}/out.jsonl"}
    argv = [*argv, *(x for k, v in defaults.items() if k not in argv for x in (k, v))]
    assert message.format(d=bad) in _run(main, argv, capsys, bad)


@pytest.mark.parametrize("argv, message", [
    (["--size", "bogus"], "--size 'bogus' is not a named size"),
    (["--latent", "7"], "--latent must be a multiple of the patch size"),
    (["--latent", "-1"], "--latent must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
])
def test_smoke_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.models.smoke import main

    assert message in _run(main, argv, capsys, bad)


def test_cli_survives_a_closed_pipe():
    """`lumina help | head -1`: the reader going away is no error worth a traceback."""
    import os

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    proc = subprocess.run([sys.executable, "-c", "import sys; from lumina_lightning.cli import main; "
                           "sys.exit(main(['help']))"], stdout=write, stderr=subprocess.PIPE, text=True, timeout=60)
    os.close(write)
    assert proc.returncode == 141 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{d}/x.ckpt", "--resolution", "0"], "--resolution must be positive, got 0"),
])
def test_demo_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.app import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)
