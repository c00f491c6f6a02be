#!/usr/bin/env bash
# One call on the GPU machine (H200: Python 3.12, torch 2.11 cu130, triton 3.6, no network).
# Run from the repository root:   bench/device_suite.sh      (results in $OUT, default ./device_out)
#
# Stages, each under `timeout`, all inside DEADLINE_S (default 440 s, so the whole script ends
# within 8 minutes and prints what it has even when a stage hangs or fails):
#   1. pip install --no-build-isolation --no-deps -e .   (builds the extension where csrc/ has one)
#   2. python -m pytest tests -m gpu -q                  (GPU tier; exit 5 = nothing selected = ok)
#   3. python -m bench --device cuda: the 100 x 100 shards' full matrix and the training step
#      (the headline coop_rcar T=2 on Flickr30K first, then training, then the rest)
#   4. issues 4 and 5: the full Flickr30K test matrix, 1000 x 5000, coop_rcar T=2, t2i, bf16:
#      triton, cuda and torch in the same run
#   5. the headline (coop_rcar T=2, t2i and i2t) on a 1000 x 1000 Flickr-shaped shard, fp32
#   6. the same in bf16
#   7. torch+compile on the 100 x 100 headline, with what time is left (compiling takes minutes)
# Files in $OUT (at most 8 come back from the device tool): env.txt, install.log, pytest_gpu.log,
# bench.log, history.csv (every row), summary.md (the full table). The short table prints last.
# BENCH_GIT_COMMIT names the commit where the copy of the tree has no .git.
set -u

OUT="${OUT:-./device_out}"
DEADLINE_S="${DEADLINE_S:-440}"
PY="${PYTHON:-python}"
mkdir -p "$OUT"
START=$(date +%s)
CSV="$OUT/history.csv"
BLOG="$OUT/bench.log"
: >"$BLOG"

left() { echo $(( DEADLINE_S - ($(date +%s) - START) )); }
# cap STAGE_MAX RESERVE: seconds a stage may take, keeping RESERVE seconds for what follows
cap() { local l; l=$(( $(left) - $2 )); [ "$l" -gt "$1" ] && l=$1; echo "$l"; }
stage() {   # stage NAME SECONDS LOGFILE CMD...: run under timeout, log, report the exit status
    local name=$1 secs=$2 log=$3; shift 3
    if [ "$secs" -lt 20 ]; then echo "== $name: skipped (${secs}s left)" | tee -a "$log"; return 0; fi
    echo "== $name (up to ${secs}s): $*" | tee -a "$log"
    timeout -k 10 "$secs" "$@" >>"$log" 2>&1
    local rc=$?
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "== $name: timed out after ${secs}s" | tee -a "$log"
    echo "== $name: exit $rc after $(( $(date +%s) - START ))s total" | tee -a "$log"
    return "$rc"
}

# --- environment ---------------------------------------------------------------------------
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    top=$(cd /tmp && nvcc --dryrun -c x.cu 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1 || true)
    [ -n "$top" ] && export CUDA_HOME="$(realpath "$top")"
fi
export TRITON_INTERPRET=0          # real kernels here (tests/conftest.py defaults it to 1)
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
{
    echo "date: $(date -u +%FT%TZ)  host: $(hostname)  CUDA_HOME=${CUDA_HOME:-unset}"
    echo "commit: ${BENCH_GIT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
    "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
    "$PY" -c "import triton; print('triton', triton.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# --- 1. install --------------------------------------------------------------------------------
stage install "$(cap 200 250)" "$OUT/install.log" \
    "$PY" -m pip install --no-index --no-build-isolation --no-deps -e . \
    || echo "install failed: benchmarking the source tree as is (see install.log)"
"$PY" -c "import rcar_fast, torch; print('backends on cuda:', rcar_fast.available_backends(torch.device('cuda'))); print(rcar_fast.backend_status())" \
    2>&1 | tee -a "$OUT/env.txt"

# --- 2. GPU test tier --------------------------------------------------------------------------
stage "pytest -m gpu" "$(cap 90 200)" "$OUT/pytest_gpu.log" "$PY" -m pytest tests -m gpu -q
rc=$?
[ "$rc" -eq 5 ] && echo "pytest -m gpu: no GPU tests selected (exit 5), ok"
grep -v '^==' "$OUT/pytest_gpu.log" | tail -n 3

# --- 3-6. benchmarks (each stops starting rows 30 s before its timeout) --------------------------
bench() {   # bench NAME MAX_S RESERVE_S ARGS...
    local name=$1 secs; secs=$(cap "$2" "$3"); shift 3
    stage "$name" "$secs" "$BLOG" "$PY" -m bench --device cuda --csv "$CSV" \
        --time-limit $(( secs > 60 ? secs - 30 : secs / 2 )) "$@"
}
bench "bench 100x100 + train" 200 100 --train --compile none
bench "bench Flickr30K test matrix 1000x5000 bf16 (triton, cuda, torch)" 120 100 --shards flickr30k \
    --configs coop_rcar:2 --directions t2i --images 1000 --captions 5000 --compile none \
    --ref-captions 20 --dtype bfloat16 --backends triton,cuda,torch
bench "bench 1000x1000 fp32" 80 60 --shards flickr30k --configs coop_rcar:2 --images 1000 \
    --captions 1000 --compile none --ref-captions 50
bench "bench 1000x1000 bf16" 50 30 --shards flickr30k --configs coop_rcar:2 --images 1000 \
    --captions 1000 --compile none --ref-captions 50 --dtype bfloat16
bench "bench torch+compile" 150 15 --shards flickr30k --configs coop_rcar:2 --compile headline \
    --backends torch+compile

# --- summary -----------------------------------------------------------------------------------
if [ -s "$CSV" ]; then
    "$PY" -m bench --summarize "$CSV" --all-runs >"$OUT/summary.md" 2>&1
    echo
    echo "== short table ($(( $(date +%s) - START ))s; full table: $OUT/summary.md, logs: $OUT/*.log)"
    "$PY" -m bench --summarize "$CSV" --all-runs --compact
else
    echo "== no benchmark rows were written; see $BLOG"
    tail -20 "$BLOG"
fi
