"""What a study checks before Ray starts: ``check_study(...)``.

A study that cannot work should say why at once, not after Ray has started
and every trial has failed on the same cause (a missing schema file came back
as "No best trial found for the given metric" after two minutes and a
thousand lines of log). Checked, in this order, without starting anything:

1. the training config with the study's command-line overrides parses with
   the real ``rec-dist fit`` parser (types, class paths, argument names);
2. so does one drawn trial (the space's keys fit the config);
3. the data module the config names can be built and its splits exist: a
   module that prepares its data on first use (``MovieLens100kMultiTask``)
   prepares it here, once; a missing schema or parquet file is an error that
   names the file and the command that writes it.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rec_dist.errors import RecDistError
from rec_dist.tune.overrides import apply_overrides, trial_config, validate_training_config
from rec_dist.tune.space import SearchSpace

# Datasets `rec-dist data prepare NAME` writes to data/NAME/ (rec_dist.data.cli.prepare).
PREPARED_DATASETS = ("movielens-100k", "movielens-100k-mt", "amazon-beauty")


class StudyConfigError(RecDistError):
    """The study's training config cannot run (the message names the config, the key or file, and the fix)."""


def check_study(config_path: Path, train_config: Mapping[str, Any], every_trial: Mapping[str, Any],
                space: SearchSpace, seed: int = 0) -> None:
    """Raise ``StudyConfigError`` (or the parser's ``OverrideError``) when the study cannot run; see the module."""
    where = f"training config {config_path}" + (" with the command-line overrides" if every_trial else "")
    parsed = validate_training_config(apply_overrides(train_config, every_trial), where=where)
    drawn = space.sample(seed)
    validate_training_config(trial_config(train_config, drawn, every_trial),
                             where=f"{where}, as a trial of space {space.path} draws it ({drawn})")
    check_data(parsed, where)


def check_data(parsed: Any, where: str) -> None:
    """Build the data module of a parsed config (``validate_training_config``'s result) and list its splits."""
    data = getattr(parsed, "data", None)
    if data is None or not getattr(data, "class_path", None):
        return
    module, _, name = data.class_path.rpartition(".")
    init_args = data.init_args.as_dict() if data.init_args is not None else {}
    try:
        datamodule = getattr(importlib.import_module(module), name)(**init_args)
        splits = getattr(datamodule, "splits", {})
        for split in ("train", "val"):
            if splits.get(split) is not None:
                datamodule.split_files(split)
    except (RecDistError, OSError) as err:
        raise StudyConfigError(f"{where}: data ({data.class_path}): {err}{_prepare_hint(init_args)}") from err


def _prepare_hint(init_args: Mapping[str, Any]) -> str:
    """How to write a prepared dataset the config reads from ``data/<name>/schema.yaml``, when it is one."""
    schema_path = init_args.get("schema_path")
    if not schema_path:
        return ""
    folder = Path(schema_path).parent
    if folder.name not in PREPARED_DATASETS:
        return ""
    return f"; `rec-dist data prepare {folder.name} --data_dir {folder.parent}` writes it"
