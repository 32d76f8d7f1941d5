"""Ray job entry point: evaluate a checkpoint (test or validation split) on a Ray Train worker group.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py --config configs/movielens/deepfm_torchrec.yaml --num_workers 2 \
        --ckpt_path /mnt/shared/ray/deepfm-ray [--stage validate] [--run_id RUN]

``--ckpt_path`` takes a Ray run directory (the train job prints it; its latest
checkpoint is used), a Ray checkpoint folder, a torchrec-strategy checkpoint
directory or a Lightning checkpoint file; anything else fails before the workers
start. The metrics go to MLflow (a new run, or ``--run_id``'s).
"""

from rec_dist.tune.ray_train import evaluate_main

if __name__ == "__main__":
    evaluate_main()
