#!/usr/bin/env bash
# bench/device_suite.sh: the one call a session makes on a lent GPU machine (one H200: Python
# 3.12, torch 2.11 cu130, triton 3.6, nvcc 13.0, ninja, pytest; no network). It ends within
# DEADLINE_S (default 300 s) so that a lease of 15 minutes holds a first run, a fix and a rerun.
#
#   bench/device_suite.sh               results in $OUT (default ./device_out); run from anywhere
#   DRY_RUN=1 bench/device_suite.sh     (or --dry-run) stubs every stage; no GPU, pip or python
#   bench/device_suite.sh --help        this text
#
# Stages, in this order, each under its own `timeout` (cap s at DEADLINE_S=300, kill grace s):
#   env            12  2  toolchain to env.txt: nvidia-smi (name, driver, compute capability),
#                         python, torch + torch.version.cuda, triton, setuptools, nvcc --version
#                         (+ CUDA_HOME from `nvcc --dryrun`), ninja, gcc; nvcc vs torch's CUDA
#   build          80  5  rcar_fast._C built in place for the device's own architecture only
#                         (TORCH_CUDA_ARCH_LIST = its compute capability, MAX_JOBS = nproc):
#                         `python setup.py build_ext --inplace -t build/device_ext`; the objects
#                         stay in build/device_ext (ignored, kept on a warm machine) so ninja
#                         rebuilds only what changed, and a stamp of the sources, arch, python,
#                         torch and nvcc skips the build altogether when nothing did. Then an
#                         import check (build_info, backend_status); no cuda backend = the cuda
#                         stages below are skipped. A failed build moves its stale .so away.
#   row_cuda       32  3  Flickr30K test matrix, 1000 x 5000, bf16, coop_rcar T=2, t2i: one
#   row_triton     42  3    `python -m bench` process per backend, cuda, triton, torch, so a
#   row_torch      32  3    crash or hang of one costs the others nothing ("starting row ...")
#   pytest_cuda    25 10  python -m pytest tests -m gpu -k <backend> -v -rfE, under
#   pytest_triton  30 10    `timeout -s INT`: a cut-off pytest still prints its summary
#   then, as time allows (each skipped when less than 20 s is left for it):
#   profile        40  3  measured kernel time per row of the cost model (python -m bench.profile:
#                         the Flickr30K matrix, bf16, triton then cuda, each warmed up, timed and
#                         profiled once) against bench/roofline.py's prediction -> profile.md
#   memcheck_cuda  45  3  the cuda backend's own kernels under compute-sanitizer (--tool memcheck,
#   racecheck_cuda 45  3    then racecheck; --report-api-errors no: the libraries' deliberate failed
#                           probes are not ours; memcheck with PYTORCH_NO_CUDA_MEMORY_CACHING=1, so
#                           an access past a tensor is not inside a cached block): its GPU tests
#                           selftest_passes (first: the only one with a backward), rcr_op,
#                           flickr_shaped_block, pytest under its own timeout 8 s short of the cap
#                           (the sanitizer then prints its summary), to pytest.log; exit 9 = the
#                           sanitizer found an error, 7 = no compute-sanitizer
#   h100_base      60  3  100 x 100 headline (coop_rcar T=2, t2i, i2t) + training step (--train):
#   h100_cuda      30  3    reference, release_loop, torch in one process, then cuda, then
#   h100_triton    40  3    triton, each in its own
#   r1000_fp32     80  3  1000 x 1000 headline: release_loop, torch, triton, cuda, fp32
#   r1000_bf16     50  3    the same in bf16
#   compile       150  3  torch+compile on the 100 x 100 headline
#   summary         6  1  summary.md (full table, all rows) and the short table
# The stages down to pytest_triton get their caps whatever happens: their caps and kill graces,
# the summary's, 3 s of start-up and 1 s for the tables at the end add up to at most DEADLINE_S
# (counted from the script's first step). Each may take up to twice its cap when earlier stages
# left time over; the others take what is left. All caps but the end's 1 s scale with
# DEADLINE_S / 300. Python stages get SIGINT (pytest prints its summary, python a traceback of
# where it was), then SIGKILL after the grace. It prints, LAST: the stage table (name, cap,
# seconds used, exit status) and the short table of the benchmark rows, with the rows that
# failed and why.
#
# Files in $OUT (8; the device tool brings back at most 8): env.txt, build.log, bench.log (all
# python -m bench runs), pytest.log, profile.md, history.csv (every row: append to
# bench/results/history.csv to keep them), summary.md, stages.txt.
#
# Environment: OUT, DEADLINE_S (300), PYTHON (python3), BENCH_GIT_COMMIT (names the commit: the
# copy of the tree there has no .git), ONLY=glob,glob (run only these stages; env, build and
# summary always run; e.g. ONLY='row_*,pytest_triton'), CAP_<stage>=s (that stage's cap, not
# scaled), TORCH_CUDA_ARCH_LIST (overrides the detected architecture), MAX_JOBS (nproc),
# BUILD_WITH=pip (build with `pip install --no-index --no-build-isolation --no-deps -e .`
# instead: a full rebuild every time, in a temporary folder).
# Dry run: DRY_STAGE_S (each stub sleeps this long, default 1), DRY_HANG=stage,... (those stubs
# hang until the timeout's signal, which they report), DRY_HANG_HARD=stage,... (they also ignore
# SIGINT/SIGTERM, so only the kill after the grace ends them), DRY_FAIL=stage,... (exit 1),
# DRY_COMPUTE_CAP (9.0). tests/test_device_suite.py runs it so.
set -u
T0_US=${EPOCHREALTIME//[!0-9]/}    # the deadline counts from here, the script's first step
case "${1:-}" in -h|--help) sed -n '2,/^set -u$/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac

