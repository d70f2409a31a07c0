#!/usr/bin/env bash
# `make demo` over several seeds (model init, data order, masking): the README's mean and spread come from here.
#   bash benchmarks/demo_seeds.sh            # seeds 0 1 2, one run after the other (about 5 min each on 2 cores, once the tower is cached)
#   SEEDS="3 4" bash benchmarks/demo_seeds.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$root/.venv/bin/python}
out=${OUT:-$root/benchmarks/out/demo_seeds}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
for s in ${SEEDS:-0 1 2}; do
    mkdir -p "$out/seed$s"
    (cd "$out/seed$s" && "$py" -m vlm.demo --seed_everything="$s" --data.init_args.seed="$s" \
        --model.init_args.seed="$s" > demo.log 2>&1)
    grep '^RESULT' "$out/seed$s/demo.log" | sed "s/^RESULT /RESULT seed=$s /"
done
