#!/usr/bin/env bash
# One prepared GPU check (fits a 15-minute device lease): CUDA training in every precision,
# then the step benchmark on the GPU. Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q torch==2.14.1 torchvision==0.29.1 && pip install -q -e ".[test]"
python -m pytest -q tests/test_moco.py tests/test_distributed.py
data=$(mktemp -d)
python -c "from mocohub.data.synthetic import make_dataset; make_dataset('$data', train_per_class=100, val_per_class=20)"
for precision in fp32 bf16 fp16; do
  mocohub train "$data/train" --recipe cifar --batch-size 256 --moco-k 1024 --epochs 2 --precision "$precision" \
      --channels-last --workers 4 --val "$data/val" --no-progress --out "$data/run-$precision"
done
python benchmarks/bench_step.py --device cuda --batch 256 --repeats 20
python benchmarks/bench_step.py --device cuda --arch resnet50 --size 224 --batch 64 --repeats 10