SELF="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
ROOT="$(dirname "$(dirname "$SELF")")"
mkdir -p "${OUT:=./device_out}"
OUT="$(cd "$OUT" && pwd)"
cd "$ROOT" || exit 2
export OUT
export DRY_RUN="${DRY_RUN:-0}"
export DEADLINE_S="${DEADLINE_S:-300}"
export PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
export TRITON_INTERPRET=0          # real kernels (tests/conftest.py defaults it to 1)
export PYTHONUNBUFFERED=1          # log lines as they happen: a hang shows where it was
BUILD_DIR=build/device_ext         # ignored; kept between calls on a warm machine

ENV_TXT="$OUT/env.txt"
BUILD_LOG="$OUT/build.log"
BENCH_LOG="$OUT/bench.log"
PYTEST_LOG="$OUT/pytest.log"
PROFILE_MD="$OUT/profile.md"
CSV="$OUT/history.csv"
SUMMARY_MD="$OUT/summary.md"
STAGES_TXT="$OUT/stages.txt"
OUT_FILES="env.txt build.log bench.log pytest.log profile.md history.csv summary.md stages.txt"

now_ms() { local t=${EPOCHREALTIME//[!0-9]/}; echo $(( t / 1000 )); }
# milliseconds as seconds: 25000 -> 25, 2500 -> 2.5
secs() { if [ $(( $1 % 1000 )) -eq 0 ]; then echo $(( $1 / 1000 )); else printf '%d.%d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); fi; }
in_list() { local x xs; IFS=, read -ra xs <<<"$2"; for x in "${xs[@]}"; do [ "$1" = "$x" ] && return 0; done; return 1; }

# --------------------------------------------------------------------- subcommands (internal)

stub() {   # --stub NAME CMD...: a dry run's stage: say what would run, then sleep, hang or fail
    local name=$1 p; shift
    echo "DRY RUN [$name] would run: $*"
    if in_list "$name" "${DRY_HANG_HARD:-}"; then
        echo "DRY RUN [$name]: hanging, deaf to SIGINT and SIGTERM"
        trap '' INT TERM
        sleep 100000
    elif in_list "$name" "${DRY_HANG:-}"; then
        echo "DRY RUN [$name]: hanging until a signal"
        trap 'echo "DRY RUN [$name]: got SIGINT"; kill $p 2>/dev/null; exit 130' INT
        trap 'echo "DRY RUN [$name]: got SIGTERM"; kill $p 2>/dev/null; exit 143' TERM
        sleep 100000 & p=$!
        wait $p
    fi
    sleep "${DRY_STAGE_S:-1}"
    if in_list "$name" "${DRY_FAIL:-}"; then echo "DRY RUN [$name]: failing"; return 1; fi
    return 0
}

env_stage() {   # --env-stage FACTS: the toolchain to env.txt; KEY=VALUE facts to FACTS
    local facts=$1 smi top rel
    {
        echo "date: $(date -u +%FT%TZ)  host: $(uname -n)  nproc: $(nproc)  DEADLINE_S: $DEADLINE_S"
        echo "commit: ${BENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git: pass BENCH_GIT_COMMIT)')}"
        echo "--- nvidia-smi: name, driver, compute capability, memory, max SM clock"
        smi=$(timeout -k 1 10 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total,clocks.max.sm \
              --format=csv,noheader 2>&1 | head -n 1)
        echo "$smi"
        echo "fact: GPU_CC=$(echo "$smi" | awk -F', ' 'NF >= 3 && $3 ~ /^[0-9]+\.[0-9]+$/ {print $3}')"
        echo "--- python, torch, triton, setuptools"
        timeout -k 1 40 "$PY" - <<'EOF' 2>&1
import sys, sysconfig
print("python", sys.version.split()[0], sys.executable)
print("fact: PY_VERSION=" + sys.version.split()[0])
print("fact: EXT_SUFFIX=" + (sysconfig.get_config_var("EXT_SUFFIX") or ""))
for mod in ("setuptools", "triton"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:
        print(mod, "does not import:", e)
try:
    import torch
    print("torch", torch.__version__, "built with CUDA", torch.version.cuda,
          "cuda available", torch.cuda.is_available())
    print("fact: TORCH_VERSION=" + torch.__version__)
    print("fact: TORCH_CUDA=" + str(torch.version.cuda))
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        print("device", torch.cuda.get_device_name(), "capability %d.%d" % cc)
        print("fact: TORCH_CC=%d.%d" % cc)
except Exception as e:
    print("torch does not import:", e)
EOF
        echo "--- nvcc (CUDA_HOME: the toolkit nvcc --dryrun names, unless set)"
        if command -v nvcc >/dev/null 2>&1; then
            timeout -k 1 10 nvcc --version 2>&1 | tail -n 2
            rel=$(timeout -k 1 10 nvcc --version 2>&1 | sed -n 's/.*release \([0-9][0-9.]*\),.*/\1/p' | head -n 1)
            top=${CUDA_HOME:-$(cd /tmp && timeout -k 1 20 nvcc --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}
            [ -n "$top" ] && top=$(realpath "$top")
            echo "fact: NVCC_RELEASE=$rel"
            echo "fact: CUDA_HOME=$top"
        else
            echo "nvcc: NOT FOUND: the cuda backend cannot be built"
        fi
        echo "--- ninja, gcc"
        if command -v ninja >/dev/null 2>&1; then echo "ninja $(ninja --version 2>&1)"
        else echo "ninja: NOT FOUND: torch's extension build falls back to one file at a time"; fi
        gcc --version 2>&1 | head -n 1
    } >"$ENV_TXT" 2>&1
    sed -n 's/^fact: //p' "$ENV_TXT" >"$facts"
}

build_fingerprint() {   # sources, setup.py, arch, python, torch, nvcc: what the .so depends on
    { find csrc -type f \( -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' -o -name '*.hpp' \) \
          | LC_ALL=C sort | xargs -r sha256sum
      sha256sum setup.py
      echo "arch=${TORCH_CUDA_ARCH_LIST:-} py=${PY_VERSION:-}${EXT_SUFFIX:-} torch=${TORCH_VERSION:-}" \
           "nvcc=${NVCC_RELEASE:-} cuda_home=${CUDA_HOME:-}"
    } | sha256sum | cut -c1-64
}

build_stage() {   # --build-stage: build rcar_fast._C in place unless up to date; check it
    local so="rcar_fast/_C${EXT_SUFFIX:-.so}" stampf="$BUILD_DIR/stamp" want t0
    mkdir -p "$BUILD_DIR"
    want=$(build_fingerprint)
    if [ -f "$so" ] && [ -f "$stampf" ] && [ "$(cat "$stampf")" = "$want $(sha256sum <"$so" | cut -c1-64)" ]; then
        echo "build: up to date (same sources, arch, python, torch and nvcc as $so): not rebuilt"
    else
        rm -f "$stampf"
        echo "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} MAX_JOBS=${MAX_JOBS:-} CUDA_HOME=${CUDA_HOME:-unset}"
        local cmd=("$PY" setup.py build_ext --inplace -t "$BUILD_DIR")
        [ "${BUILD_WITH:-}" = pip ] && cmd=("$PY" -m pip install --no-index --no-build-isolation --no-deps -e .)
        echo "build: ${cmd[*]}"
        t0=$(now_ms)
        if ! "${cmd[@]}"; then
            echo "build: FAILED after $(secs $(( $(now_ms) - t0 ))) s"
            return 2
        fi
        echo "build: compiled in $(secs $(( $(now_ms) - t0 ))) s"
        [ -f "$so" ] && echo "$want $(sha256sum <"$so" | cut -c1-64)" >"$stampf"
    fi
    "$PY" - <<'EOF'
import os, sys
import torch
import rcar_fast
try:
    if not os.path.abspath(rcar_fast.__file__).startswith(os.getcwd() + os.sep):
        print(f"WARNING: rcar_fast imports from {rcar_fast.__file__}, not from this tree")
    from rcar_fast import _C
    info = _C.build_info()
    print("rcar_fast._C:", _C.__file__, info)
    want = os.environ.get("TORCH_CUDA_ARCH_LIST", "")
    if info.get("cuda") and info.get("cuda_archs") != want:
        print(f"WARNING: built for {info.get('cuda_archs')}, this device wants {want}")
except Exception as e:
    print("rcar_fast._C does not import:", type(e).__name__, e)
status = rcar_fast.backend_status()
for name, why in status.items():
    print(f"  {name}: {why}")
sys.exit(0 if status["cuda"] == "available" else 3)
EOF
}

summary_stage() {   # --summary-stage FILE: summary.md (every row) and the short table to FILE
    if [ ! -s "$CSV" ]; then echo "(no benchmark rows: $CSV is empty)" >"$1"; return 0; fi
    "$PY" - "$CSV" "$SUMMARY_MD" "$1" <<'EOF'
import sys
from bench.report import headline, markdown_table, read_csv   # no torch import: fast
csv_path, md_path, short_path = sys.argv[1:4]
rows = read_csv(csv_path)
heads = "\n".join(h for h in (headline(rows, backend=b) for b in ("cuda", "triton", "torch")) if h)
bad = [f"- {r.backend} {r.op} {r.attn_type} [{r.shape.split(' ')[1] if ' ' in r.shape else r.shape}, "
       f"{r.dtype}]: {r.note}" for r in rows if "error" in r.note or "skipped" in r.note]
with open(md_path, "w") as f:
    f.write(f"# device_suite: {len(rows)} rows\n\n{markdown_table(rows)}\n\n{heads}\n")
with open(short_path, "w") as f:
    f.write(markdown_table(rows, compact=True) + "\n")
    if heads:
        f.write("\nSpeed-up over the release loop:\n" + heads + "\n")
    if bad:
        f.write("\nRows that failed or were skipped:\n" + "\n".join(bad) + "\n")
    try:    # measured vs the cost model's committed predictions (bench/roofline.py; no torch)
        import json
        from bench.roofline import RESULTS_JSON, compare
        with open(RESULTS_JSON) as pf:
            lines = compare(rows, json.load(pf)["totals"])
    except Exception as exc:   # the table above matters more than this comparison
        lines = [f"(no comparison: {type(exc).__name__}: {exc})"]
    if lines:
        f.write("\nMeasured vs predicted (bench/results/roofline.json):\n" + "\n".join(lines) + "\n")
EOF
}

sanitize_stage() {   # --sanitize-stage TOOL CAP_MS: the cuda backend's GPU tests of its own kernels under compute-sanitizer
    local cs="" inner env_=()
    cs=$(command -v compute-sanitizer 2>/dev/null || true)
    if [ -z "$cs" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
        cs="$CUDA_HOME/bin/compute-sanitizer"
    fi
    if [ -z "$cs" ]; then
        echo "no compute-sanitizer on PATH or in CUDA_HOME: not run"
        return 7
    fi
    inner=$(( $2 / 1000 - 8 ))
    [ "$inner" -lt 5 ] && inner=5
    [ "$1" = memcheck ] && env_=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
    env ${env_[@]+"${env_[@]}"} "$cs" --tool "$1" --error-exitcode 9 --print-limit 20 --report-api-errors no \
        --target-processes all timeout -s INT -k 2 "$inner" \
        "$PY" -m pytest tests/test_gpu.py::test_selftest_passes tests/test_gpu.py::test_rcr_op \
        tests/test_gpu.py::test_flickr_shaped_block -m gpu -k cuda -q -rfE -p no:cacheprovider
}

case "${1:-}" in
    --stub) shift; stub "$@"; exit $? ;;
    --env-stage) env_stage "$2"; exit $? ;;
    --build-stage) build_stage; exit $? ;;
    --summary-stage) summary_stage "$2"; exit $? ;;
    --sanitize-stage) sanitize_stage "$2" "$3"; exit $? ;;
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bench/device_suite.sh [--dry-run|--help]" >&2; exit 2 ;;
esac

# --------------------------------------------------------------------- the plan
START_MS=$(( T0_US / 1000 ))
DEADLINE_MS=$(( DEADLINE_S * 1000 ))
STATE=$(mktemp -d)
trap 'rm -rf "$STATE"' EXIT
FACTS="$STATE/facts"
CUDA_OK=1           # the cuda backend imports (the build stage says)

# every duration below is in ms, given in seconds at DEADLINE_S=300 and scaled to DEADLINE_S
scaled() { local v=$(( ($1 * 1000 * DEADLINE_S / 300 + 50) / 100 * 100 )); [ "$v" -lt 100 ] && v=100; echo "$v"; }
START_RESERVE=$(scaled 3)           # before the first stage
SUMMARY_CAP=$(scaled 6); SUMMARY_GRACE=$(scaled 1)
END_RESERVE=1000    # after the summary: the tables and the exit (forks: not scaled with DEADLINE_S)
REST_MIN=$(scaled 20)               # an as-time-allows stage with less left is skipped
MUST_MIN=$(scaled 2)

S_NAME=(); S_KIND=(); S_CAP=(); S_GRACE=(); S_SIG=(); S_LOG=()
add_stage() {   # add_stage NAME KIND(must|rest) CAP_S GRACE_S SIGNAL LOG
    local cap v="CAP_$1"
    cap=$(scaled "$3")
    [ -n "${!v:-}" ] && cap=$(( ${!v} * 1000 ))
    S_NAME+=("$1"); S_KIND+=("$2"); S_CAP+=("$cap"); S_GRACE+=("$(scaled "$4")"); S_SIG+=("$5"); S_LOG+=("$6")
}
add_stage env           must  12  2 TERM "$STATE/env.log"
add_stage build         must  80  5 TERM "$BUILD_LOG"
add_stage row_cuda      must  32  3 INT  "$BENCH_LOG"
add_stage row_triton    must  42  3 INT  "$BENCH_LOG"
add_stage row_torch     must  32  3 INT  "$BENCH_LOG"
add_stage pytest_cuda   must  25 10 INT  "$PYTEST_LOG"
add_stage pytest_triton must  30 10 INT  "$PYTEST_LOG"
add_stage profile       rest  40  3 INT  "$PROFILE_MD"
add_stage memcheck_cuda rest  45  3 INT  "$PYTEST_LOG"
add_stage racecheck_cuda rest 45  3 INT  "$PYTEST_LOG"
add_stage h100_base     rest  60  3 INT  "$BENCH_LOG"
add_stage h100_cuda     rest  30  3 INT  "$BENCH_LOG"
add_stage h100_triton   rest  40  3 INT  "$BENCH_LOG"
add_stage r1000_fp32    rest  80  3 INT  "$BENCH_LOG"
add_stage r1000_bf16    rest  50  3 INT  "$BENCH_LOG"
add_stage compile       rest 150  3 INT  "$BENCH_LOG"
MUST_STRETCH=2      # a must stage may take up to this many times its cap when time was left over

selected() {   # ONLY=glob,glob picks stages; env, build and the summary always run
    local g globs
    [ -z "${ONLY:-}" ] || [ "$1" = env ] || [ "$1" = build ] && return 0
    IFS=, read -ra globs <<<"$ONLY"
    for g in "${globs[@]}"; do
        # shellcheck disable=SC2254
        case $1 in $g) return 0 ;; esac
    done
    return 1
}
needs_cuda() { case $1 in *_cuda) return 0 ;; esac; return 1; }
will_run() { selected "$1" && { [ "$CUDA_OK" = 1 ] || ! needs_cuda "$1"; }; }

