#!/usr/bin/env bash
# The one command a session with a lent GPU runs (an H100/H200 with torch, triton and nvcc but no network; at
# most 10 minutes per command, 8 files back from $OUT). Finishes in at most 9 minutes, install included.
#
#     OUT=/some/empty/dir bash benchmarks/gpu_session.sh       # on the GPU machine
#     bash benchmarks/gpu_session.sh --dry-run                 # on any CPU machine: same steps, tiny sizes (< 3 min)
#
# Steps, in priority order, each under `timeout` with its budget printed (a step that fails or times out does
# not stop the next; a step is skipped when the 9-minute deadline leaves it under 10 s):
#   build        pip install --no-build-isolation --no-deps -e .  (the CUDA kernels, for the visible GPU; the
#                dry run adds pip's --dry-run: no compile)
#   extension    the extension loads and has its CUDA kernel
#   pytest-gpu   pytest -m gpu (the dry run only collects them)
#   inner-loop   the headline benchmark: ltm-l, batch 64 x 1024 tokens, bf16, T_fast 16 (the preset's 64 would
#                not fit; per-step times are what T scales), variants reference, eager, fused, fused+graph,
#                3 repeats. Not run here: compiled (torch.compile's compile time) and compiled-max (autotuning),
#                which alone take minutes.
#   attention    bench_attention.py at its CUDA defaults, without flex-window (torch.compile time)
#   lm-head      bench_lm_head.py at its CUDA defaults, 10 repeats
# What comes back (5 files, directly under $OUT): gpu_session.tar.gz (every log and JSON), SUMMARY.md (the
# steps, the GPU tests' result and the short result tables; also printed last), and the three benchmark JSON
# files, to commit under benchmarks/results/ (then `python benchmarks/readme_table.py <inner_loop json>`).
# The bundle and summary are refreshed after every step, so a run killed from outside still leaves them.
# The exit status is 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
  *) echo "gpu_session.sh: unknown argument '$1' (allowed: --dry-run, --help)" >&2; exit 2 ;;
esac

PYTHON="${PYTHON:-python3}"  # the GPU image's python3 is the one that holds torch
TOTAL_BUDGET="${GPU_SESSION_BUDGET_S:-540}"
if [ "$DRY_RUN" -eq 1 ]; then
  OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu_session_dry_run.XXXXXX")}"
else
  OUT="${OUT:-benchmarks/results/gpu-$(date -u +%Y-%m-%dT%H%M%S)}"
fi
mkdir -p "$OUT"
if [ -n "$(ls -A "$OUT")" ]; then  # a run directory belongs to one run
  echo "gpu_session.sh: OUT=$OUT is not empty; give an empty or new folder" >&2; exit 2
fi
OUT="$(cd "$OUT" && pwd)"
RAW="$OUT/raw"          # logs and JSON while running; bundled into gpu_session.tar.gz, then removed
mkdir "$RAW"
START=$(date +%s)
failed=0
echo "=== gpu_session.sh: $([ "$DRY_RUN" -eq 1 ] && echo "DRY RUN (CPU, tiny sizes)" || echo GPU) -> $OUT; deadline ${TOTAL_BUDGET}s"

bundle() {  # refresh gpu_session.tar.gz and SUMMARY.md from $RAW
  tar -czf "$OUT/gpu_session.tar.gz.tmp" -C "$OUT" raw && mv "$OUT/gpu_session.tar.gz.tmp" "$OUT/gpu_session.tar.gz"
  "$PYTHON" benchmarks/gpu_session_summary.py "$RAW" --dry-run "$DRY_RUN" > "$OUT/SUMMARY.md.tmp" 2> "$RAW/summary.err" \
    && mv "$OUT/SUMMARY.md.tmp" "$OUT/SUMMARY.md" \
    || { echo "(summary failed: see raw/summary.err in the bundle)" > "$OUT/SUMMARY.md"; rm -f "$OUT/SUMMARY.md.tmp"; }
}

