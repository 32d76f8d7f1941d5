"""Ray job entry point: evaluate a checkpoint (test or validation split) on a Ray Train worker group.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --config configs/movielens/deepfm_torchrec.yaml --num_workers 2 \
        --ckpt_path /mnt/shared/ray/<run>/checkpoint_000003 [--stage validate] [--run_id RUN]

``--ckpt_path`` takes a Ray checkpoint directory, a torchrec-strategy
checkpoint directory or a Lightning checkpoint file. The metrics go to MLflow
(a new run, or ``--run_id``'s).
"""

from rec_dist.tune.ray_train import evaluate_main

if __name__ == "__main__":
    evaluate_main()