# the must stages' caps, graces, the summary, start-up and the end must fit the deadline
plan_ms=$(( START_RESERVE + SUMMARY_CAP + SUMMARY_GRACE + END_RESERVE ))
plan="start $(secs "$START_RESERVE")"
for i in "${!S_NAME[@]}"; do
    [ "${S_KIND[$i]}" = must ] && selected "${S_NAME[$i]}" || continue
    plan_ms=$(( plan_ms + S_CAP[i] + S_GRACE[i] ))
    plan+=" + ${S_NAME[$i]} $(secs "${S_CAP[$i]}")+$(secs "${S_GRACE[$i]}")"
done
plan+=" + summary $(secs "$SUMMARY_CAP")+$(secs "$SUMMARY_GRACE") + end $(secs "$END_RESERVE")"
plan+=" = $(secs "$plan_ms") s of DEADLINE_S $DEADLINE_S"
rest="as time allows:"
for i in "${!S_NAME[@]}"; do
    [ "${S_KIND[$i]}" = rest ] && selected "${S_NAME[$i]}" && rest+=" ${S_NAME[$i]} $(secs "${S_CAP[$i]}")"
done

elapsed_ms() { echo $(( $(now_ms) - START_MS )); }
at() { echo "[$(secs $(( $(elapsed_ms) / 100 * 100 )))s]"; }   # "[12.3s]": when, in the output

