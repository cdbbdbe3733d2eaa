#!/usr/bin/env bash
# One prepared GPU check for a lent device machine (one GPU, no network; finishes in about 10 min):
#   1. the CUDA checks as a plain script (benchmarks/gpu_checks.py: no pytest needed): auto precision
#      against the compute capability, the runtime (cuda:0, cudnn.benchmark), the step against the CPU's,
#      SplitBatchNorm in place on CUDA (8 groups), training in fp32/bf16/fp16/auto with 8 BN groups;
#      then its timings (SplitBatchNorm in place vs the NCHW copies, kNN scoring on the GPU vs the CPU),
#   2. a one-GPU NCCL process group under torchrun: barrier without the device warning, all_reduce,
#      SyncBatchNorm + DDP step, the sharded kNN monitor (gpu_checks.py --nccl),
#   3. bench_step and bench_augment on the GPU,
#   4. a full CIFAR-10 run of the `cifar` recipe (50,000 training JPEGs, kNN on the 10,000 test
#      images) for as many epochs as fit in TRAIN_SECONDS (default 200 s, so the whole script fits 10 min).
#   5. with --ablation: the momentum study at full CIFAR-10 size, m 0.99 against m 0 (the cheapest telling
#      one; benchmarks/ablations.py), 2 seeds each, for as many epochs as fit in ABLATION_SECONDS (default
#      130 s; TRAIN_SECONDS then defaults to 70 s, so the script still fits 10 min).
# Nothing is installed: a stock image's torch, torchvision and timm bring every dependency (pillow,
# numpy, safetensors, huggingface_hub, tqdm); mocohub runs from this checkout (PYTHONPATH), no pip.
# Results go to $OUT (or ./gpu-check-out). CIFAR-10 is read from $CIFAR_TAR, else
# ../shared/data/cifar10-jpg.tar.gz, else .cifar/cifar10-jpg.tar.gz (copy it there and carry `.cifar`).
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --ablation # the same, plus the momentum ablation
#   bash benchmarks/gpu_check.sh --dry-run [--ablation]  # here, on the CPU: every stage, tiny, to know it starts
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
DRY=0; ABLATION=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    --ablation) ABLATION=1 ;;
    *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run] [--ablation]" >&2; exit 2 ;;
  esac
done
if [ $ABLATION = 1 ]; then TRAIN_SECONDS=${TRAIN_SECONDS:-70}; else TRAIN_SECONDS=${TRAIN_SECONDS:-200}; fi
ABLATION_SECONDS=${ABLATION_SECONDS:-130}
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }
status=0

log "machine"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi";
  $PY -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'timm', timm.__version__, 'cuda', torch.cuda.is_available(), torch.backends.cpu.get_cpu_capability())"; } \
  | tee -a "$OUT/summary.txt"

if [ $DRY = 1 ]; then DEVICE=cpu; else DEVICE=cuda; fi

log "CUDA checks"
$PY -c "import torch, torchvision, timm, PIL, numpy, safetensors, huggingface_hub, tqdm" 2>&1 | tee -a "$OUT/summary.txt"
if [ $DRY = 1 ]; then
  $PY -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_checks; print(len(gpu_checks.CHECKS), 'checks import')" \
    2>&1 | tee -a "$OUT/summary.txt" || status=1
else
  $PY benchmarks/gpu_checks.py 2>&1 | tee "$OUT/checks.log" | grep -E "^(ok|FAIL|timing)" | tee -a "$OUT/summary.txt"
  [ "${PIPESTATUS[0]}" = 0 ] || { status=1; tail -30 "$OUT/checks.log"; }
fi

log "NCCL process group (torchrun, 1 process; gloo in a dry run)"
$PY -m torch.distributed.run --nproc_per_node 1 benchmarks/gpu_checks.py --nccl > "$OUT/nccl.log" 2>&1 \
  || { status=1; tail -20 "$OUT/nccl.log"; }
grep -E "^(ok|FAIL)" "$OUT/nccl.log" | tee -a "$OUT/summary.txt"

log "bench_step"
if [ $DRY = 1 ]; then
  $PY benchmarks/bench_step.py --device cpu --batch 16 --size 16 --repeats 1 2>&1 | tail -8 | tee -a "$OUT/summary.txt"
else
  $PY benchmarks/bench_step.py --device cuda --batch 512 --repeats 20 2>&1 | tail -9 | tee -a "$OUT/summary.txt"
  $PY benchmarks/bench_step.py --device cuda --arch resnet50 --size 224 --batch 128 --repeats 10 2>&1 | tail -9 \
    | tee -a "$OUT/summary.txt"
