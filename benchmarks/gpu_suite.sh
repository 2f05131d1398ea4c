#!/usr/bin/env bash
# Everything the GPU measures for the README in one call: about 6-7 minutes on an H100, compile warm-ups included.
# Run from the repo root, offline, with torch, triton and diffusers importable:
#
#   S=$(mktemp -d); python3 -m pip install -q --no-index --no-deps --target $S .whl/*.whl
#   export PYTHONPATH=$S:$PWD
#   benchmarks/gpu_suite.sh --out DIR          # or: OUT=DIR benchmarks/gpu_suite.sh
#
# Phases (each in its own process under a hard time limit, so an OOM, a compile error or a hang in one is reported
# and the next still runs; every phase writes its JSON row by row, so a phase stopped early keeps what it measured):
#   tests (limit 100 s): the GPU-only correctness tests, compiled kernels (tests/kernels/test_*_cuda.py, TRITON_INTERPRET=0).
#   kernel (limit 150 s): the NAG combine, preset gpu-suite: every model shape in bf16/L1 plus fp16/fp32 and L2 at
#      the Flux shapes; 6 providers each (one torch.compile warm-up per case); the kernel targets, PASS/FAIL.
#   flux (limit 205 s): FLUX.1-size transformer (about 12B random bf16 parameters, built on the GPU) at 1024^2 and
#      2048^2, eager: no NAG, true CFG, NAG exact (torch combine), NAG exact (Triton kernel), NAG fast; then 1024^2
#      torch.compile'd (regional compilation of the repeated blocks); the fast-mode step-time target (fast <= 1.2x
#      no NAG at 1024^2). 2048^2 is not compiled here: each compile costs tens of seconds.
#   profile (limit 90 s, python -m benchmarks profile): the top GPU kernels of one FLUX.1 step per variant.
#   Optional, not in the default set:
#   overhead (limit 60 s, python -m benchmarks overhead): device time in a CUDA graph vs host time per call.
#   sweep (limit 60 s, python -m benchmarks sweep): every launch setting of the combine kernel at model shapes,
#      heuristic vs best.
#   The flops suite is machine-independent (meta device) and is not rerun here.
# GPU_SUITE_PHASES=tests,kernel,flux,profile (the default) picks phases; GPU_SUITE_FLUX_ARGS replaces the flux
# phase's arguments (e.g. "--resolutions 1024,2048 --compile-resolutions none --variants no_nag,nag_fast").
# Output: DIR/<suite>-*.{json,md,png} per phase run (profile, sweep: no PNG), DIR/gpu_suite.log; tables printed last.
# GPU_SUITE_SMOKE=1 runs the same phases on tiny shapes on whatever device is here (a check of this script on a CPU;
# its figures mean nothing; overhead and sweep say that they need CUDA).
set -u

OUT_DIR="${OUT:-}"
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT_DIR="$2"; shift 2 ;;
    --out=*) OUT_DIR="${1#--out=}"; shift ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (use --out DIR)"; exit 2 ;;
  esac
done
[ -n "$OUT_DIR" ] || OUT_DIR="benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"

PY="${PYTHON:-python3}"
case ":${PYTHONPATH:-}:" in *":$PWD:"*) ;; *) export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" ;; esac
export PYTHONUNBUFFERED=1
# The copied tree may have no .git: record the commit the lead passes (NAG_BENCH_COMMIT) if git cannot say.
LOG="$OUT_DIR/gpu_suite.log"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!
finish() {  # let tee write its last lines before the script returns
  exec 1>&- 2>&-
  wait "$TEE_PID" 2>/dev/null || true
}
trap finish EXIT

T0=$SECONDS
echo "== gpu_suite.sh: $(date -u +%FT%TZ), out $OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>/dev/null || true
SMOKE="${GPU_SUITE_SMOKE:-0}"
KERNEL_SMOKE=(); FLUX_SMOKE=(); PROFILE_SMOKE=()
if [ "$SMOKE" = 1 ]; then
  echo "== GPU_SUITE_SMOKE=1: tiny shapes, figures meaningless"
  KERNEL_SMOKE=(--shapes tiny-odd --quick); FLUX_SMOKE=(--quick --resolutions 32,64 --compile-resolutions none --reps 1)
  PROFILE_SMOKE=(--quick --resolutions 32 --variants no_nag,nag_fast --top 5)