# --------------------------------------------------------------------- running a stage
R_NAME=(); R_KIND=(); R_START=(); R_CAP=(); R_GRACE=(); R_USED=(); R_RC=(); R_NOTE=()
record() {   # record NAME KIND START_MS CAP_MS GRACE_MS USED_MS RC NOTE
    R_NAME+=("$1"); R_KIND+=("$2"); R_START+=("$3"); R_CAP+=("$4"); R_GRACE+=("$5")
    R_USED+=("$6"); R_RC+=("$7"); R_NOTE+=("$8")
}

effective_cap() {   # the cap of stage $1 now: its share of what is left before the deadline
    local i=$1 j left reserve cap
    left=$(( DEADLINE_MS - $(elapsed_ms) ))
    reserve=$(( SUMMARY_CAP + SUMMARY_GRACE + END_RESERVE ))
    if [ "${S_KIND[$i]}" = must ]; then
        for (( j = i + 1; j < ${#S_NAME[@]}; j++ )); do
            [ "${S_KIND[$j]}" = must ] && will_run "${S_NAME[$j]}" && reserve=$(( reserve + S_CAP[j] + S_GRACE[j] ))
        done
        cap=$(( MUST_STRETCH * S_CAP[i] ))
    else
        cap=${S_CAP[$i]}
    fi
    left=$(( (left - reserve - S_GRACE[i]) / 100 * 100 ))
    [ "$left" -lt "$cap" ] && cap=$left
    echo "$cap"
}

stage_cmd() {   # CMD=(...): what stage $1 runs when its cap is $2 ms
    local tl=$(( $2 * 2 / 3000 ))
    [ "$tl" -lt 1 ] && tl=1
    local bench=("$PY" -m bench --device cuda --csv "$CSV")
    local big=(--shards flickr30k --configs coop_rcar:2 --directions t2i --images 1000 --captions 5000
               --compile none --ref-captions 20 --dtype bfloat16)
    local h100=(--shards flickr30k --configs coop_rcar:2 --train --compile none --time-limit "$tl")
    local r1000=(--shards flickr30k --configs coop_rcar:2 --images 1000 --captions 1000 --compile none
                 --ref-captions 50 --backends release_loop,torch,triton,cuda --time-limit "$tl")
    case $1 in
        env) CMD=(bash "$SELF" --env-stage "$FACTS") ;;
        build) CMD=(env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$JOBS" ${CUDA_HOME_FOUND:+CUDA_HOME="$CUDA_HOME_FOUND"}
                    bash "$SELF" --build-stage) ;;
        row_*) CMD=("${bench[@]}" "${big[@]}" --backends "${1#row_}") ;;
        pytest_*) CMD=("$PY" -m pytest tests -m gpu -k "${1#pytest_}" -v -rfE --durations=5) ;;
        profile) CMD=("$PY" -m bench.profile --shape flickr30k --backends triton,cuda) ;;
        memcheck_cuda|racecheck_cuda) CMD=(env ${CUDA_HOME_FOUND:+CUDA_HOME="$CUDA_HOME_FOUND"}
                                           bash "$SELF" --sanitize-stage "${1%_cuda}" "$2") ;;
        h100_base) CMD=("${bench[@]}" "${h100[@]}" --backends reference,release_loop,torch) ;;
        h100_*) CMD=("${bench[@]}" "${h100[@]}" --backends "${1#h100_}") ;;
        r1000_fp32) CMD=("${bench[@]}" "${r1000[@]}") ;;
        r1000_bf16) CMD=("${bench[@]}" "${r1000[@]}" --dtype bfloat16) ;;
        compile) CMD=("${bench[@]}" --shards flickr30k --configs coop_rcar:2 --compile headline
                      --backends torch+compile --time-limit "$tl") ;;
        summary) CMD=(bash "$SELF" --summary-stage "$STATE/short") ;;
        *) echo "unknown stage $1" >&2; CMD=(false) ;;
    esac
}

