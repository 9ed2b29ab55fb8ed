#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one short run (about 9 minutes on one H100), most valuable first:
#   1. which SDPA kernels take our attention calls (GQA without / with a padding mask);
#   2. the `gpu`-marked tests: a tiny recipe trained with every GPU strategy (auto, Lightning
#      FSDPStrategy, DeepSpeed ZeRO-2/3, FSDP2) in bf16-mixed, the same for the UniCap fine-tune, and
#      flash-attn parity where installed, bf16-held sampling weights against fp32 ones under autocast
#      (the two pytest runs go side by side: their training runs use other ports);
#   3. benchmarks/sampler_speed.py on CUDA in bf16 on a random model of the released 2.6B shape, where
#      the transformer is all the cost (issue 5's wall-time ratios), once with fp32 weights under
#      autocast and once with the weights held in bf16 (--compare-cast);
#   4. benchmarks/model_speed.py in bf16 on CUDA: our Next-DiT vs diffusers, mid-size and the
#      released 2.6B shape at 512 and 1024 px (the README's rows), with achieved TFLOP/s and peak memory.
# Each step has its own time limit, so a hung step costs its limit, not the rest of the run.
# usage: bash benchmarks/gpu_checks.sh [OUT_DIR]        (logs go to OUT_DIR, default gpu_checks/)
# On a host with PyTorch but without our other dependencies and without a package index, install
# the wheels benchmarks/gpu_wheels.sh fetches elsewhere (its header says how).
set -uo pipefail
out=${1:-gpu_checks}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False MLFLOW_DISABLE_TELEMETRY=true PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, lightning, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'lightning', lightning.__version__, 'transformers', transformers.__version__)" | tee -a "$out/gpu.txt"
# fail fast when an import is missing rather than after every step's time limit
python3 -c "import lumina_lightning.training.run, lumina_lightning.sampling, diffusers, deepspeed, omegaconf, torchdata" \
    2>&1 | tail -3 | tee -a "$out/gpu.txt" || exit 1

timeout 30 python3 - <<'PY' 2>&1 | tee "$out/sdpa_kernels.txt"
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

tests_limit=${GPU_TESTS_LIMIT:-200}
timeout "$tests_limit" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_distributed.py tests/test_model.py tests/test_sampling_pipeline.py \
    > "$out/gpu_tests_train.log" 2>&1 &
a=$!
timeout "$tests_limit" python3 -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_unicap_train.py \
    > "$out/gpu_tests_unicap.log" 2>&1 &
b=$!
wait $a || status=1
wait $b || status=1
tail -n 15 "$out/gpu_tests_train.log" "$out/gpu_tests_unicap.log"

timeout "${SAMPLER_LIMIT:-150}" python3 benchmarks/sampler_speed.py --device cuda --dtype bf16 \
    --random-model NextDiT_2B_GQA_patch2_Adaln_Refiner --random-size 64 --random-std 0.02 --repeats 2 --compare-cast 2>&1 | tee "$out/sampler_speed.txt" || status=1

for args in "--preset mid --batch 8 --latent 64 --cap-len 128" \
            "--preset 2b --batch 2 --latent 64 --cap-len 128" \
            "--preset 2b --batch 1 --latent 128 --cap-len 256"; do
    echo "== model_speed.py $args" | tee -a "$out/model_speed.txt"
    timeout 70 python3 benchmarks/model_speed.py --devices cuda --repeats 10 --warmup 3 $args 2>&1 \
        | grep -v "kept in float32" | tee -a "$out/model_speed.txt" || status=1
done
exit $status
