"""Bad command-line inputs give a one-line message naming the problem and exit code 2, never a traceback.

Every case here fails before any model loads, so the whole file runs in seconds.
"""

from __future__ import annotations

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
])
def test_convert_bad_inputs(argv, message, bad, capsys):
    from lumina_lightning.models.convert_cli import main

    assert message.format(d=bad) in _run(main, argv, capsys, bad)


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
