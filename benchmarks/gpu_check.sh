#!/usr/bin/env bash
# GPU check for clip_fast: ONE command, at most 6 minutes (360 s) on one H100/H200, so that
# a second run fits in the same 15-minute lease after a 1-2 minute machine start.
#
#   bash benchmarks/fetch_wheels.sh          # once, on a machine with internet: baselines -> .whl/
#   bash benchmarks/gpu_check.sh             # on the GPU machine (device tool: carry [".whl"])
#
# .whl/ is gitignored, so the device tool sends it only when the call names it in `carry`.
#
# Steps (each one logs to $LOGDIR as it runs, so a run stopped at its limit still returns
# the logs of every step it reached):
# 0. versions:   python, torch, triton, CUDA (torch's, nvcc's), driver, GPU name;
# 1. wheels:     .whl/*.whl installed with --no-index --no-deps into a private directory on
#                PYTHONPATH; the baselines that stay missing are named;
# 2. build:      pip install -e . --no-build-isolation (the CUDA extension for sm_90; if the
#                build fails or overruns, reinstall without it so the rest still runs);
# 3. variants:   benchmarks/bench_variants.py -- every CLIP kernel variant (kernels/config.py
#                VARIANTS), every SigLIP variant (SIGLIP_VARIANTS) and a small tile sweep at
#                N = 65,536, D = 512, bf16, each checked against the torch backend and timed, then
#                the CLIP winner at the largest N that the step's time left and the GPU memory
#                allow (priced as N^2 from its own 65,536 time); variants.md/.csv (loss x variant
#                x N x time x GEMM-rate fraction) and winner_sm90.json (the file kernels/config.py
#                reads, the SigLIP winner under "siglip": copy it to kernels/winner_sm90.json);
# 4. matryoshka: benchmarks/bench_matryoshka.py --device cuda --backends torch,triton at N = 16,384 then
#                65,536, dims 64..768, bf16, each N's rows written as they finish (skipped when this
#                checkout's script lacks those options);
# 5. tests:      the GPU test subset (pytest -m gpu), stopped with SIGINT at its limit so
#                pytest still prints its summary (FAILED/ERROR lines);
# 6. bench:      benchmarks/bench_gpu.py -- the full table as CSV in $LOGDIR; sizes a backend
#                cannot finish in the time left are skipped with the estimate in the row.
#
# Budget (seconds, GPU_CHECK_TOTAL_S=360 by default).  Every command runs under
# `timeout -k KILL LIMIT` (KILL = 5 s, 10 s for pytest), so it ends by LIMIT + KILL:
#     versions 20 | wheels 20 + baseline imports 20 | build 100 + retry without the extension
#     30 + backend report 20 | variants 140 | matryoshka 25 | tests 50 | bench: what is left
#     - 15 | end 15
# Each limit is the step's cap, cut to what is left after a reserve for the steps behind it
# (the *_AFTER_S constants: each is the least the later steps need, their kill delays included,
# so that the bench always keeps 35 s, the tests 30 s and the Matryoshka step 15 s).  The bench's
# limit is computed from the clock after the tests: left - 15.  So a step that ends early gives
# its time to the later ones, one that overruns takes it from them, and the run ends by
#     START + TOTAL_S - 15 + 5 (the bench's kill delay) = 350 s,
# 360 s at most with the closing lines (tests/kernels/test_gpu_check_plan.py replays this
# arithmetic from the constants below).  The variants step plans its runs inside its own limit
# (bench_variants.py: each run priced before it starts, none started past the limit, 20 s of it
# kept for the largest-N run).  With a build of 80 s the steps get about: variants 140,
# Matryoshka 20, tests 30, bench 45.
# With a 1-2 minute machine start, a first run ends by minute 8 of the 15-minute lease,
# and a rerun on the still-warm machine by minute 14.
#
# Output: stdout stays short (versions, one line per step, the summary).  $LOGDIR is $OUT
# when set (the device tool returns it), else
# benchmarks/results/gpu_check_<stamp>/:
#     gpu_check.log  what stdout shows        build.log  wheels + pip install
#     tests.log      pytest -v -rfE           bench.log  every row as written, the summary
#     *.csv          the full benchmark table
#     variants.log, variants.md, variants.csv, winner_sm90.json   the variants step
#     matryoshka.log, matryoshka_gpu.csv                          the Matryoshka step
#
# Rehearsal on a CPU machine with the card's versions (no GPU: tiny sizes, Triton's
# interpreter, the build without the extension unless GPU_CHECK_DRY_BUILD_CUDA=1):
#   PYTHON=/path/to/venv/bin/python GPU_CHECK_DRY_RUN=1 bash benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
TOTAL_S="${GPU_CHECK_TOTAL_S:-360}"
VERSIONS_S=20; WHEELS_S=20; BUILD_S=100; BUILD_RETRY_S=30; VARIANTS_S=140; MATRYOSHKA_S=25
TEST_S="${GPU_CHECK_TEST_S:-50}"
LARGE_N_S=20                # of the variants step's limit, for the largest-N run
END_RESERVE_S=15            # the bench's kill delay and the closing lines
KILL_S=5
# Reserves: what the steps behind each one keep at least (module doc, "Budget").
TESTS_AFTER_S=60            # bench 35 + end 15 + pytest's kill delay 10
MATRYOSHKA_AFTER_S=95       # tests 30 + TESTS_AFTER_S + this step's kill delay 5
VARIANTS_AFTER_S=115        # Matryoshka 15 + MATRYOSHKA_AFTER_S + kill 5
BUILD_RETRY_AFTER_S=165     # its kill 5 + backend report 20 + kill 5 + variants 20 (its minimum) + VARIANTS_AFTER_S
BUILD_AFTER_S=200           # the retry 30 + BUILD_RETRY_AFTER_S (whose kill delay it includes)
WHEELS_AFTER_S=255          # its kill 5 + baseline imports 20 + kill 5 + build 25 (its least) + BUILD_AFTER_S
START=$(date +%s)
STAMP=$(date -u +%Y%m%d-%H%M%S)
if [ -n "${OUT:-}" ]; then LOGDIR="$OUT"; else LOGDIR="benchmarks/results/gpu_check_${STAMP}"; fi
mkdir -p "$LOGDIR"
MAIN_LOG="$LOGDIR/gpu_check.log"
: > "$MAIN_LOG"
elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( TOTAL_S - $(date +%s) + START )); }
# The step's limit: its cap, or what is left after reserving `after` seconds for the rest.
# (At least 1: `timeout 0` would mean no limit at all.)
limit() { local cap=$1 after=$2 l; l=$(( $(left) - after )); [ "$l" -lt "$cap" ] && cap=$l; [ "$cap" -lt 1 ] && cap=1; echo "$cap"; }
say() { echo "$@" | tee -a "$MAIN_LOG"; }
indent() { sed 's/^/   /' | tee -a "$MAIN_LOG"; }

