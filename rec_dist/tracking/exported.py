"""Rebuild a model from the file ``rec_dist.export`` writes (one unsharded state dict plus how to build it).

Lives below the runners so that tracking (the MLflow pyfunc) can load exported
models without importing the CLI.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from rec_dist.data.schema import Schema
from rec_dist.io import atomic_file


def write_exported(task: nn.Module, model_config, ckpt_path: str | Path, output: str | Path) -> Path:
    """Load ``ckpt_path`` into ``task`` (built unsharded from the training config) and write ``output``.

    A torchrec-strategy checkpoint (a directory of torch.distributed.checkpoint
    shards, written by N ranks) is read back in this one process into full
    tensors; a single-process checkpoint (a file) is read as is. ``model_config``
    is the config's ``model.init_args.model`` (class_path + init_args).
    """
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt_path)
    if ckpt.is_dir():
        state = {"state_dict": task.state_dict()}
        dcp.load(state, checkpoint_id=str(ckpt))  # one process: shards are gathered into full tensors
        task.load_state_dict(state["state_dict"])
    elif ckpt.is_file():
        task.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    else:
        raise FileNotFoundError(f"--ckpt_path {ckpt} does not exist")
    init_args = model_config.get("init_args")
    payload = {
        "model_class": model_config.class_path,
        "model_init_args": init_args.as_dict() if init_args is not None else {},
        # Ranking models are built as model(schema, tasks, ...); the others as model(schema, ...).
        "tasks": list(task.model.tasks) if hasattr(task.model, "tasks") else None,
        "schema": task.schema.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in task.model.state_dict().items()},
    }
    out = Path(output)
    with atomic_file(out) as tmp:
        torch.save(payload, tmp)
    return out


def load_exported(path: str | Path) -> nn.Module:
    """Rebuild the exported model (plain nn.Module, eval mode) from ``export``'s file.

    The file holds ``model_class``, ``model_init_args``, ``tasks`` (None for models that are not
    ranking models: see ``rec_dist.models.protocols``), ``schema`` and ``state_dict``.
    """
    payload = torch.load(path, map_location="cpu", weights_only=False)
    module_name, _, class_name = payload["model_class"].rpartition(".")
    model_class = getattr(importlib.import_module(module_name), class_name)
    schema = Schema.from_dict(payload["schema"], source=str(path))
    tasks = payload.get("tasks")
    leading = (schema,) if tasks is None else (schema, tasks)
    model = model_class(*leading, **payload["model_init_args"])
    model.load_state_dict(payload["state_dict"])
    return model.eval()
