#!/usr/bin/env bash
# One call on a lent GPU machine (preinstalled torch/triton/torchvision/pytest/pytest-benchmark/matplotlib,
# no network), from anywhere:
#
#     bash benchmarks/gpu_run.sh OUT_DIR
#
# Steps, each logged to OUT_DIR (a step that fails does not stop the next ones):
#   env    nvidia-smi, versions (and, as the bench step starts, the load average and the busiest
#          processes)                                              -> OUT_DIR/logs/env.txt
#   build  pip install --no-build-isolation --no-deps -e . with the CUDA kernels forced
#          (FUSED_FPN_FORCE_CUDA=1, FUSED_FPN_CUDA_ARCHS="80;90", MAX_JOBS=16), at most
#          GPU_RUN_BUILD_TIMEOUT s (default 300)                  -> OUT_DIR/logs/build.log
#   tests  python3 -m pytest tests -v (the whole suite, on the GPU)  -> OUT_DIR/logs/tests.log (a line per
#          test as it ends), every test's outcome in OUT_DIR/logs/tests.xml (JUnit XML: which tests ran
#          when time ran out; not written when the run is killed), and the failed ones, read off the
#          per-test lines, in OUT_DIR/logs/tests_failed.txt and the summary
#   bench  python3 -m pytest benchmarks (GPU shapes)              -> OUT_DIR/logs/bench.log
#          + the results benchmarks/results/<device>_<date>[_cudagraphs][_subset][_partial].{json,png,md}
#          copied to OUT_DIR
#   overhead  python3 benchmarks/launch_overhead.py: host time per call, layer by layer, and of
#          the whole FPN on tiny maps -> appended to OUT_DIR/logs/bench.log and the summary; its first
#          triton calls compile and autotune every config (more than 2 minutes on the H200 host,
#          2026-11-30), so it gets GPU_RUN_OVERHEAD_TIMEOUT s (default 240)
#   breakdown (not in the default steps) python3 benchmarks/backward_breakdown.py: GPU time of each
#          backward piece per level (eager's, cuda's, triton's) against the bytes it must move, eager
#          calls then CUDA-graph replays -> OUT_DIR/breakdown.txt and the summary; GPU_RUN_BREAKDOWN_TIMEOUT
#          s (default 240; the triton pieces autotune on their first call)
#   ncu    (not in the default steps) benchmarks/kernel_profile.py under Nsight Compute: hardware counters
#          (duration, DRAM bytes and throughput, SM throughput, occupancy, registers, shared memory, L2
#          hit rate, warp stall reasons) of each provider's forward kernels, and of the backward pieces
#          (GPU_RUN_NCU_ARGS, default --backward; empty: forward only), on GPU_RUN_NCU_LEVELS (default
#          P2,P5), clocks left alone -> OUT_DIR/ncu.txt and the summary, raw CSV in the logs;
#          GPU_RUN_NCU_TIMEOUT s per run (default 300). ncu reads counters on the Firecracker machines
#          only (per the lending service's notes); elsewhere the step fails and says so in logs/ncu.log
#   sanitize (not in the default steps) tests/gpu_sanitizer_cases.py (small odd forward and backward
#          cases of each backend, every layout, the split-K shape) once plainly in
#          GPU_RUN_SANITIZE_SHARDS processes at once (default 8: Triton's compiles), then under NVIDIA's
#          compute-sanitizer, one run per tool of GPU_RUN_SANITIZE_TOOLS (default
#          memcheck,racecheck,synccheck; memcheck checks the cuda and triton backends and every kernel,
#          racecheck and synccheck the cuda backend's own kernels), with PYTORCH_NO_CUDA_MEMORY_CACHING=1
#          (every tensor its own allocation, whose bounds memcheck knows) -> OUT_DIR/sanitize.txt (each
#          run's case and failure counts, rc and the tool's summary line) and the summary,
#          logs/sanitize_*.log; GPU_RUN_SANITIZE_TIMEOUT s per run (default 240) within
#          GPU_RUN_SANITIZE_BUDGET s for the step (default 420), GPU_RUN_SANITIZE_ARGS added to each run
# then OUT_DIR/summary.txt (step statuses, the overhead rows, the results table; rewritten after
# every step, so a run killed from outside leaves the summary of the steps it finished, beside the
# unpacked logs/), printed last, and OUT_DIR/logs.tar.gz (the logs folder, packed so that OUT_DIR
# holds 5 files: the device tool returns at most 8).
#
# Time (it must fit well under 10 minutes, a device call's limit; the defaults below add up to more
# with the overhead step, so size them for the call): the tests get GPU_RUN_TEST_TIMEOUT s (default 150;
# on the H200, 2026-11-30, the build took 49 s for sm_90 alone and the rows that need the GPU,
# GPU_RUN_TEST_SELECT="(cuda or gpu) and not emulated" with GPU_RUN_PYTEST_ARGS="-n 12", got
# three quarters through in 150 s: the first triton call of each new shape compiles every config;
# since 2026-12-05 on threads, FUSED_FPN_TRITON_COMPILE_THREADS, default one per CPU);
# the benchmarks get GPU_RUN_BENCH_BUDGET s (default 150: rows not started by then are reported
# NOT-RUN, most important first: fp16 NCHW, fp16 channels_last, then bf16/fp32) and are interrupted
# (SIGINT: the table and files are still written) GPU_RUN_BENCH_GRACE s later (default 90).
# torch.compile(mode="max-autotune-no-cudagraphs") runs on the fp16 NCHW lateral path only
# (FUSED_FPN_BENCH_MAX_AUTOTUNE=lateral: every lateral case; =0: none).
# GPU_RUN_BENCH_ARGS adds pytest arguments to the bench step (e.g. --bench-cases 'lateral_*').
# GPU_RUN_PYTEST_ARGS adds pytest arguments to the test step (e.g. "-n 8", --ignore=FILE; split on
# spaces), GPU_RUN_TEST_SELECT a -k expression (e.g. "(cuda or gpu) and not emulated": the rows
# that need the GPU; CI runs the CPU rows). The tests run with FUSED_FPN_TRITON_AUTOTUNE=0 (each
# Triton kernel takes its list's first config: one compile per new shape instead of one per config;
# tests/test_triton_gpu.py runs every config on its own, and autotunes where it tests autotuning);
# GPU_RUN_TEST_AUTOTUNE=1 autotunes throughout.
# GPU_RUN_STEPS=build,tests,bench,overhead picks steps (default: all four; e.g. GPU_RUN_STEPS=bench
# after a first full call).
set -uo pipefail

