#!/bin/bash
# Two-tower on MovieLens-100k (retrieval split, full corpus, earlier items excluded), one seed (42), 3 epochs:
# in-batch softmax vs +logQ vs +mixed negatives (256 uniform) vs both vs a 512-vector cross-batch memory.
# Prints each variant's test Recall@10/50 and NDCG@10/50 (the most-popular baseline is in each run's output).
#   benchmarks/two_tower_negatives.sh [workdir]      (needs `rec-dist data prepare movielens-100k` first)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/two_tower_negatives}
mkdir -p "$work" && cd "$work" && ln -sfn "$repo/data" data
cfg=$repo/configs/movielens/two_tower_logq.yaml
run() {
  name=$1; shift
  OMP_NUM_THREADS=1 "$repo/.venv/bin/rec-dist" fit --config "$cfg" --trainer.max_epochs 3 \
    --trainer.logger.init_args.run_name "$name" --trainer.default_root_dir "$work/$name" "$@" > "$name.out" 2>&1
  echo "$name $(grep -E 'test/(recall|ndcg)_at_(10|50) ' "$name.out" | awk '{print $2, $4}' | tr '\n' ' ')"
}
run in_batch --model.init_args.logq_correction false --model.init_args.mixed_negatives 0
run logq --model.init_args.mixed_negatives 0
run mixed --model.init_args.logq_correction false
run both
run memory --model.init_args.logq_correction false --model.init_args.mixed_negatives 0 --model.init_args.memory_size 512
