"""``rec-dist export``: one unsharded state dict for inference, from any checkpoint.

A torchrec-strategy checkpoint (a directory of torch.distributed.checkpoint
shards, written by N ranks) is read back in one process into full tensors;
a single-process checkpoint (a file) is read as is. The output holds what
``load_exported`` needs to rebuild the model without the training config:

    {"model_class": "rec_dist.models.DeepFM", "model_init_args": {...}, "tasks": [...],
     "schema": {...}, "state_dict": {...}}
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

from rec_dist.data.atomic import atomic_file
from rec_dist.data.schema import Schema


def export(config: str, ckpt_path: str, output: str) -> Path:
    """Build the task from ``config`` (unsharded), load ``ckpt_path`` into it, write ``output``."""
    import torch.distributed.checkpoint as dcp

    from rec_dist.lightning_cli import build_cli_class
    from rec_dist.quiet import quiet_startup

    quiet_startup()
    cli = build_cli_class()(args=["--config", config, "--trainer.logger", "false"], run=False)
    task = cli.model
    ckpt = Path(ckpt_path)
    if ckpt.is_dir():
        state = {"state_dict": task.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))  # one process: shards are gathered into full tensors
        task.load_state_dict(state["state_dict"])
    elif ckpt.is_file():
        task.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    else:
        raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist")
    model_config = cli.config.model.init_args.model
    init_args = model_config.get("init_args")
    payload = {
        "model_class": model_config.class_path,
        "model_init_args": init_args.as_dict() if init_args is not None else {},
        "tasks": list(getattr(task.model, "tasks", [])),
        "schema": task.schema.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
    }
    out = Path(output)
    with atomic_file(out) as tmp:
        torch.save(payload, tmp)
    return out


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the exported model (plain nn.Module, eval mode) from ``export``'s file."""
    payload = torch.load(path, map_location="cpu", weights_only=False)
    module_name, _, class_name = payload["model_class"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    schema = Schema.from_dict(payload["schema"], source=str(path))
    model = model_class(schema, payload["tasks"], **payload["model_init_args"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()


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
