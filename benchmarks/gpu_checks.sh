#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (about 5 minutes on one H100):
#   1. which SDPA kernels take our attention calls (GQA without / with a padding mask);
#   2. benchmarks/model_speed.py in bf16 on CUDA: our Next-DiT vs diffusers, mid-size and the
#      released 2.6B shape at 512 and 1024 px, with achieved TFLOP/s and peak memory;
#   3. the `gpu`-marked tests: a tiny recipe trained with every GPU strategy (auto, Lightning
#      FSDPStrategy, DeepSpeed ZeRO-2/3, FSDP2) in bf16-mixed, and flash-attn parity where installed.
# usage: bash benchmarks/gpu_checks.sh [OUT_DIR]        (logs go to OUT_DIR, default gpu_checks/)
set -uo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

python3 - <<'PY' 2>&1 | tee "$out/sdpa_kernels.txt"
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

q = torch.randn(2, 24, 1024, 96, device="cuda", dtype=torch.bfloat16)
k = v = torch.randn(2, 8, 1024, 96, device="cuda", dtype=torch.bfloat16)
mask = torch.ones(2, 1, 1, 1024, dtype=torch.bool, device="cuda")
mask[1, ..., 900:] = False
for name, backend in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                      ("cudnn", SDPBackend.CUDNN_ATTENTION)]:
    for label, m in (("no mask", None), ("padding mask", mask)):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
            print(f"{name:9s} enable_gqa, {label}: ok")
        except RuntimeError as e:
            print(f"{name:9s} enable_gqa, {label}: refused ({str(e).splitlines()[0][:90]})")
PY

for args in "--preset mid --batch 8 --latent 64 --cap-len 128" \
            "--preset 2b --batch 2 --latent 64 --cap-len 128" \
            "--preset 2b --batch 1 --latent 128 --cap-len 256"; do
    echo "== model_speed.py $args" | tee -a "$out/model_speed.txt"
    python3 benchmarks/model_speed.py --devices cuda --repeats 10 --warmup 3 $args 2>&1 \
        | grep -v "kept in float32" | tee -a "$out/model_speed.txt" || status=1
done

python3 -m pytest -m gpu -q -rs tests 2>&1 | tee "$out/gpu_tests.log" || status=1
exit $status
