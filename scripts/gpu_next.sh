#!/bin/bash
# Prepared for the next session with a GPU: issue 15's open items, in order of value, in one device call
# of at most 580 s (the per-call limit is 600 s; a session has 900 s of device time, machine start included):
#   1. the GPU tests of the budget's books (session 11's pinned-memory test has never run on a card) and
#      of session 12's grouped experts (--experts-impl auto: transformers' grouped GEMM on CUDA) and
#      device warm-up (the CUDA context and first pinned buffer made while the pass imports), and
#      session 13's: the scorers observe a layer's calls with no host wait (set_sync_debug_mode
#      "error"), a layer's chunks queued with one wait per layer, not per chunk, and session 18's: the EEP
#      population pass with a candidate's experts built a group at a time (shards and NF4 cache, page-
#      locked staging, waves of chunks) equal to the unbudgeted pass on the card                       <= 120 s
#   2. the benchmark runs session 10 could not finish: imported, accelerate (the >= 3x target), budget
#      (a 6.65 GB model under --max-vram 2GiB), serial (--no-prefetch); their reports now carry torch's
#      pinned-memory figures (budget.pinned: seconds page-locking) and the staging_alloc stage; and
#      imported-eager, the imported run with transformers' per-expert loop (session 12: what the
#      grouped GEMM saves on the card)                                                              <= 240 s
#   3. scripts/bench_experts_impl.py on the card (session 12): operators, host waits and the compute
#      stage per chunk and layer, eager against grouped experts, whole and in groups, and one experts
#      call's device memory against the plan, on a 0.73 GB bf16 model                                 <= 70 s
#   4. a torch.profiler pass over a short prune: where the 21 ms per chunk and layer of "compute" go <= 80 s
#   5. the same over a generation of EEP's population pass: CPU-bound, or spinning in syncs? Then one
#      more generation unprofiled, with the evaluator's per-stage table (session 14)                 <= 70 s
# (scripts/gpu_profile.py pinned, which times page-locked allocations alone, is left out: the reports now
# carry those seconds.) Run from the project root on the device, with .gpu-site carried:
#   bash scripts/gpu_next.sh $OUT
L=${1:-${OUT:-./gpu-logs}}; mkdir -p "$L"
export PYTHONPATH=$PWD:$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s); el() { echo "[+$(( $(date +%s) - T0 ))s] $*"; }
el "tests"
timeout ${TESTS_S:-120} python3 -m pytest -q tests/test_gpu.py -k "pinned or cublas or third or staged or grouped or warm or waiting or group_at" > "$L/tests.log" 2>&1
echo "rc=$?"; tail -5 "$L/tests.log"
el "bench"
timeout ${BENCH_S:-240} python3 scripts/bench_gpu.py --synth-layers 8 --synth-hidden 2048 --synth-intermediate 8192 --dtype bf16 \
  --n-samples 64 --seq-len 512 --batch-size 2 --max-vram 2GiB --run-timeout 80 \
  --runs read,imported,imported-eager,write,accelerate,budget,serial --json "$L/bench_gpu.json" > "$L/bench_gpu.log" 2>&1
echo "rc=$?"; grep -v "^  " "$L/bench_gpu.log" | tail -25
el "experts impl"
timeout ${EXPERTS_S:-70} python3 scripts/bench_experts_impl.py --device cuda --dtype bf16 --n-samples 16 --seq-len 512 \
  --batch-size 2 --max-vram 380MB --repeat 1 --json "$L/experts-impl.json" > "$L/experts-impl.log" 2>&1
echo "rc=$?"; tail -14 "$L/experts-impl.log"
el "profile"
timeout ${PROFILE_S:-80} python3 scripts/gpu_profile.py prune /tmp/lowmoe-bench/mix2g --n-samples 8 --json "$L/profile.json" > "$L/profile.log" 2>&1
echo "rc=$?"; grep -A14 "runtime calls\|by self device" "$L/profile.log" | head -40
el "eep profile"
timeout ${EEP_S:-70} python3 scripts/gpu_profile.py eep /tmp/lowmoe-bench/mix2g --population 8 --json "$L/eep-profile.json" > "$L/eep-profile.log" 2>&1
echo "rc=$?"; grep -A14 "per evaluation\|runtime calls\|by self device" "$L/eep-profile.log" | head -40; grep -A16 "without the profiler" "$L/eep-profile.log"
el end