step() {  # step NAME BUDGET_S COMMAND...: run under timeout, log to $RAW/NAME.log, record in $RAW/steps.tsv
  local name=$1 budget=$2; shift 2
  local left=$(( TOTAL_BUDGET - 15 - ($(date +%s) - START) ))  # 15 s kept for the final bundling
  [ "$budget" -le "$left" ] || budget=$left
  if [ "$budget" -lt 10 ]; then
    echo "=== $name: SKIPPED (${left}s left before the deadline)"
    printf '%s\t%s\t%s\t%s\n' "$name" 0 0 skipped >> "$RAW/steps.tsv"; failed=1; return
  fi
  echo "=== $name (budget ${budget}s): $*"
  local t0=$(date +%s)
  PYTHONUNBUFFERED=1 timeout --kill-after=10 "$budget" "$@" > "$RAW/$name.log" 2>&1
  local rc=$? took=$(( $(date +%s) - t0 ))
  tail -n 15 "$RAW/$name.log"
  local result=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then result=timeout; elif [ "$rc" -ne 0 ]; then result="failed (exit $rc)"; fi
  [ "$result" = ok ] || failed=1
  echo "=== $name: $result in ${took}s"
  printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$took" "$result" >> "$RAW/steps.tsv"
  bundle
}

{ git rev-parse HEAD 2>/dev/null || echo unknown; } > "$RAW/commit.txt"
if [ "$DRY_RUN" -eq 1 ]; then
  echo "dry run: no GPU used" > "$RAW/nvidia-smi.txt"
  DEV=(--device cpu)
  INNER=(--preset ltm-tiny --batch 2 --seq 32 --steps 2 --dtype fp32 --variants eager,fused --repeats 1 --check-steps 1)
  ATTN=(--batch 1 --heads 2 --seq 64 --window 16 --head-dim 16 --latents 2 --repeats 1 --warmup 0
        --self-variants sdpa-dense-mask,cpp --cross-variants sdpa,cpp)
  LMHEAD=(--tokens 64 --batch 2 --d 32 --vocab 128 --repeats 1 --warmup 0)
  PYTEST=(-m gpu --collect-only -q)
  BUILD=(--dry-run)  # resolves and prepares the package, compiles nothing (CI built it; a rebuild takes minutes)
else
  { nvidia-smi -L; nvidia-smi; } > "$RAW/nvidia-smi.txt" 2>&1 || true
  DEV=(--device cuda)
  INNER=(--preset ltm-l --batch 64 --seq 1024 --dtype bf16 --steps 16 --variants reference,eager,fused,fused+graph
         --repeats 3 --check-steps 2)
  ATTN=(--repeats 10 --self-variants sdpa-dense-mask,sdpa-causal,triton --cross-variants sdpa,triton)
  LMHEAD=(--repeats 10)
  PYTEST=(-m gpu -v -ra -p no:cacheprovider)  # -v: a timed-out run still shows which tests ran
  BUILD=()
fi

step build 150 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . "${BUILD[@]}"
step extension 30 "$PYTHON" -c "import ltm, ltm_kernels, torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())
print(ltm.backend_status())
print('posterior_step cuda kernel:', ltm_kernels.has_op('posterior_step', 'cuda'))
assert ltm_kernels.extension_status()[0], ltm_kernels.extension_status()
assert ltm_kernels.has_op('posterior_step', 'cuda') or not torch.cuda.is_available(), 'no CUDA kernel built'"
step pytest-gpu 110 "$PYTHON" -m pytest "${PYTEST[@]}"
step inner-loop 160 "$PYTHON" benchmarks/inner_loop.py "${DEV[@]}" "${INNER[@]}" --out "$RAW/inner_loop.json"
step attention 60 "$PYTHON" benchmarks/bench_attention.py "${DEV[@]}" "${ATTN[@]}" --out "$RAW/attention.json"
step lm-head 40 "$PYTHON" benchmarks/bench_lm_head.py "${DEV[@]}" "${LMHEAD[@]}" --out "$RAW/lm_head.json"

for f in inner_loop attention lm_head; do [ -f "$RAW/$f.json" ] && cp "$RAW/$f.json" "$OUT/$f.json"; done
bundle
rm -rf "$RAW"
echo "=== files under $OUT:"; ls -l "$OUT"
echo "=== SUMMARY.md ($(( $(date +%s) - START ))s in all)"
cat "$OUT/SUMMARY.md"
exit "$failed"
