#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool), from the repository root, with .whl carried (bench/gpu/wheels.sh):
#   run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=420)
# Installs ray from the carried wheels, writes the 8B workload (8 adapters, ~680 MB, on that machine's
# disk), then times the 8B tsv merge through the pipeline on one GPU worker against `coremerge merge
# --device cuda` (2 runs each), checks the two give the same bytes, and compares them with the same
# merge on the CPU; then profiles one layer on the GPU (bench/gpu/profile_layer.py) and times one
# q_proj in core and full space (bench/module_speed.py, one full-space run).
#
# Built to work in one try within the device budget (a rerun must still fit): every step runs under
# its own `timeout` (the whole script stays under 6 minutes), every step's exit status is recorded
# (steps.tsv) and a failed step does not stop the ones after it, and what was measured is copied to
# $OUT on every exit, a timeout or a signal included. Exit status: 0 when every step passed, else the
# first failed step's.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG="$OUT/gpu_8b.log"; STEPS="$OUT/steps.tsv"
: > "$LOG"; printf 'step\tstatus\tseconds\n' > "$STEPS"
first_failure=0

collect() {  # whatever exists, on any exit
    cp bench/.cache/pipeline_bench.jsonl "$OUT/" 2>/dev/null
    cp bench/.cache/*.json "$OUT/" 2>/dev/null
    return 0
}
trap collect EXIT
trap 'echo "run.sh: interrupted" >> "$LOG"; exit 130' INT TERM

step() {  # step NAME SECONDS COMMAND...: run under a timeout, log it, record its status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s): $*" >> "$LOG"
    timeout --kill-after=10 "$limit" "$@" >> "$LOG" 2>&1
    local status=$?
    [ "$status" -eq 124 ] && echo "=== $name: timed out after ${limit}s" >> "$LOG"
    printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$STEPS"
    if [ "$status" -ne 0 ] && [ "$first_failure" -eq 0 ]; then first_failure=$status; fi
    return "$status"
}

step install 45 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "cannot install the carried wheels (run bench/gpu/wheels.sh first)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$PATH  # ray's own commands

step machine 20 sh -c 'nvidia-smi -L; nproc; python3 -c "import torch, ray; print(\"torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \"ray\", ray.__version__)"'
step workload 60 python3 bench/pipeline_jobs.py 8b
step pipeline_vs_cli 130 python3 bench/pipeline_bench.py 8b-gpu --runs 2
step profile_layer 40 python3 bench/gpu/profile_layer.py --device cuda   # what one layer spends its time on
step module_speed 50 python3 bench/module_speed.py --device cuda --modules q_proj --methods ties,iso_c,tsv \
    --core-repeats 5 --full-repeats 1
cat "$STEPS" >> "$LOG"
exit "$first_failure"