fi
GPU_SUITE_SMOKE="$SMOKE" "$PY" - <<'PY' || { echo "== preflight failed: torch/triton/CUDA not usable; nothing measured"; exit 1; }
import importlib, torch
print("python", __import__("sys").version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
import os
if os.environ.get("GPU_SUITE_SMOKE") != "1":
    assert torch.cuda.is_available(), "no CUDA device"
    print("device", torch.cuda.get_device_name(), "| GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for m in ("triton", "diffusers", "nag_kernels"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"), "from", getattr(mod, "__file__", "?"))
    except Exception as e:
        print(m, "NOT importable:", type(e).__name__, e)
try:
    from benchmarks.harness import import_integrations
    import_integrations()
    print("nag_kernels.integrations: importable")
except Exception as e:
    print("nag_kernels.integrations NOT importable (the flux NAG variants will be skipped):", type(e).__name__, e)
PY

phase() {  # phase NAME LIMIT_S ARGS...
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  echo
  echo "== phase $name (limit ${limit}s, suite elapsed $((SECONDS - T0))s): python -m benchmarks $*"
  timeout --signal=TERM --kill-after=15 "$limit" "$PY" -m benchmarks "$@" --out "$OUT_DIR"
  local rc=$?
  case $rc in
    0) echo "== phase $name done in $((SECONDS - start))s" ;;
    3) echo "== phase $name NOT RUN: it needs a CUDA GPU (see the line above)" ;;
    124|137) echo "== phase $name STOPPED at its ${limit}s limit after $((SECONDS - start))s: its JSON holds the rows it finished" ;;
    *) echo "== phase $name FAILED (exit $rc) after $((SECONDS - start))s: see the traceback above" ;;
  esac
}

PHASES=",${GPU_SUITE_PHASES:-tests,kernel,flux,profile},"
wants() { case "$PHASES" in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

if wants tests; then
  echo
  echo "== phase tests (limit 100s, suite elapsed $((SECONDS - T0))s): GPU-only correctness tests"
  TRITON_INTERPRET=0 timeout --signal=TERM --kill-after=15 100 "$PY" -m pytest -q -p no:cacheprovider \
    tests/kernels/test_nag_cuda.py tests/kernels/test_merge_cuda.py tests/kernels/test_partial_norm_cuda.py \
    tests/kernels/test_gradients_and_scale_cuda.py 2>&1 | tail -n 40
  echo "== phase tests: exit ${PIPESTATUS[0]}"
fi
wants kernel && phase kernel 150 kernel --preset gpu-suite --budget-s 120 "${KERNEL_SMOKE[@]}"
if wants flux; then
  if [ -n "${GPU_SUITE_FLUX_ARGS:-}" ]; then
    read -r -a FLUX_ARGS <<< "$GPU_SUITE_FLUX_ARGS"
  else
    FLUX_ARGS=(--resolutions 1024,2048 --compile-resolutions 1024)
  fi
  phase flux 205 flux "${FLUX_ARGS[@]}" --budget-s 160 "${FLUX_SMOKE[@]}"
fi
wants profile && phase profile 90 profile "${PROFILE_SMOKE[@]}"
wants overhead && phase overhead 60 overhead
wants sweep && phase sweep 60 sweep
echo
echo "== all phases done in $((SECONDS - T0))s; tables follow (also in $OUT_DIR/*.md)"
shopt -s nullglob
files=()
for suite in kernel flux profile overhead sweep; do files+=("$OUT_DIR"/"$suite"-*.json); done
if [ ${#files[@]} -gt 0 ]; then
  # the tables, then every target's PASS/FAIL line last (recomputed from the rows: a phase stopped at its limit
  # never wrote its own)
  "$PY" -m benchmarks.report "${files[@]}" || echo "== report failed"
else
  echo "== no result files were written"
fi
echo "== gpu_suite.sh finished in $((SECONDS - T0))s"