what() {   # the header's words for a stage
    case $1 in
        row_*) echo "starting row ${1#row_}: Flickr30K 1000 x 5000, bf16, coop_rcar T=2, t2i" ;;
        pytest_*) echo "GPU tests of ${1#pytest_}" ;;
        profile) echo "kernel time vs the cost model: Flickr30K 1000 x 5000, bf16, triton and cuda" ;;
        memcheck_cuda|racecheck_cuda) echo "the cuda backend's kernels under compute-sanitizer --tool ${1%_cuda}" ;;
        h100_base) echo "100 x 100 headline + training step: reference, release_loop, torch" ;;
        h100_*) echo "100 x 100 headline + training step: ${1#h100_}" ;;
        r1000_*) echo "1000 x 1000 headline, ${1#r1000_}" ;;
        env) echo "toolchain -> env.txt" ;;
        build) echo "rcar_fast._C in place, for arch $ARCH only" ;;
        *) echo "$1" ;;
    esac
}

RC=0
run_stage() {   # run_stage NAME KIND CAP_MS GRACE_MS SIGNAL LOG: run CMD under timeout, log, record
    local name=$1 kind=$2 cap=$3 grace=$4 sig=$5 log=$6 t0 used lines
    local to=(timeout -s "$sig" -k "$(secs "$grace")" "$(secs "$cap")")
    t0=$(elapsed_ms)
    echo "== $(at) $name: $(what "$name") (cap $(secs "$cap") s): ${to[*]} ${CMD[*]}" | tee -a "$log"
    lines=$(wc -l <"$log")
    if [ "$DRY_RUN" = 1 ]; then CMD=(bash "$SELF" --stub "$name" "${CMD[@]}"); fi
    { "${to[@]}" "${CMD[@]}" >>"$log" 2>&1 </dev/null; } 2>/dev/null   # no "Killed" from bash
    RC=$?
    used=$(( $(elapsed_ms) - t0 ))
    show_tail "$log" "$lines" "$name" "$RC"
    local note=ok
    case $RC in
        0) note=ok ;;
        124) note="CUT at its cap (SIG$sig)" ;;
        137) note="KILLED: deaf to SIG$sig for the $(secs "$grace") s grace" ;;
        *) note="exit $RC" ;;
    esac
    case $name:$RC in
        pytest_*:5) note="no tests selected" ;;
        pytest_*:1) note="tests FAILED" ;;
        *check_cuda:9) note="compute-sanitizer REPORTED ERRORS (pytest.log)" ;;
        *check_cuda:7) note="no compute-sanitizer found" ;;
        *check_cuda:124) note="pytest cut 8 s before the cap (the sanitizer's summary follows it)" ;;
        *check_cuda:1) note="tests FAILED under the sanitizer" ;;
        build:2) note="build FAILED" ;;
        build:3) note="built; the cuda backend is unavailable" ;;
    esac
    echo "== $(at) $name: $note, $(secs $(( used / 100 * 100 ))) s" | tee -a "$log"
    record "$name" "$kind" "$t0" "$cap" "$grace" "$used" "$RC" "$note"
}

