#!/usr/bin/env bash
# The GPU check, prepared for a session that is lent a GPU (run from the repository root on that machine):
#   bash benchmarks/gpu_check.sh        # about 5 minutes on one H100; numbers land in $OUT (or ./gpu-check)
# 1. the card and torch; 2. a CIFAR-shaped WRN-40-2 teacher trained 3 epochs in bf16 on CIFAR-100-format fixture
# data (5,000 images); 3. `ckptkd bench` on cuda, teachers in fp32 and in bf16; 4. batched vs looped ensemble forward.
# It needs torch with CUDA, numpy, pyyaml, safetensors, tqdm, rich, matplotlib and scikit-learn, not an install.
set -euo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
DATA=$(mktemp -d)
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
python3 -c "from pathlib import Path; from fixtures import write_cifar100
write_cifar100(Path('$DATA'), train_per_class=50, test_per_class=10)"
python3 -m ckptkd train configs/cifar100_wrn_40_2.yaml --out "$DATA/wrn" --set "data.root=$DATA" \
  --set schedule.epochs=3 --set precision=bf16 --set device=cuda --set log.progress=false
python3 -c "import json; m = json.load(open('$DATA/wrn/manifest.json'))
print(json.dumps({k: m[k] for k in ('device', 'precision', 'final')}))" | tee "$OUT/wrn_bf16.json"
python3 -m ckptkd bench --json --device cuda | tee "$OUT/bench_cuda.json"
python3 -m ckptkd bench --json --device cuda --autocast bf16 | tee "$OUT/bench_cuda_bf16.json"
python3 benchmarks/ensemble_forward.py --device cuda --json | tee "$OUT/ensemble_forward_cuda.json"