export CLIP_FAST_CUDA_ARCHS="${CLIP_FAST_CUDA_ARCHS:-9.0}"   # H100/H200 only: one arch
export MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONUNBUFFERED=1
DRY=""
if [ "${GPU_CHECK_DRY_RUN:-0}" = 1 ]; then
  DRY="--dry-run"; export TRITON_INTERPRET=1
else
  unset TRITON_INTERPRET
fi

say "== 0/6 versions (budget ${TOTAL_S} s: versions ${VERSIONS_S} + wheels ${WHEELS_S} + build ${BUILD_S}+${BUILD_RETRY_S} + variants ${VARIANTS_S} + matryoshka ${MATRYOSHKA_S} + tests ${TEST_S} + bench rest + end ${END_RESERVE_S})"
timeout -k $KILL_S $VERSIONS_S "$PY" - <<'PYEOF' 2>&1 | indent
import platform, subprocess
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as exc:
    print("triton: not importable:", type(exc).__name__, exc)
def first_line(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.splitlines()[-1] if out else "none"
    except Exception as exc:
        return f"none ({type(exc).__name__})"
print("nvcc:", first_line(["bash", "-c", "nvcc --version | grep release"]))
print("driver, GPU:", first_line(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                  "--format=csv,noheader"]))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch sees: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees: NO CUDA DEVICE")
PYEOF

