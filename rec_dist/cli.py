"""``rec-dist`` entry point: a light dispatcher, so ``rec-dist --help`` answers at once.

    rec-dist fit|validate|test|predict --config CONFIG.yaml   (Lightning CLI)
    rec-dist data prepare movielens-100k [--data_dir D] [--source_dir S]
    rec-dist data synth OUT_DIR [--settings.num_rows N ...]
    rec-dist export --config CONFIG.yaml --ckpt_path CKPT [--output model.pt]
    rec-dist index --model model.pt --items items.parquet --output_dir DIR [--queries test.parquet] [--kind hnsw]
    rec-dist register --run_id RUN --name NAME | --experiment EXP --metric M [--mode max] --name NAME
    rec-dist tune --space tune_spaces/X.yaml [--config C.yaml] [--num_samples 8] [--search random|optuna]
    rec-dist ray-train --config C.yaml [--num_workers 2] [--use_gpu] [--storage_path P]   (Ray Train)
"""

from __future__ import annotations

import sys

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")

HELP = """usage: rec-dist {fit,validate,test,predict,data,export} ...

Distributed trainer for recommender models (Lightning + TorchRec + Ray + MLflow).

commands:
  fit        train a model:            rec-dist fit --config configs/movielens/deepfm.yaml
  validate   evaluate on the val split: rec-dist validate --config ... --ckpt_path PATH
  test       evaluate on the test split
  predict    score the predict split
  data       prepare or synthesise data: rec-dist data prepare movielens-100k | rec-dist data synth ...
  export     one unsharded state dict for inference: rec-dist export --config X --ckpt_path CKPT --output model.pt
  index      item vectors + a FAISS index of an exported retrieval model, with its recall against exact search:
             rec-dist index --model model.pt --items data/amazon-beauty/items.parquet --output_dir index/
  register   a run's model into the MLflow registry: rec-dist register --run_id RUN --name NAME
             or the best run's: rec-dist register --experiment EXP --metric test/auc --name NAME
  tune       a Ray Tune study (ASHA; random or Optuna TPE), each trial a Ray Train run and an MLflow child run:
             rec-dist tune --space tune_spaces/multitask_weights.yaml --num_samples 8
  ray-train  a config on a Ray Train worker group (what `ray job submit ... python jobs/train.py` runs):
             rec-dist ray-train --config configs/movielens/deepfm_torchrec.yaml --num_workers 2

`rec-dist <command> --help` shows every option; `rec-dist fit --config X --print_config`
prints the fully resolved configuration. Runs are tracked in MLflow (default store
sqlite:///mlflow.db in the working directory, MLflow's own default: `mlflow ui` run there opens it).
"""


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return
    command = argv[0]
    if command == "data":
        from rec_dist.data.cli import main as data_main

        data_main(argv[1:])
    elif command == "export":
        from rec_dist.export import main as export_main

        export_main(argv[1:])
    elif command == "index":
        from rec_dist.retrieval_index import main as index_main

        index_main(argv[1:])
    elif command == "register":
        from rec_dist.tracking.model_registry import main as register_main

        register_main(argv[1:])
    elif command == "tune":
        from rec_dist.tune.tuner import main as tune_main

        tune_main(argv[1:])
    elif command == "ray-train":
        from rec_dist.tune.ray_train import main as ray_train_main

        ray_train_main(argv[1:])
    elif command in LIGHTNING_COMMANDS:
        from rec_dist.lightning_cli import run

        run(argv)
    else:
        print(f"rec-dist: unknown command {command!r}\n", file=sys.stderr)
        print(HELP, end="", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
