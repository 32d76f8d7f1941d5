"""Ray job entry point: train a rec_dist config on a Ray Train worker group.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/train.py --config configs/movielens/deepfm_torchrec.yaml --num_workers 2

Options: see ``python jobs/train.py --help``; unknown flags are Lightning CLI
overrides (``--trainer.max_epochs 3``). The job ends by printing its Ray run
directory and its final and best checkpoints (what ``jobs/evaluate.py
--ckpt_path`` takes). The logic lives in rec_dist.tune.ray_train.
"""

from rec_dist.tune.ray_train import main

if __name__ == "__main__":
    main()
