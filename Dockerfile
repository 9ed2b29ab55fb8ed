# lumina-lightning for CUDA hosts: training (DDP/FSDP/DeepSpeed), sampling and the Gradio app.
# Build:  docker build -t lumina-lightning .
# Run:    docker run --gpus all -v /path/to/models:/models -v /path/to/data:/data \
#             -v $PWD/runs:/opt/lumina-lightning/runs lumina-lightning train recipes/stage1_lowres.yaml
#         (the real recipes read Gemma-2 and the FLUX VAE from /models and their data YAMLs from /data; runs/ and mlruns.db are written
#         in the working directory, the checkout, where the recipe paths resolve)
# App:    docker run --gpus all -p 7860:7860 -v $PWD/runs:/opt/lumina-lightning/runs lumina-lightning \
#             demo --ckpt runs/tiny/tiny_stage3_hq/export --listen
# The base image already holds the CUDA build of the torch version pyproject.toml pins (2.13.0),
# so pip keeps it; the devel flavour carries nvcc for flash-attn.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    MLFLOW_DISABLE_TELEMETRY=true \
    MAX_JOBS=8

RUN useradd --create-home --uid 1000 lumina
COPY --chown=lumina:lumina . /opt/lumina-lightning
# Run from the checkout, which the unprivileged user owns and can write: outputs (runs/, mlruns.db) go
# under the working directory, and recipes/ here is the one a user can edit (the installed package
# carries a copy, used from folders that have none).
WORKDIR /opt/lumina-lightning

# README "GPU install": flash-attn builds against the installed CUDA torch, hence no build isolation.
RUN pip install --no-build-isolation "/opt/lumina-lightning[gpu]"

USER lumina
EXPOSE 7860
ENTRYPOINT ["lumina"]
CMD ["--help"]
