#!/usr/bin/env bash
# Run ON THE GPU MACHINE (the device tool), from the repository root, with .whl carried (bench/gpu/wheels.sh):
#   run(command="bash bench/gpu/run.sh", carry=[".whl"], timeout_s=540)
# Installs ray from the carried wheels, writes the 8B workload (8 adapters, ~680 MB, on that machine's
# disk), then times the 8B tsv merge through the pipeline on one GPU worker against `coremerge merge
# --device cuda` (2 runs each), checks the two give the same bytes, and compares them with the same
# merge on the CPU; then profiles one layer on the GPU (bench/gpu/profile_layer.py) and times one
# q_proj in core and full space (bench/module_speed.py). Everything it prints and the raw results
# come back under $OUT. About 4-5 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "cannot install the carried wheels (run bench/gpu/wheels.sh first)"; exit 2; }
export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
export PATH=/tmp/site/bin:$PATH  # ray's own commands
{
    nvidia-smi -L; nproc; python3 -c "import torch, ray; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'ray', ray.__version__)"
    python3 bench/pipeline_jobs.py 8b
    python3 bench/pipeline_bench.py 8b-gpu --runs 2
    python3 bench/gpu/profile_layer.py --device cuda          # what one layer spends its time on
    python3 bench/module_speed.py --device cuda --modules q_proj --methods ties,iso_c,tsv --core-repeats 5 --full-repeats 3
} 2>&1 | tee "$OUT/gpu_8b.log"
status=${PIPESTATUS[0]}
cp bench/.cache/pipeline_bench.jsonl "$OUT/" 2>/dev/null
exit "$status"
