#!/usr/bin/env bash
# Wheels for a CUDA host that already has PyTorch, Lightning, transformers' dependencies, peft and
# safetensors but cannot reach a package index (e.g. a lent GPU box): our remaining runtime
# dependencies at the versions pyproject.toml pins, for CPython 3.12 on x86-64 Linux. Run it where
# pip can reach PyPI, copy DIR over, then on the GPU host:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   PYTHONPATH=/tmp/site bash benchmarks/gpu_checks.sh OUT
# (gradio and mlflow are left out: the GPU checks do not import them.)
# usage: bash benchmarks/gpu_wheels.sh [DIR]        (default .whl/, about 25 MB)
set -euo pipefail
dir=${1:-.whl}
mkdir -p "$dir"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
for pkg in omegaconf==2.4.0 torchdata==0.11.0 diffusers==0.42.1 importlib_metadata==9.1.0 hjson==3.1.0 \
           pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
           transformers==5.24.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platforms[@]}" -d "$dir" "$pkg"
done
# DeepSpeed publishes no wheel: build its pure-Python one (its ops are JIT-compiled on the GPU host)
python3 -m pip wheel -q --no-deps -w "$dir" deepspeed==0.19.8
ls -la "$dir"