fi

log "bench_augment"
if [ $DRY = 1 ]; then
  $PY benchmarks/bench_augment.py --help >/dev/null && echo "bench_augment starts" | tee -a "$OUT/summary.txt"
else
  $PY benchmarks/bench_augment.py --device cuda 2>&1 | tail -12 | tee -a "$OUT/summary.txt"
fi

log "CIFAR-10"
data=$(mktemp -d)
tar_file=${CIFAR_TAR:-}
for candidate in ../shared/data/cifar10-jpg.tar.gz .cifar/cifar10-jpg.tar.gz; do
  [ -z "$tar_file" ] && [ -f "$candidate" ] && tar_file=$candidate
done
if [ -z "$tar_file" ]; then
  echo "no CIFAR-10 archive found (set CIFAR_TAR)" | tee -a "$OUT/summary.txt"; exit 1
fi
tar -xzf "$tar_file" -C "$data"
root=$(dirname "$(find "$data" -maxdepth 3 -type d -name train | head -1)")
if [ $DRY = 1 ]; then  # 20 images per class, 2 epochs
  for split in train test; do
    for d in "$root/$split"/*/; do ls "$d" | tail -n +21 | sed "s|^|$d|" | xargs rm -f; done
  done
fi
common=(--recipe cifar --workers "$(( $(nproc) > 12 ? 12 : $(nproc) ))" --device "$DEVICE" --no-progress
        --val "$root/test")
[ $DRY = 1 ] && common+=(--batch-size 64 --moco-k 256)
# One epoch to time it (its "seconds" in metrics.jsonl), then as many epochs as fit in the budget,
# the cosine schedule spanning exactly those epochs.
$PY -m mocohub train "$root/train" "${common[@]}" --epochs 1 --knn-every 1000 --out "$data/probe" \
  > "$OUT/probe.log" 2>&1 || { tail -20 "$OUT/probe.log"; exit 1; }
per_epoch=$($PY -c "import json; print(json.loads(open('$data/probe/metrics.jsonl').readline())['seconds'])")
epochs=$($PY -c "print(max(1, int($TRAIN_SECONDS / (1.2 * $per_epoch))))")
[ $DRY = 1 ] && epochs=2
log "$per_epoch s per epoch in the probe: training $epochs epochs"
start=$(date +%s)
$PY -m mocohub train "$root/train" "${common[@]}" --epochs "$epochs" --knn-every "$(( epochs > 4 ? epochs / 4 : 1 ))" \
  --out "$data/run" 2>&1 | tee "$OUT/train.log" | grep -E "^(epoch|precision|MoCo)" || status=1
end=$(date +%s)
cp "$data/run/metrics.jsonl" "$OUT/" 2>/dev/null
cp "$data/run/curves.png" "$OUT/" 2>/dev/null
$PY - "$data/run" "$epochs" "$(( end - start ))" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
run, epochs, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = [json.loads(l) for l in open(run + "/metrics.jsonl")]
knn = [r["knn_top1"] for r in rows if "knn_top1" in r]
print(f"CIFAR-10 cifar recipe: {len(rows)}/{epochs} epochs in {seconds} s "
      f"({sum(r['seconds'] for r in rows) / max(len(rows), 1):.1f} s per epoch of training), "
      f"kNN top-1 {knn[-1] if knn else float('nan'):.1f} % (official demo: 82.6 % after 200 epochs)")
EOF

if [ $ABLATION = 1 ]; then
  # 4 runs (2 settings x 2 seeds), each with a kNN pass per epoch: budget 1.3 probe epochs per epoch
  ab_epochs=$($PY -c "print(max(1, int($ABLATION_SECONDS / (4 * 1.3 * $per_epoch))))")
  ab_size=full; [ $DRY = 1 ] && { ab_size=smoke; ab_epochs=2; }
  log "momentum ablation (size $ab_size, m0 and m0.99, 2 seeds): $ab_epochs epochs a run"
  $PY benchmarks/ablations.py momentum --size "$ab_size" --settings m0,m0.99 --epochs "$ab_epochs" --data "$root" \
    --out "$data/ablations" > "$OUT/ablation.log" 2>&1 || { tail -5 "$OUT/ablation.log"; status=1; }
  grep "^|" "$OUT/ablation.log" | tee -a "$OUT/summary.txt"
  cp "$data/ablations/momentum/"{momentum.md,momentum.png,results.jsonl} "$OUT/" 2>/dev/null
fi
rm -rf "$data"
log "done (status $status)"
exit $status