ROW_LINE='^\[ *[0-9.]+s\] '   # a row python -m bench measured
show_tail() {   # show_tail LOG FROM_LINE NAME RC: what of a stage's log goes to the output
    local from=$(( $2 + 1 ))
    case $3 in
        row_*|h100_*|r1000_*|compile)   # the rows; then where a cut or crashed process was
            sed -n "$from,\$p" "$1" | grep -E "$ROW_LINE|rows not run" | tail -n 12
            if [ "$4" != 0 ]; then sed -n "$from,\$p" "$1" | tail -n 6 | grep -vE "$ROW_LINE"
            else sed -n "$from,\$p" "$1" | grep 'DRY RUN'; fi ;;
        pytest_*)   # -rfE's failing tests and pytest's last line
            sed -n "$from,\$p" "$1" | grep -E '^(FAILED|ERROR) |KeyboardInterrupt|^=+ .* in [0-9.]+s|no tests ran|DRY RUN' | tail -n 30 ;;
        build)
            sed -n "$from,\$p" "$1" | grep -E '^build|error|Error|^  [a-z]+: |^rcar_fast._C|WARNING|DRY RUN' | tail -n 20 ;;
        memcheck_cuda|racecheck_cuda)   # the sanitizer's summary, failing tests, pytest's last line
            sed -n "$from,\$p" "$1" | grep -E 'ERROR SUMMARY|RACECHECK SUMMARY|^========= (Invalid|Race|Error)|^(FAILED|ERROR) |^=+ .* in [0-9.]+s|no compute-sanitizer|DRY RUN' | tail -n 20 ;;
        profile)   # the table's rows (the last backend's first), or where it stopped
            sed -n "$from,\$p" "$1" | grep -E '^\| flickr30k|Error|DRY RUN' | tail -n 30 ;;
        *)
            sed -n "$from,\$p" "$1" | grep -E 'DRY RUN' ;;
    esac
    return 0
}

