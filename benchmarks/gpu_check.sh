#!/usr/bin/env bash
# The GPU check, for a session that is lent a GPU (run from the repository root on that machine):
#   bash benchmarks/gpu_check.sh        # about 4 minutes on one H100/H200; results land in $OUT (or ./gpu-check)
# It needs torch with CUDA, numpy, pyyaml, safetensors, tqdm, rich, matplotlib, scikit-learn and pytest, no install.
# Every step runs even when an earlier one fails; each appends one JSON line to summary.jsonl, all output goes to
# log.txt (two files, so everything comes back from a machine that returns few).
#   1. the card, torch, and NCCL (a one-rank all-reduce under torchrun)
#   2. tests/test_cuda.py: vmapped ensemble vs one by one, bf16/channels-last teachers, bf16 training, cache on cuda
#   3. a CIFAR-shaped WRN-40-2 teacher, 3 epochs on CIFAR-100-format fixture data (5,000 images), bf16 and fp32
#   4. a resnet20 student distilled from that teacher's snapshot ensemble (RUN@all), cached and online, bf16
#   5. `ckptkd bench --device cuda`: teachers in fp32 and in bf16 (48 steps x best of 3: GPU steps are short)
#   6. benchmarks/ensemble_forward.py on cuda: vmap vs loop, speed and largest difference
#   7. DDP over NCCL: `torchrun -m ckptkd train` and a cached `distill` with one rank per GPU
#   8. students as GPU users expect them: fp16 with its loss scaler, bf16, optim.ema 0.99, compile (inductor),
#      optim.accumulate 4 (batch
#      32 x 4 = 128), deterministic: true run twice (the two last checkpoints' sha256 must agree), each a resnet20
#      distilled for 2 epochs from the teacher's snapshot ensemble
#   9. the streaming path: a resnet18 on a generated folder of mixed-size JPEGs, and the folder bench on cuda
#   GPU_CHECK_STEPS="fixture ddp" runs only the steps named (fixture data is needed by the training steps; the
#   students of step 8 need the wrn_40_2 teacher of step 3).
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=src:tests PYTHONUNBUFFERED=1
LOG="$OUT/log.txt"
SUMMARY="$OUT/summary.jsonl"
DATA=$(mktemp -d)
QUIET=(--set log.progress=false --set log.tensorboard=false --set "data.root=$DATA")

wanted() { [[ -z "${GPU_CHECK_STEPS:-}" || " $GPU_CHECK_STEPS " == *" $1 "* ]]; }

step() {  # step NAME COMMAND...: run, log, and record status and seconds
  local name=$1; shift
  wanted "${name%%_*}" || return 0
  echo "=== $name: $*" | tee -a "$LOG"
  local started=$SECONDS
  "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - started))}" | tee -a "$SUMMARY"
}

record() {  # record NAME RUN_FOLDER: the run's manifest facts as one JSON line
  [[ -f "$2/manifest.json" ]] || return 0
  python3 -c "import json, sys; m = json.load(open(sys.argv[2] + '/manifest.json'))
print(json.dumps({'run': sys.argv[1], **{k: m.get(k) for k in ('device', 'precision', 'status', 'final',
      'teacher_ensemble', 'distributed')}, 'train_time_s': (m.get('final') or {}).get('train_time_s')}))" "$1" "$2" | tee -a "$SUMMARY"
}

step device bash -c "nvidia-smi -L; python3 -c 'import torch; print(torch.__version__, torch.version.cuda, \
torch.cuda.get_device_name(0), torch.cuda.is_bf16_supported())'"
cat > "$DATA/nccl.py" <<'EOF'
import torch, torch.distributed as dist
dist.init_process_group("nccl")
t = torch.ones(4, device="cuda") * (dist.get_rank() + 1)
dist.all_reduce(t)
print("nccl all_reduce ok:", t.tolist(), "world", dist.get_world_size(), "nccl", torch.cuda.nccl.version())
dist.destroy_process_group()
EOF
step nccl python3 -m torch.distributed.run --standalone --nproc_per_node 1 "$DATA/nccl.py"
step pytest_cuda python3 -m pytest tests/test_cuda.py -q -p no:cacheprovider
step fixture python3 -c "from pathlib import Path; from fixtures import write_cifar100
write_cifar100(Path('$DATA'), train_per_class=50, test_per_class=10)"
for precision in bf16 fp32; do
  step "wrn_40_2_$precision" python3 -m ckptkd train configs/cifar100_wrn_40_2.yaml --out "$DATA/wrn-$precision" \
    --set schedule.epochs=3 --set precision=$precision --set device=cuda "${QUIET[@]}"
  record "wrn_40_2_$precision" "$DATA/wrn-$precision"
