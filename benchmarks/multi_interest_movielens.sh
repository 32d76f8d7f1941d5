#!/usr/bin/env bash
# Multi-interest retrieval on MovieLens-100k (retrieval split, leave-last-out; issue 11): MIND, ComiRec-DR and
# ComiRec-SA against the single-vector two-tower trained the same way (in-batch softmax, batch 256, Adam 0.003,
# temperature 0.1, EPOCHS epochs, seed 42, the best-val-recall@10 checkpoint tested), and the mean pairwise
# cosine of the learnt interests with and without the anti-collapse options. One seed: numbers, no claims.
#   bash benchmarks/multi_interest_movielens.sh [EPOCHS]      (needs: rec-dist data prepare movielens-100k)
set -euo pipefail
EPOCHS=${1:-5}
OUT=${OUT:-/tmp/multi_interest_movielens}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
run() {  # name config extra-args...
  local name=$1 config=$2; shift 2
  local start=$SECONDS
  .venv/bin/rec-dist fit --config "$config" --trainer.max_epochs "$EPOCHS" --trainer.logger false \
    --trainer.enable_progress_bar false --trainer.default_root_dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  local metrics
  metrics=$(grep -oE "test/(recall_at_50|hit_rate_at_50|ndcg_at_10|interest_cosine) +│ +[0-9.e-]+" "$OUT/$name.log" \
    | sed -E 's/ +│ +/=/' | tr '\n' ' ')
  echo "$name ($((SECONDS - start)) s): $metrics"
}
run two_tower configs/movielens/two_tower.yaml
run mind configs/movielens/mind.yaml
run comirec_dr configs/movielens/comirec_dr.yaml
run comirec_sa configs/movielens/comirec_sa.yaml
# anti-collapse options: MIND with the paper's squash (power 1), then power 1 + the cosine regulariser
run mind_squash1 configs/movielens/mind.yaml --model.init_args.model.init_args.squash_power 1.0
run mind_squash1_cos configs/movielens/mind.yaml --model.init_args.model.init_args.squash_power 1.0 \
  --model.init_args.model.init_args.cosine_weight 0.5
run comirec_sa_cos configs/movielens/comirec_sa.yaml --model.init_args.model.init_args.cosine_weight 0.5
