#!/bin/bash
# Prepared for the next session with a GPU (issue 15's open items, in order of value; ~6 minutes):
#   0. the GPU tests of the budget's device and pinned-host books (session 11: pinned blocks, never run on a card)
#   1. CUDA context and pinned-allocation times (is the first layer's non-disk wait this?)
#   2. the benchmark runs session 10 could not finish: accelerate (the >= 3x target), imported, budget, serial
#   3. a torch.profiler pass over a short prune: where the 21 ms per chunk and layer of "compute" go
#   4. the same over EEP's population pass: is it CPU-bound (0.72 CPU s per evaluation), or spinning in syncs?
# Run from the project root on the device: bash scripts/gpu_next.sh $OUT (with .gpu-site carried).
L=${1:-${OUT:-./gpu-logs}}; mkdir -p "$L"
export PYTHONPATH=$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
el "tests"
timeout ${TESTS_S:-120} python3 -m pytest -q tests/test_gpu.py -k "pinned or cublas or third" > "$L/tests.log" 2>&1; echo "rc=$?"; tail -5 "$L/tests.log"
el "pinned"
timeout 60 python3 scripts/gpu_profile.py pinned --json "$L/pinned.json" > "$L/pinned.log" 2>&1; echo "rc=$?"; cat "$L/pinned.log"
el "bench"
timeout ${BENCH_S:-300} python3 scripts/bench_gpu.py --synth-layers 8 --synth-hidden 2048 --synth-intermediate 8192 --dtype bf16 \
  --n-samples 64 --seq-len 512 --batch-size 2 --max-vram 2GiB --run-timeout 110 \
  --runs read,imported,write,accelerate,budget,serial --json "$L/bench_gpu.json" > "$L/bench_gpu.log" 2>&1
echo "rc=$?"; grep -v "^  " "$L/bench_gpu.log" | tail -25
el "profile"
timeout ${PROFILE_S:-150} python3 scripts/gpu_profile.py prune /tmp/lowmoe-bench/mix2g --n-samples 8 --json "$L/profile.json" > "$L/profile.log" 2>&1
echo "rc=$?"; grep -A14 "runtime calls\|by self device" "$L/profile.log" | head -40
el "eep profile"
timeout ${EEP_S:-150} python3 scripts/gpu_profile.py eep /tmp/lowmoe-bench/mix2g --population 8 --json "$L/eep-profile.json" > "$L/eep-profile.log" 2>&1
echo "rc=$?"; grep -A14 "per evaluation\|runtime calls\|by self device" "$L/eep-profile.log" | head -40
el end
