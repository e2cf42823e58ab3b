#!/bin/bash
# Session 10's first GPU call (issue 15): the benchmark first, then the gpu-marked tests, then EEP on the GPU.
# Run from the project root on the device: bash scripts/gpu_s10_measure.sh $OUT (with .gpu-site carried; see ../shared/gpu/README.md).
L=${1:-${OUT:-./gpu-logs}}; mkdir -p "$L"
export PYTHONPATH=$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
BENCH_S=${BENCH_S:-280}; TESTS_S=${TESTS_S:-150}; EEP_S=${EEP_S:-90}
SYN=${SYN:---synth-layers 8 --synth-hidden 2048 --synth-intermediate 8192}
TOK=${TOK:---n-samples 64 --seq-len 512 --batch-size 2}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g | head -2; df -h /tmp | tail -1
  python3 -c "import torch,transformers,accelerate,safetensors;print('torch',torch.__version__,'transformers',transformers.__version__,'accelerate',accelerate.__version__,'cuda',torch.cuda.is_available())"
  python3 -c "import bitsandbytes;print('bitsandbytes',bitsandbytes.__version__)" 2>&1 | tail -1; } > "$L/info.log" 2>&1
cat "$L/info.log"
el "bench_gpu"
timeout $BENCH_S python3 scripts/bench_gpu.py $SYN --dtype bf16 $TOK --max-vram 2GiB --run-timeout ${RUN_S:-45} \
  --runs ${RUNS:-profile,read,write,overlap,serial,resident,warm,score,accelerate,budget} --json "$L/bench_gpu.json" > "$L/bench_gpu.log" 2>&1
echo "bench rc=$?"; tail -40 "$L/bench_gpu.log"
el "GPU tests"
timeout $TESTS_S python3 -m pytest -m gpu tests -q -p no:cacheprovider --no-header -rfEs --durations=5 > "$L/gpu_tests.log" 2>&1
echo "pytest rc=$?"; tail -25 "$L/gpu_tests.log"
el "EEP population on the GPU"
timeout $EEP_S python3 scripts/bench_eep.py --model /tmp/lowmoe-bench/mix-eep --device cuda --population 8 --generations 1 \
  --baseline-evals 3 --dtype bfloat16 --json "$L/bench_eep.json" > "$L/bench_eep.log" 2>&1
echo "eep rc=$?"; tail -25 "$L/bench_eep.log"
el end
