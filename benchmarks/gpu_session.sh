#!/usr/bin/env bash
# The FLAVA speed table of benchmarks/RESULTS.md, in one run on a GPU machine (about 10 minutes on an H200).
#
#   bash benchmarks/gpu_session.sh                 # results as JSON under $OUT (or benchmarks/out/)
#   BATCH=64 STEPS=20 bash benchmarks/gpu_session.sh
#
# Order = value: the same-process baseline (vlm eager vs transformers), then the whole-step compile, then the
# whole-step compile replayed as CUDA graphs, then the towers-only compile of earlier tables. Each run has its
# own time limit, so a slow compile costs its own row only. Needs torch, transformers, timm, lightning.
set -u
out=${OUT:-benchmarks/out}
mkdir -p "$out"
batch=${BATCH:-128}
common=(--device cuda --size base --batch "$batch" --steps "${STEPS:-15}" --warmup "${WARMUP:-4}")
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, timm, lightning; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| timm', timm.__version__, '| lightning', lightning.__version__)"

run() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: benchmarks/flava.py ${common[*]} $*"
    timeout "$limit" python3 benchmarks/flava.py "${common[@]}" "$@" --out "$out/$name.json" 2>&1 \
        | grep -v -e Warning -e warn -e '^W[0-9]' || echo "   ($name: no result within ${limit}s or failed)"
}

run eager_vs_hf 150
run step 200 --compile step --skip-hf
run step_cudagraphs 200 --compile step --compile-mode reduce-overhead --skip-hf
run towers 150 --compile towers --skip-hf