# --------------------------------------------------------------------- the stages
echo "== device_suite: $ROOT -> $OUT (DEADLINE_S $DEADLINE_S$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN'))"
echo "== plan: $plan"
echo "== $rest"
[ "$plan_ms" -gt "$DEADLINE_MS" ] && echo "== WARNING: the must stages need $(secs "$plan_ms") s, more than DEADLINE_S: later ones get less"
: >"$BUILD_LOG"; : >"$BENCH_LOG"; : >"$PYTEST_LOG"; : >"$PROFILE_MD"; : >"$STATE/env.log"
if [ "$DRY_RUN" = 1 ]; then for f in $OUT_FILES; do : >>"$OUT/$f"; done; fi

# every core (nproc alone would follow OMP_NUM_THREADS)
ARCH=""; JOBS="${MAX_JOBS:-$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)}"; CUDA_HOME_FOUND=""
for i in "${!S_NAME[@]}"; do
    name=${S_NAME[$i]}
    if ! selected "$name"; then
        continue
    fi
    if needs_cuda "$name" && [ "$CUDA_OK" != 1 ]; then
        record "$name" "${S_KIND[$i]}" "$(elapsed_ms)" 0 0 0 - "skipped: no cuda backend (build.log)"
        echo "== $(at) $name: skipped, no cuda backend (build.log)"
        continue
    fi
    cap=$(effective_cap "$i")
    min=$REST_MIN; [ "${S_KIND[$i]}" = must ] && min=$MUST_MIN
    if [ "$cap" -lt "$min" ]; then
        record "$name" "${S_KIND[$i]}" "$(elapsed_ms)" 0 0 0 - "skipped: $(secs $(( cap > 0 ? cap : 0 ))) s left for it"
        echo "== $(at) $name: skipped, $(secs $(( cap > 0 ? cap : 0 ))) s left for it"
        continue
    fi
    stage_cmd "$name" "$cap"
    run_stage "$name" "${S_KIND[$i]}" "$cap" "${S_GRACE[$i]}" "${S_SIG[$i]}" "${S_LOG[$i]}"
    case $name in
        env)
            if [ "$DRY_RUN" = 1 ]; then
                printf 'DRY RUN: no toolchain queried\n' >"$ENV_TXT"
                printf 'GPU_CC=%s\nPY_VERSION=3.12.3\nEXT_SUFFIX=.cpython-312-x86_64-linux-gnu.so\n' \
                    "${DRY_COMPUTE_CAP:-9.0}" >"$FACTS"
            fi
            touch "$FACTS"
            F_GPU_CC=; F_TORCH_CC=; F_PY_VERSION=; F_EXT_SUFFIX=; F_TORCH_VERSION=; F_TORCH_CUDA=
            F_NVCC_RELEASE=; F_CUDA_HOME=
            while IFS='=' read -r k v; do
                case $k in GPU_CC|TORCH_CC|PY_VERSION|EXT_SUFFIX|TORCH_VERSION|TORCH_CUDA|NVCC_RELEASE|CUDA_HOME)
                    printf -v "F_$k" '%s' "$v" ;; esac
            done <"$FACTS"
            # one architecture: the device's own (nvidia-smi, else torch), unless set
            ARCH=${TORCH_CUDA_ARCH_LIST:-${F_GPU_CC:-$F_TORCH_CC}}
            if [ -z "$ARCH" ]; then
                ARCH=9.0
                echo "compute capability not found: building for 9.0 (H200)" >>"$ENV_TXT"
            fi
            # a 9.0 device (H100/H200) built as sm_90a, setup.py's default: the wgmma kernels
            # (csrc/cuda/wgmma.cuh) have code only there (plain 9.0 runs the wmma ones)
            [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$ARCH" = 9.0 ] && ARCH=9.0a
            CUDA_HOME_FOUND=$F_CUDA_HOME
            export PY_VERSION=$F_PY_VERSION EXT_SUFFIX=$F_EXT_SUFFIX TORCH_VERSION=$F_TORCH_VERSION \
                   NVCC_RELEASE=$F_NVCC_RELEASE
            if [ -z "$F_NVCC_RELEASE" ] || [ -z "$F_TORCH_CUDA" ] || [ "$F_TORCH_CUDA" = None ]; then
                chk="nvcc ${F_NVCC_RELEASE:-not found}, torch's CUDA ${F_TORCH_CUDA:-unknown}: NO CUDA BUILD"
            elif [ "${F_NVCC_RELEASE%%.*}" != "${F_TORCH_CUDA%%.*}" ]; then
                chk="nvcc $F_NVCC_RELEASE vs torch's CUDA $F_TORCH_CUDA: MAJOR VERSIONS DIFFER (torch's build refuses)"
            else
                chk="nvcc $F_NVCC_RELEASE, torch's CUDA $F_TORCH_CUDA: ok"
            fi
            echo "toolchain: $chk" >>"$ENV_TXT"
            echo "build: TORCH_CUDA_ARCH_LIST=$ARCH (one architecture) MAX_JOBS=$JOBS CUDA_HOME=${CUDA_HOME_FOUND:-unset}" >>"$ENV_TXT"
            cat "$ENV_TXT"
            ;;
        build)
            [ "$RC" = 0 ] && CUDA_OK=1 || CUDA_OK=0
            if [ "$RC" != 0 ] && [ "$RC" != 3 ] && [ "$DRY_RUN" != 1 ]; then
                mkdir -p "$BUILD_DIR"
                for so in rcar_fast/_C*.so; do   # stale: never benchmark the old code
                    [ -e "$so" ] && mv "$so" "$BUILD_DIR/stale_$(basename "$so")" &&
                        echo "build failed: moved the stale $so to $BUILD_DIR" | tee -a "$BUILD_LOG"
                done
                rm -f "$BUILD_DIR/stamp"
            fi
            ;;
    esac
