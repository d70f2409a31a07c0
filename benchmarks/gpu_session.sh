#!/usr/bin/env bash
# The FLAVA speed table of benchmarks/RESULTS.md, in one run on a GPU machine (under 10 minutes).
#
#   bash benchmarks/gpu_session.sh                 # results as JSON under $OUT (or benchmarks/out/)
#   bash benchmarks/gpu_session.sh towers          # only the rows named
#   BATCH=64 STEPS=20 bash benchmarks/gpu_session.sh
#
# Order = value: the same-process baseline (vlm eager vs transformers), then the whole-step compile, then the
# whole-step compile replayed as CUDA graphs (the towers-only compile of earlier tables on request). Each row
# has its own time limit, so a slow compile costs its own row only. Needs torch, transformers, timm, lightning.
set -u
py=${PYTHON:-python3}
out=${OUT:-benchmarks/out}
mkdir -p "$out"
batch=${BATCH:-128}
common=(--device cuda --size base --batch "$batch" --steps "${STEPS:-15}" --warmup "${WARMUP:-4}")
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers, timm, lightning; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"

run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: benchmarks/flava.py ${common[*]} $*"
    timeout "$limit" "$py" benchmarks/flava.py "${common[@]}" "$@" --out "$out/$name.json" 2>&1 \
        | grep -v -e Warning -e warn -e '^W[0-9]' || echo "   ($name: no result within ${limit}s or failed)"
}

# name, time limit (s), benchmark arguments; pick rows by name: bash benchmarks/gpu_session.sh step towers
declare -A limit=([eager_vs_hf]=130 [step]=190 [step_cudagraphs]=190 [towers]=150)
declare -A extra=([eager_vs_hf]="" [step]="--compile step --skip-hf"
                  [step_cudagraphs]="--compile step --compile-mode reduce-overhead --skip-hf"
                  [towers]="--compile towers --skip-hf")
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(eager_vs_hf step step_cudagraphs)  # ~9 min with a warm inductor cache or not
for name in "${rows[@]}"; do
    [ -n "${limit[$name]+x}" ] || { echo "unknown row '$name': use ${!limit[*]}"; exit 2; }
    # shellcheck disable=SC2086  # the extra arguments are meant to split
    run "$name" "${limit[$name]}" ${extra[$name]}
done
