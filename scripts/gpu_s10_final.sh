#!/bin/bash
# Session 10's last GPU call: the --max-vram GPU tests, then the benchmark on the 6.65 GB model.
# Run from the project root on the device: bash scripts/gpu_s10_final.sh $OUT (with .gpu-site carried).
L=${1:-$OUT}; mkdir -p "$L"
export PYTHONPATH=$PWD:$PWD/.gpu-site PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
python3 -c "import torch; print('clearCublasWorkspaces', hasattr(torch._C, '_cuda_clearCublasWorkspaces'))"
el "GPU tests"
timeout 60 python3 -m pytest tests/test_gpu.py -m gpu -q -p no:cacheprovider --no-header -rfEs -k "third or workspaces or staged" > "$L/gpu_tests.log" 2>&1
echo "pytest rc=$?"; tail -8 "$L/gpu_tests.log"
el "bench"
timeout ${BENCH_S:-185} python3 scripts/bench_gpu.py --synth-layers 8 --synth-hidden 2048 --synth-intermediate 8192 --dtype bf16 \
  --n-samples 64 --seq-len 512 --batch-size 2 --max-vram 2GiB --run-timeout 75 \
  --runs profile,read,overlap,write,imported,accelerate,budget,serial --json "$L/bench_gpu.json" > "$L/bench_gpu.log" 2>&1
echo "bench rc=$?"; grep -v "^  " "$L/bench_gpu.log" | tail -30
el end