done

# --------------------------------------------------------------------- summary, tables last
left=$(( DEADLINE_MS - $(elapsed_ms) - SUMMARY_GRACE - END_RESERVE ))
cap=$SUMMARY_CAP; [ "$left" -lt "$cap" ] && cap=$(( left > 100 ? left / 100 * 100 : 100 ))
stage_cmd summary "$cap"
run_stage summary final "$cap" "$SUMMARY_GRACE" TERM "$BENCH_LOG"

total=$(elapsed_ms)
{
    echo "device_suite stages: DEADLINE_S $DEADLINE_S, total $(secs $(( total / 100 * 100 ))) s$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN')"
    echo "plan: $plan"
    printf '%-14s %-5s %8s %7s %6s %8s %5s  %s\n' stage kind start_s cap_s kill_s used_s exit result
    for i in "${!R_NAME[@]}"; do
        if [ "${R_RC[$i]}" = - ]; then
            printf '%-14s %-5s %8s %7s %6s %8s %5s  %s\n' "${R_NAME[$i]}" "${R_KIND[$i]}" \
                "$(secs $(( R_START[i] / 100 * 100 )))" - - - - "${R_NOTE[$i]}"
        else
            printf '%-14s %-5s %8s %7s %6s %8s %5s  %s\n' "${R_NAME[$i]}" "${R_KIND[$i]}" \
                "$(secs $(( R_START[i] / 100 * 100 )))" "$(secs "${R_CAP[$i]}")" "$(secs "${R_GRACE[$i]}")" \
                "$(secs $(( R_USED[i] / 100 * 100 )))" "${R_RC[$i]}" "${R_NOTE[$i]}"
        fi
    done
} >"$STAGES_TXT"
echo
echo "== done in $(secs $(( total / 100 * 100 ))) s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo
cat "$STAGES_TXT"
echo
echo "== short table (every row of history.csv; full table: summary.md)"
if [ -s "$STATE/short" ]; then cat "$STATE/short"; else echo "(no table: see bench.log)"; fi
