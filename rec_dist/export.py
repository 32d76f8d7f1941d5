"""``rec-dist export``: one unsharded state dict for inference, from any checkpoint.

A torchrec-strategy checkpoint (a directory of torch.distributed.checkpoint
shards, written by N ranks) is read back in one process into full tensors;
a single-process checkpoint (a file) is read as is. The output holds what
``load_exported`` needs to rebuild the model without the training config
(``load_scorer(path).predict(df_or_parquet_path)`` scores rows with it, probabilities out):

    {"model_class": "rec_dist.models.DeepFM", "model_init_args": {...}, "tasks": [...] (None: not ranking),
     "schema": {...}, "state_dict": {...}}
"""

from __future__ import annotations

import sys

from rec_dist.lightning_cli import export_checkpoint as export
from rec_dist.tracking.exported import ExportedScorer, load_exported, load_scorer

__all__ = ["ExportedScorer", "export", "load_exported", "load_scorer", "main"]


def main(argv: list[str]) -> None:
    import argparse

    # jsonargparse reserves --config for config files, so this three-flag command uses argparse.
    parser = argparse.ArgumentParser(prog="rec-dist export", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training config the checkpoint came from")
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint file or a torchrec-strategy checkpoint dir")
    parser.add_argument("--output", default="model.pt", help="where to write the exported model (default model.pt)")
    args = parser.parse_args(argv)
    try:
        print(f"exported {export(args.config, args.ckpt_path, args.output)}")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