done
for cache in on off; do
  step "distill_cache_$cache" python3 -m ckptkd distill configs/cifar100_wrn_40_2.yaml --out "$DATA/student-$cache" \
    --teacher "$DATA/wrn-bf16@all" --set model.name=resnet20 --set name=student --set schedule.epochs=3 \
    --set precision=bf16 --set device=cuda --set kd.cache=$cache --set kd.views=8 "${QUIET[@]}"
  record "distill_cache_$cache" "$DATA/student-$cache"
done
step bench_fp32 bash -c "python3 -m ckptkd bench --json --device cuda --steps 48 | tee -a $SUMMARY"
step bench_bf16 bash -c "python3 -m ckptkd bench --json --device cuda --steps 48 --autocast bf16 | tee -a $SUMMARY"
step ensemble_forward bash -c "python3 benchmarks/ensemble_forward.py --device cuda --iters 20 --warmup 3 --json \
  | tee -a $SUMMARY"
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
step ddp_train python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m ckptkd train \
  configs/cifar100_wrn_40_2.yaml --out "$DATA/ddp-wrn" --set schedule.epochs=2 --set precision=bf16 --set device=cuda \
  "${QUIET[@]}"
record ddp_train "$DATA/ddp-wrn"
step ddp_distill python3 -m torch.distributed.run --standalone --nproc_per_node "$GPUS" -m ckptkd distill \
  configs/cifar100_wrn_40_2.yaml --out "$DATA/ddp-student" --teacher "$DATA/ddp-wrn@all" --set model.name=resnet20 \
  --set name=student --set schedule.epochs=2 --set precision=bf16 --set device=cuda --set kd.cache=on "${QUIET[@]}"
record ddp_distill "$DATA/ddp-student"
for option in fp16 bf16 ema compile accumulate deterministic deterministic2; do
  case $option in
    fp16) sets=(--set precision=fp16) ;;
    bf16) sets=(--set precision=bf16) ;;
    ema) sets=(--set optim.ema=0.99) ;;
    compile) sets=(--set compile=true) ;;
    accumulate) sets=(--set optim.accumulate=4 --set data.batch_size=32) ;;
    deterministic*) sets=(--set deterministic=true) ;;
  esac
  step "students_$option" python3 -m ckptkd distill configs/cifar100_wrn_40_2.yaml --out "$DATA/option-$option" \
    --teacher "$DATA/wrn-bf16@all" --set model.name=resnet20 --set name=student --set schedule.epochs=2 \
    --set device=cuda "${sets[@]}" "${QUIET[@]}"
  record "students_$option" "$DATA/option-$option"
done
step students_deterministic_same python3 -c "import json, sys
a, b = (json.load(open(f'$DATA/option-{n}/manifest.json'))['checkpoints'][-1]['sha256'] for n in ('deterministic', 'deterministic2'))
print('deterministic reruns identical:', a == b); sys.exit(a != b)"
# 9. the streaming path on CUDA: a generated ImageNet-layout folder of mixed-size JPEGs, a resnet18 trained 2 epochs
#    through DataLoader workers with pinned memory, then `ckptkd bench --workload folder --device cuda`
step photos python3 -c "from pathlib import Path; from ckptkd.data.photos import write_photo_folder
write_photo_folder(Path('$DATA/photos'), classes=10, train_per_class=200, test_per_class=20, sizes=(128, 256))"
step streamed_train python3 -m ckptkd train configs/imagenet_resnet50.yaml --out "$DATA/streamed" "${QUIET[@]}" \
  --set data.root="$DATA/photos" --set model.name=resnet18 --set data.image_size=112 --set data.resize=128 \
  --set data.val_fraction=0.05 --set schedule.epochs=2 --set checkpoints.every=null --set device=cuda
record streamed_train "$DATA/streamed"
step bench_folder bash -c "python3 -m ckptkd bench --workload folder --json --device cuda | tee -a $SUMMARY"
