"""Ray job entry point: a Ray Tune study, each trial a Ray Train run, every trial an MLflow child run.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/tune.py --space tune_spaces/multitask_weights.yaml --num_samples 16 \
        --tracking_uri http://mlflow:5000 --storage_path /mnt/shared/ray

Options: ``python jobs/tune.py --help``; unknown flags are Lightning CLI
overrides applied to every trial. The logic lives in rec_dist.tune.tuner.
"""

from rec_dist.tune.tuner import main

if __name__ == "__main__":
    main()
