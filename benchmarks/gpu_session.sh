#!/usr/bin/env bash
# Everything a session with a lent GPU should run, in one call (the GPU machine has torch, triton and nvcc but
# no internet): build the extension with its CUDA kernels, run the GPU tests, run every benchmark. Results go
# to $OUT (default benchmarks/results/gpu-<date>): pytest's report and the JSON files of the benchmarks. Each
# step runs even if an earlier one failed; the exit status says whether any failed.
#
#     OUT=/some/dir bash benchmarks/gpu_session.sh          # then commit the JSON files and run
#     python benchmarks/readme_table.py <inner_loop json>    # to regenerate the README table
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu-$(date +%F)}"
mkdir -p "$OUT"
failed=0
step() {  # step NAME COMMAND...: run it, log to $OUT/NAME.log, remember a failure
  local name=$1; shift
  echo "=== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  [ "$rc" -eq 0 ] || { echo "=== $name FAILED (exit $rc)"; failed=1; }
}
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
step build pip install --no-build-isolation --no-deps -e .
step extension python -c "import ltm, ltm_kernels; print(ltm.backend_status()); print('posterior_step cuda:', ltm_kernels.has_op('posterior_step', 'cuda'))"
step pytest-gpu python -m pytest -m gpu -ra
step bench-attention python benchmarks/bench_attention.py --out "$OUT/attention.json"
step bench-lm-head python benchmarks/bench_lm_head.py --out "$OUT/lm_head.json"
step inner-loop python benchmarks/inner_loop.py --out "$OUT/inner_loop.json"
exit "$failed"