OUT=${1:?usage: bash benchmarks/gpu_run.sh OUT_DIR}
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."

export PYTHONUNBUFFERED=1
# Link with the system g++ unless told otherwise: a Python built with its own toolchain (the GPU
# image's python links extensions with /opt/gcc/bin/g++) can put a second, static copy of
# libstdc++ into _C, whose iostreams then crash on the first error message (seen on the H100).
# GPU_RUN_KEEP_TOOLCHAIN=1 keeps whatever CC/CXX/LDSHARED the environment and sysconfig give.
if [ -z "${GPU_RUN_KEEP_TOOLCHAIN:-}" ] && [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then
    export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared"
fi
# sm_80 and sm_90 machine code, as on CI; exported so tests/test_cuda_build.py checks the same list
export FUSED_FPN_CUDA_ARCHS=${FUSED_FPN_CUDA_ARCHS:-80;90}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
PY=${PYTHON:-python3}
STEPS=${GPU_RUN_STEPS:-build,tests,bench,overhead}
TEST_TIMEOUT=${GPU_RUN_TEST_TIMEOUT:-150}
BENCH_BUDGET=${GPU_RUN_BENCH_BUDGET:-150}
BENCH_GRACE=${GPU_RUN_BENCH_GRACE:-90}
SUMMARY="$OUT/summary.txt"
T0=$(date +%s)
status_lines=()
worst=0

note() { echo "[gpu_run $(($(date +%s) - T0))s] $*"; }
# summary.txt: step statuses, the failed tests, the diagnostics and the table (printed last). Written
# after every step, so a run killed from outside (a device call's time limit) still leaves one.
write_summary() {
    {
        echo "gpu_run.sh summary ($(($(date +%s) - T0)) s in all)"
        for line in "${status_lines[@]}"; do echo "  $line"; done
        if [ -f "$OUT/logs/tests.log" ]; then
            echo "tests: $(tail -1 "$OUT/logs/tests.log")"
            echo "tests that failed or errored ($(wc -l < "$OUT/logs/tests_failed.txt"), from the per-test lines):"
            sed 's/^/  /' "$OUT/logs/tests_failed.txt"
        fi
        if [ -f "$OUT/overhead.tmp" ]; then echo; cat "$OUT/overhead.tmp"; fi
        if [ -f "$OUT/breakdown.txt" ]; then echo; cat "$OUT/breakdown.txt"; fi
        if [ -f "$OUT/ncu.txt" ]; then echo; cat "$OUT/ncu.txt"; fi
        if [ -f "$OUT/sanitize.txt" ]; then echo; cat "$OUT/sanitize.txt"; fi
        if [ -f "$OUT/logs/bench.log" ]; then
            echo
            sed -n '/fused_fpn benchmark results/,$p' "$OUT/logs/bench.log"
        fi
    } > "$SUMMARY"
}
record() {  # record STEP RC
    local msg="$1: rc=$2 after $(($(date +%s) - T0)) s"
    status_lines+=("$msg")
    note "$msg"
    if [ "$2" -ne 0 ]; then worst=1; fi
    write_summary
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

# ---- env
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "host: $(hostname) cores: $(getconf _NPROCESSORS_ONLN)"
    echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
    nvidia-smi 2>&1 || echo "nvidia-smi failed"
    "$PY" - <<'EOF' 2>&1
import sys, torch
print("python", sys.version.split()[0], "at", sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
import shutil
print("ninja:", shutil.which("ninja") or "not on PATH", "(without ninja the CUDA files compile one at a time)")
for mod in ("torchvision", "triton", "pytest", "pytest_benchmark", "matplotlib", "ninja"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as exc:
        print(mod, "MISSING", exc)
EOF
} > "$OUT/logs/env.txt" 2>&1
cat "$OUT/logs/env.txt"

# ---- build
if want build; then
    force=1
    if ! ls csrc/cuda/*.cu > /dev/null 2>&1; then
        force=0  # nothing to force yet: FUSED_FPN_FORCE_CUDA=1 would fail the build on purpose
        note "build: no csrc/cuda/*.cu in this tree: building without FUSED_FPN_FORCE_CUDA"
    fi
    note "build: pip install -e . (FUSED_FPN_FORCE_CUDA=$force, archs $FUSED_FPN_CUDA_ARCHS), log in logs/build.log"
    FUSED_FPN_FORCE_CUDA=$force MAX_JOBS=${MAX_JOBS:-16} timeout -k 10 "${GPU_RUN_BUILD_TIMEOUT:-300}" \
        "$PY" -m pip install --no-build-isolation --no-deps -v -e . > "$OUT/logs/build.log" 2>&1
    rc=$?
    "$PY" - >> "$OUT/logs/build.log" 2>&1 <<'EOF' || rc=1
import torch, fused_fpn
on_cuda = fused_fpn.available_backends("cuda") if torch.cuda.is_available() else "no GPU"
print("fused_fpn backends:", fused_fpn.available_backends(), "on cuda:", on_cuda,
      "cuda built:", fused_fpn.cuda_built(), "extension error:", fused_fpn.extension_error())
EOF
    ls fused_fpn/_C*.so > /dev/null 2>&1 && ldd fused_fpn/_C*.so | grep -E "stdc\+\+|not found" >> "$OUT/logs/build.log"
    grep -E "fused_fpn setup|error|Successfully|fused_fpn backends|libstdc" "$OUT/logs/build.log" | tail -20
    record build $rc
fi

# ---- tests
if want tests; then
    note "tests: pytest tests (timeout ${TEST_TIMEOUT}s), log in logs/tests.log"
    # GPU_RUN_PYTEST_ARGS: extra pytest arguments (e.g. "-n 8" with pytest-xdist, or --ignore=...)
    select=()
    if [ -n "${GPU_RUN_TEST_SELECT:-}" ]; then select=(-k "$GPU_RUN_TEST_SELECT"); fi
    FUSED_FPN_TRITON_AUTOTUNE=${GPU_RUN_TEST_AUTOTUNE:-0} \
        timeout -s INT -k 20 "$TEST_TIMEOUT" "$PY" -m pytest tests -v -rfEs -p no:cacheprovider --durations=15 \
        --junitxml "$OUT/logs/tests.xml" "${select[@]}" ${GPU_RUN_PYTEST_ARGS:-} > "$OUT/logs/tests.log" 2>&1
    rc=$?
    tail -5 "$OUT/logs/tests.log"
    # -v logs each test's outcome as it ends, so the failures are named even when the run is killed
    # before pytest's own summary and the JUnit XML are written
    grep -aoE "(FAILED|ERROR) tests/[^ ]+|tests/[^ ]+ (FAILED|ERROR)" "$OUT/logs/tests.log" \
        | sed -E 's/^(FAILED|ERROR) (.*)$/\2 \1/' | sort -u > "$OUT/logs/tests_failed.txt"
    record tests $rc
fi

# ---- bench
if want bench; then
    note "bench: pytest benchmarks (budget ${BENCH_BUDGET}s + ${BENCH_GRACE}s), log in logs/bench.log"
    # what else is running as the timing starts (a noisy run is then told from a slow one)
    { echo "before bench ($(date -u +%H:%M:%SZ)): load average $(cat /proc/loadavg 2>/dev/null)"
      ps -eo pid,pcpu,etime,args --sort=-pcpu 2>/dev/null | head -8 | cut -c1-160; } >> "$OUT/logs/env.txt"
    FUSED_FPN_BENCH_BUDGET_S=$BENCH_BUDGET timeout -s INT -k 30 $((BENCH_BUDGET + BENCH_GRACE)) \
        "$PY" -m pytest benchmarks -p no:cacheprovider -rfEs --durations=10 ${GPU_RUN_BENCH_ARGS:-} \
        > "$OUT/logs/bench.log" 2>&1
    rc=$?
    copied=0
    while read -r path; do
        if [ -f "$path" ]; then cp "$path" "$OUT/" && copied=$((copied + 1)); fi
    done < <(sed -n 's/^wrote [A-Z]*: //p' "$OUT/logs/bench.log")
    note "bench: copied $copied result files to $OUT"
    if [ "$copied" -eq 0 ] && [ "$rc" -eq 0 ]; then rc=1; fi
    record bench $rc
fi

# ---- overhead: host time per call of each layer (tiny shapes: the GPU is not the bottleneck)
if want overhead; then
    note "overhead: benchmarks/launch_overhead.py, appended to logs/bench.log"
    timeout -s INT -k 10 "${GPU_RUN_OVERHEAD_TIMEOUT:-240}" "$PY" benchmarks/launch_overhead.py --calls 1000 > "$OUT/overhead.tmp" 2>&1
    rc=$?
    { echo; echo "==== benchmarks/launch_overhead.py (gpu_run.sh overhead step)"; cat "$OUT/overhead.tmp"; } \
        >> "$OUT/logs/bench.log"
    record overhead $rc
fi

# ---- breakdown: GPU time of the backward's pieces per level (opt-in: GPU_RUN_STEPS=...,breakdown)
if want breakdown; then
    note "breakdown: benchmarks/backward_breakdown.py -> $OUT/breakdown.txt"
    { timeout -s INT -k 10 "${GPU_RUN_BREAKDOWN_TIMEOUT:-240}" "$PY" benchmarks/backward_breakdown.py \
          --json "$OUT/logs/breakdown.json" \
      && timeout -s INT -k 10 "${GPU_RUN_BREAKDOWN_TIMEOUT:-240}" "$PY" benchmarks/backward_breakdown.py \
          --graphs --json "$OUT/logs/breakdown_graphs.json"; } > "$OUT/breakdown.txt" 2>&1
    record breakdown $?
fi

# ---- ncu: hardware counters of the forward kernels and backward pieces (opt-in: GPU_RUN_STEPS=...,ncu)
if want ncu; then
    NCU=${NCU:-$(command -v ncu || ls -d /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)}
    levels=(--levels "${GPU_RUN_NCU_LEVELS:-P2,P5}" ${GPU_RUN_NCU_ARGS---backward})
    ncu_timeout=${GPU_RUN_NCU_TIMEOUT:-300}
    note "ncu: benchmarks/kernel_profile.py under ${NCU:-ncu (not found)} -> $OUT/ncu.txt"
    rc=1
    if [ -n "$NCU" ]; then
        read -ra ncu_opts < <("$PY" benchmarks/kernel_profile.py --ncu-args)
        timeout -s INT -k 10 "$ncu_timeout" "$PY" benchmarks/kernel_profile.py "${levels[@]}" \
            --plan "$OUT/logs/ncu_plan.json" > "$OUT/logs/ncu_plan.txt" 2>&1 \
        && timeout -s INT -k 10 "$ncu_timeout" "$NCU" "${ncu_opts[@]}" "$PY" benchmarks/kernel_profile.py \
            "${levels[@]}" > "$OUT/logs/ncu_raw.csv" 2> "$OUT/logs/ncu.log" \
        && "$PY" benchmarks/kernel_profile.py --summarize "$OUT/logs/ncu_raw.csv" --plan "$OUT/logs/ncu_plan.json" \
            > "$OUT/ncu.txt" 2>&1
        rc=$?
        if grep -q "triton autotune" "$OUT/logs/ncu.log" 2>/dev/null; then   # which config each triton kernel ran
            { echo "Triton configs of the profiled run:"; grep "triton autotune" "$OUT/logs/ncu.log"; } >> "$OUT/ncu.txt"
        fi
    else
        echo "ncu not found (PATH, /opt/nvidia/nsight-compute/*/ncu); NCU=... names it" > "$OUT/logs/ncu.log"
    fi
    if [ "$rc" -ne 0 ]; then tail -20 "$OUT/logs/ncu.log" "$OUT/logs/ncu_plan.txt" 2>/dev/null; fi
    record ncu $rc
fi

# ---- sanitize: the fused kernels under compute-sanitizer (opt-in: GPU_RUN_STEPS=...,sanitize)
if want sanitize; then
    SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer || ls -d "$CUDA_HOME"/bin/compute-sanitizer \
        /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)}
    san_timeout=${GPU_RUN_SANITIZE_TIMEOUT:-240}
    san_end=$(( $(date +%s) + ${GPU_RUN_SANITIZE_BUDGET:-420} ))
    san_shards=${GPU_RUN_SANITIZE_SHARDS:-8}
    SAN="$OUT/sanitize.txt"
    note "sanitize: tests/gpu_sanitizer_cases.py under ${SANITIZER:-compute-sanitizer (not found)} -> $SAN"
    # seconds the next run may take: GPU_RUN_SANITIZE_TIMEOUT, or what is left of GPU_RUN_SANITIZE_BUDGET
    san_limit() {   # (at least 1: timeout takes 0 as no limit)
        local left=$(( san_end - $(date +%s) ))
        left=$(( left < san_timeout ? left : san_timeout ))
        echo $(( left < 1 ? 1 : left ))
    }
    # san_exec LOG SECONDS BACKENDS SHARD [TOOL COMMAND ...]: one run of the cases (each tensor its own
    # cudaMalloc, whose bounds memcheck knows)
    san_exec() {
        local log=$1 secs=$2 backends=$3 shard=$4
        shift 4
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -s INT -k 10 "$secs" "$@" "$PY" tests/gpu_sanitizer_cases.py \
            --backends "$backends" --shard "$shard" ${GPU_RUN_SANITIZE_ARGS:-} > "$log" 2>&1
    }
    # san_tail LOG [TOOL_FAILED]: a log's FAILED lines, the tool's first reports and its last lines, into
    # sanitize.txt, unless it ended in "ran N cases, 0 failed" and the tool found nothing
    san_tail() {
        if [ -z "${2:-}" ] && grep -qaE "^ran [0-9]+ cases, 0 failed" "$1"; then return 0; fi
        { echo "    from logs/${1##*/}:"
          { grep -a "^FAILED" "$1" | head -5; grep -a "^========= [A-Z]" "$1" | head -6; tail -8 "$1"; } \
              | cut -c1-240 | sed 's/^/      /'; } >> "$SAN"
        return 1
    }
    # the backends a run's log says it ran (GPU_RUN_SANITIZE_ARGS may name others than asked), else $2
    san_label() { local b; b=$(grep -am1 "^backends: " "$1" | sed 's/^backends: //; s/ on .*//'); echo "${b:-$2}"; }
    echo "compute-sanitizer runs of tests/gpu_sanitizer_cases.py (${SANITIZER:-compute-sanitizer not found}):" > "$SAN"
    rc=0
    if ! [[ "$san_shards" =~ ^[1-9][0-9]*$ ]]; then
        echo "  GPU_RUN_SANITIZE_SHARDS must be a positive integer, got '$san_shards'" >> "$SAN"
        san_shards=1 rc=1
    fi
    # plainly first, in GPU_RUN_SANITIZE_SHARDS processes at once: the values, and Triton's compiles (into
    # its cache) outside the slow tool runs
    secs=$(san_limit)
    pids=() plain_logs=()
    for ((k = 0; k < san_shards; k++)); do
        plain_logs+=("$OUT/logs/sanitize_plain_$k.log")
        san_exec "${plain_logs[$k]}" "$secs" cuda,triton "$k/$san_shards" &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
    awk -v shards="$san_shards" -v label="$(san_label "${plain_logs[0]}" cuda,triton)" \
        '/^ran [0-9]+ cases, [0-9]+ failed/ {n += $2; f += $4; done++}
         END {printf "  plain (%s): ran %d cases, %d failed, %d of %d processes finished\n", label, n, f, done, shards}' \
        "${plain_logs[@]}" >> "$SAN"
    for log in "${plain_logs[@]}"; do san_tail "$log" || rc=1; done
    write_summary
    if [ -z "$SANITIZER" ]; then
        echo "  compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda*/bin); COMPUTE_SANITIZER=... names it" >> "$SAN"
        rc=1
    else
        IFS=, read -ra san_tools <<< "${GPU_RUN_SANITIZE_TOOLS:-memcheck,racecheck,synccheck}"
        for tool in "${san_tools[@]}"; do
            # memcheck: every kernel (a bad argument of ours can fault in a library's); racecheck and
            # synccheck: our CUDA kernels only (cuBLAS's and ATen's own are reported racy under them)
            backends=cuda filter=(--kernel-name kns=fused_fpn)
            if [ "$tool" = memcheck ]; then backends=cuda,triton filter=(); fi
            log="$OUT/logs/sanitize_$tool.log"
            if [ $(( san_end - $(date +%s) )) -lt 30 ]; then
                echo "  $tool ($backends): NOT-RUN, GPU_RUN_SANITIZE_BUDGET used up" >> "$SAN"
                rc=1
                continue
            fi
            san_exec "$log" "$(san_limit)" "$backends" 0/1 "$SANITIZER" --tool "$tool" --error-exitcode 86 --print-limit 20 \
                --report-api-errors no --check-exit-code no --target-processes application-only \
                --destroy-on-device-error kernel "${filter[@]}"
            run_rc=$?
            ran=$(grep -aE "^ran [0-9]+ cases" "$log" | tail -1)
            tool_summary=$(grep -aE "(ERROR|RACECHECK) SUMMARY" "$log" | tail -1 | sed 's/^=* *//')
            echo "  $tool ($(san_label "$log" "$backends")): rc=$run_rc, ${ran:-stopped after $(grep -ac '^case ' "$log") cases started}${tool_summary:+, $tool_summary}" \
                >> "$SAN"
            tool_failed=""
            if [ "$run_rc" -ne 0 ]; then rc=1 tool_failed=1; fi
            san_tail "$log" "$tool_failed" || rc=1
            write_summary
        done
    fi
    cat "$SAN"
    record sanitize $rc
fi

# ---- summary: statuses, then the table (printed last)
write_summary
rm -f "$OUT/overhead.tmp"
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$OUT/logs"
cat "$SUMMARY"
exit $worst