say "== 1/6 wheels ($(elapsed) s)"
BUILD_LOG="$LOGDIR/build.log"
: > "$BUILD_LOG"
WHL_SITE="${GPU_CHECK_WHL_SITE:-/tmp/clip_fast_gpu_check_site}"
if ls .whl/*.whl > /dev/null 2>&1; then
  echo "-- pip install --no-index --no-deps --target $WHL_SITE .whl/*.whl" >> "$BUILD_LOG"
  timeout -k $KILL_S "$(limit $WHEELS_S $WHEELS_AFTER_S)" "$PY" -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target "$WHL_SITE" .whl/*.whl >> "$BUILD_LOG" 2>&1 \
    && export PYTHONPATH="$WHL_SITE${PYTHONPATH:+:$PYTHONPATH}" \
    || say "   installing .whl/ failed (see build.log)"
  say "   $(ls .whl/*.whl | wc -l) wheel(s) from .whl/: $(ls .whl/*.whl | xargs -n1 basename | cut -d- -f1 | tr '\n' ' ')"
else
  say "   no .whl/ here: run benchmarks/fetch_wheels.sh where pip reaches PyPI, and carry .whl"
fi
timeout -k $KILL_S 20 "$PY" - <<'PYEOF' 2>&1 | indent
missing = []
for name, mod in (("open_clip", "open_clip.loss"), ("inf_cl", "inf_cl"),
                  ("siglip_kernel", "siglip_kernel")):
    try:
        __import__(mod)
    except Exception as exc:
        missing.append(f"{name} ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
print("baselines missing: " + ("; ".join(missing) if missing else "none"))
PYEOF

say "== 2/6 build ($(elapsed) s)"
BUILD_CUDA=1
if [ -n "$DRY" ] && [ "${GPU_CHECK_DRY_BUILD_CUDA:-0}" != 1 ]; then
  BUILD_CUDA=0; say "   dry run: installing without the CUDA extension (GPU_CHECK_DRY_BUILD_CUDA=1 builds it)"
fi
t=$(limit $BUILD_S $BUILD_AFTER_S)
echo "-- pip install -e . (CLIP_FAST_BUILD_CUDA=$BUILD_CUDA, limit ${t} s)" >> "$BUILD_LOG"
CLIP_FAST_BUILD_CUDA=$BUILD_CUDA timeout -k $KILL_S "$t" "$PY" -m pip install -e . --no-build-isolation \
  --no-deps -q >> "$BUILD_LOG" 2>&1
rc=$?
if [ $rc -ne 0 ]; then
  say "   build failed (rc=$rc; 124: stopped at its ${t} s limit); last lines of build.log:"
  tail -5 "$BUILD_LOG" | indent
  say "   retrying without the extension (CLIP_FAST_BUILD_CUDA=0)"
  CLIP_FAST_BUILD_CUDA=0 timeout -k $KILL_S "$(limit $BUILD_RETRY_S $BUILD_RETRY_AFTER_S)" "$PY" -m pip install -e . \
    --no-build-isolation --no-deps -q >> "$BUILD_LOG" 2>&1 || say "   install without the extension failed too"
fi
timeout -k $KILL_S 20 "$PY" - <<'PYEOF' 2>&1 | indent
import torch
try:
    import clip_fast.clip.backends as b
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for dt in (torch.bfloat16, torch.float32):
        print(f"backends on {dev} for {dt}:", b.available_backends(dev, dt))
except Exception as exc:
    print("clip_fast import failed:", type(exc).__name__, exc)
PYEOF

say "== 3/6 kernel variants ($(elapsed) s)"
VARIANTS_LOG="$LOGDIR/variants.log"
t=$(limit $VARIANTS_S $VARIANTS_AFTER_S)
if [ "$t" -lt 20 ]; then say "   skipped: ${t} s left for it (under 20 s)" | tee "$VARIANTS_LOG"; else
  # The script's own planner keeps its runs within --budget-s (its limit less the kill margin).
  timeout -s INT -k $KILL_S "$t" "$PY" benchmarks/bench_variants.py $DRY --budget-s $(( t - 5 )) \
    --large-n-s $LARGE_N_S --out-dir "$LOGDIR" > "$VARIANTS_LOG" 2>&1
  rc=$?
  [ $rc -ne 0 ] && say "   bench_variants.py rc=$rc (1: no run passed; 124/130: stopped at its ${t} s limit)"
  grep -E "^\[variants\] (plan|largest N|winner|done)" "$VARIANTS_LOG" | cut -c1-220 | indent
  [ -f "$LOGDIR/variants.md" ] && grep -E "^\| " "$LOGDIR/variants.md" | cut -c1-160 | indent
fi

say "== 4/6 Matryoshka ($(elapsed) s)"
MATRYOSHKA_LOG="$LOGDIR/matryoshka.log"
t=$(limit $MATRYOSHKA_S $MATRYOSHKA_AFTER_S)
if ! grep -q -- "--device" benchmarks/bench_matryoshka.py || ! grep -q -- "--backends" benchmarks/bench_matryoshka.py; then
  say "   skipped: benchmarks/bench_matryoshka.py here has no --device/--backends options" | tee "$MATRYOSHKA_LOG"
elif [ "$t" -lt 10 ]; then say "   skipped: ${t} s left for it (under 10 s)" | tee "$MATRYOSHKA_LOG"; else
  if [ -n "$DRY" ]; then   # the rehearsal: the interpreter at a tiny size
    MATRYOSHKA_ARGS="--device cpu --n 64 --dims 16 32 --reps 1 --out $LOGDIR/matryoshka_dry_cpu.csv"
  else
    MATRYOSHKA_ARGS="--device cuda --n 16384 65536 --dims 64 128 256 512 768 --out $LOGDIR/matryoshka_gpu.csv"
  fi
  timeout -s INT -k $KILL_S "$t" "$PY" benchmarks/bench_matryoshka.py --backends torch,triton --dtype bfloat16 \
    $MATRYOSHKA_ARGS > "$MATRYOSHKA_LOG" 2>&1
  rc=$?
  [ $rc -ne 0 ] && say "   bench_matryoshka.py rc=$rc (124/130: stopped at its ${t} s limit)"
  tail -6 "$MATRYOSHKA_LOG" | cut -c1-220 | indent
fi

say "== 5/6 GPU tests ($(elapsed) s)"
TESTS_LOG="$LOGDIR/tests.log"
t=$(limit $TEST_S $TESTS_AFTER_S)
if [ "$t" -lt 10 ]; then say "   skipped: ${t} s left for the tests (under 10 s)"; : > "$LOGDIR/tests.log"; else
# The Triton file first (this check's own subject), then every other test file's gpu tests.
FILES="tests/kernels/test_triton.py"
for f in tests/*/test_*.py; do
  case " $FILES " in *" $f "*) ;; *) [ -f "$f" ] && FILES="$FILES $f" ;; esac
done
# SIGINT, not SIGTERM: pytest treats it as KeyboardInterrupt and still prints the short
# summary (-rfE: one FAILED/ERROR line per failure) that the grep below reads.
timeout -s INT -k 10 "$t" "$PY" -m pytest -v -rfE -m gpu $FILES -p no:cacheprovider --durations=8 \
  > "$TESTS_LOG" 2>&1
rc=$?
[ $rc -eq 124 ] && say "   pytest stopped (SIGINT) at its ${t} s limit"
grep -E "^(FAILED|ERROR)" "$TESTS_LOG" | head -15 | indent
say "   $(grep -c ' PASSED' "$TESTS_LOG") passed, $(grep -c ' FAILED' "$TESTS_LOG") failed, $(grep -c ' SKIPPED' "$TESTS_LOG") skipped"
grep -E "^=+ .*(passed|failed|skipped|error|no tests ran).* =+$" "$TESTS_LOG" | tail -1 | sed 's/^/pytest: /' | indent
fi

say "== 6/6 benchmark table ($(elapsed) s)"
BENCH_LOG="$LOGDIR/bench.log"
t=$(( $(left) - END_RESERVE_S ))
if [ "$t" -lt 20 ]; then
  say "   skipped: ${t} s left for it (under 20 s)" | tee "$BENCH_LOG"
else
  # The script stops starting cases 20 s before its limit (its last case's calls were
  # estimated to fit); SIGINT then makes it print the summary of the rows so far.
  timeout -s INT -k $KILL_S "$t" "$PY" benchmarks/bench_gpu.py $DRY --budget-s $(( t - 20 )) \
    --out-dir "$LOGDIR" > "$BENCH_LOG" 2>&1
  rc=$?
  [ $rc -ne 0 ] && say "   bench_gpu.py rc=$rc (124/130: stopped at its ${t} s limit; the rows so far are in the CSV)"
  say "   rows not run, with the reason (all in bench.log and the CSV's note column):"
  grep -E "^\[[a-z_]+\] .* (skipped|not_runnable|error|oom) " "$BENCH_LOG" | head -12 | cut -c1-220 | indent
  sed -n '/^== summary/,$p' "$BENCH_LOG" | tail -n +2 | cut -c1-400 | indent
fi
say "== done in $(elapsed) s (budget ${TOTAL_S} s); logs in $LOGDIR"
