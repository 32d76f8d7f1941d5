"""A trial's overrides written into a Lightning CLI training config.

``apply_overrides(config, {"model.init_args.optimizer.init_args.lr": 3e-3, ...})``
returns a deep copy of a loaded training YAML with each dotted key set.

Rules (also in tune_spaces/README.md):

* Intermediate mappings are created where a key is missing or ``null``; a
  string where a ``class_path`` or ``init_args`` goes on (the short form
  ``balancer: rec_dist.balancing.PCGrad``) becomes ``{class_path: ...}``; an
  integer part indexes an existing list (``trainer.callbacks.0.init_args.patience``).
  Walking into any other value (a number, a string, a list by name) raises
  ``OverrideError`` naming the key.
* Shorter keys are applied first, so ``x.class_path`` is set before ``x.init_args.*``.
* When an override changes ``x.class_path``, the old ``x.init_args`` are kept
  only where the new class's ``__init__`` has an argument of that name (what
  the Lightning CLI / jsonargparse do on the command line): switching MMoE ->
  PLE keeps ``expert_hidden`` and drops ``num_experts``; switching DWA ->
  GradNorm drops ``temperature``. A class that cannot be imported keeps none.
  ``x.init_args.*`` overrides are applied after that, on top.
* A value that is itself a mapping replaces the old value as a whole (no merge).

``cli_overrides`` turns the Lightning CLI arguments given to every trial of a
study (``--trainer.max_epochs 2``) into such a dict, so trials and the best
config carry them in the file itself. ``write_best_config`` writes the best
trial's training config (atomically) and ``validate_training_config`` runs the
real Lightning CLI parser on a config without instantiating anything.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import json
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from rec_dist.errors import RecDistError
from rec_dist.io import atomic_file


class OverrideError(RecDistError):
    """A dotted override cannot be applied to the training config, or the CLI rejects the result."""


def load_training_config(path: str | Path) -> dict[str, Any]:
    """A training YAML as a dict (raises ``OverrideError`` naming the file)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise OverrideError(f"training config {path}: cannot read it ({err})") from err
    if not isinstance(raw, dict):
        raise OverrideError(f"training config {path}: must be a mapping, got {type(raw).__name__}")
    return raw


# What jsonargparse reads as a float but YAML 1.1 (yaml.safe_load) leaves a string: 1e-3, 5E+2.
_FLOAT_WITHOUT_DOT = re.compile(r"[-+]?\d+[eE][-+]?\d+")


def cli_overrides(args: Sequence[str]) -> dict[str, Any]:
    """``["--trainer.max_epochs", "2", "--data.init_args.batch_size=512"]`` -> ``{"trainer.max_epochs": 2,
    "data.init_args.batch_size": 512}``; values are read as YAML, as the Lightning CLI reads them (last one wins).

    Raises ``OverrideError`` for an argument that is not ``--key value`` / ``--key=value``.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise OverrideError(f"command-line override {arg!r}: expected --dotted.key VALUE or --dotted.key=VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
            i += 1
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 2
        else:
            raise OverrideError(f"command-line override {arg!r} has no value")
        if not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise OverrideError(f"command-line override {arg!r}: {key!r} is not a dotted config key (list appends "
                                f"and the like go into the config file)")
        out.pop(key, None)  # a repeated key moves to the end, where the Lightning CLI applies it last
        out[key] = _cli_value(text)
    return out


def _cli_value(text: str) -> Any:
    if _FLOAT_WITHOUT_DOT.fullmatch(text.strip()):
        return float(text)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(train_config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``train_config`` with every dotted key of ``overrides`` set (rules: module docstring)."""
    config = copy.deepcopy(dict(train_config))
    for key in sorted(overrides, key=lambda k: k.count(".")):  # stable: file order within a depth
        _set(config, key, copy.deepcopy(overrides[key]))
    return config


def _set(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    if not all(parts):
        raise OverrideError(f"override {key!r}: not a dotted key")
    node: Any = config
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            node = node[_index(node, part, key, parts[:i])]
            continue
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif isinstance(child, str) and nxt in ("class_path", "init_args"):
            child = node[part] = {"class_path": child}
        elif not isinstance(child, dict | list) or (isinstance(child, list) and not nxt.lstrip("-").isdigit()):
            raise OverrideError(
                f"override {key!r}: {'.'.join(parts[: i + 1])!r} is {_show(child)}, not a mapping, so it has no "
                f"{nxt!r}"
            )
        node = child
    last = parts[-1]
    if isinstance(node, list):
        node[_index(node, last, key, parts[:-1])] = value
        return
    if last == "class_path" and node.get("class_path") not in (None, value) and isinstance(node.get("init_args"), dict):
        accepted = _init_params(str(value))
        kept = {k: v for k, v in node["init_args"].items() if accepted is not None and k in accepted}
        if kept:
            node["init_args"] = kept
        else:
            del node["init_args"]
    node[last] = value


def _index(node: list, part: str, key: str, before: list[str]) -> int:
    try:
        i = int(part)
        node[i]
    except (ValueError, IndexError):
        raise OverrideError(f"override {key!r}: {'.'.join(before)!r} is a list of {len(node)}; {part!r} is not an "
                            f"index of it") from None
    return i


def _show(value: Any) -> str:
    text = repr(value)
    return f"a {type(value).__name__} ({text if len(text) <= 60 else text[:57] + '...'})"


@functools.cache
def _init_params(class_path: str) -> frozenset[str] | None:
    """The named ``__init__`` arguments of ``class_path``; None when it cannot be imported."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        signature = inspect.signature(cls)
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(n for n, p in signature.parameters.items() if p.kind in named)


def trial_config(train_config: Mapping[str, Any], overrides: Mapping[str, Any],
                 every_trial: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's training config: the trial's overrides, then the study's command-line ones (which win, as
    command-line arguments win over a config file)."""
    return apply_overrides(apply_overrides(train_config, overrides), every_trial)


def write_best_config(
    train_config_path: str | Path,
    overrides: Mapping[str, Any],
    out_path: str | Path,
    *,
    study: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    score: float | None = None,
    every_trial: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``train_config_path`` with ``overrides`` applied to ``out_path`` (temp file + rename).

    ``every_trial``: the study's command-line overrides (``cli_overrides``), applied after the trial's
    own, as the trial ran (``trial_config``), so fitting the file reproduces the trial.
    The header comment names the study, the metric and its score, the source
    config and every override, so the file says where it came from; the
    source's own comments are not carried over. Returns ``out_path``.
    """
    train_config_path, out_path = Path(train_config_path), Path(out_path)
    config = trial_config(load_training_config(train_config_path), overrides, every_trial or {})
    ranked = f"{metric} ({mode})" if mode else str(metric)
    header = [f"# Best trial of the rec-dist tune study {study or '?'}"]
    if metric is not None:
        header.append(f"# ranked by {ranked}" + (f": {score:.6g}" if score is not None else ""))
    header.append(f"# = {train_config_path} with these overrides:")
    header += [f"#   {k}: {json.dumps(v)}" for k, v in overrides.items()] or ["#   (none)"]
    if every_trial:
        header.append("# and these, given to every trial of the study:")
        header += [f"#   {k}: {json.dumps(v)}" for k, v in every_trial.items()]
    header.append(f"#   rec-dist fit --config {out_path}")
    text = "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)
    with atomic_file(out_path) as tmp:
        tmp.write_text(text)
    return out_path


@functools.cache
def _parse_only_cli() -> type:
    """rec_dist's LightningCLI class reduced to parsing: no seeding, no instantiation, errors raised."""
    from rec_dist.lightning_cli import build_cli_class

    class ParseOnlyCLI(build_cli_class()):
        def init_parser(self, **kwargs: Any):
            kwargs["exit_on_error"] = False
            return super().init_parser(**kwargs)

        def _set_seed(self) -> None:
            pass

        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    return ParseOnlyCLI


def validate_training_config(config: Mapping[str, Any], where: str = "training config"):
    """Parse ``config`` with the real Lightning CLI parser of ``rec-dist fit`` (types, class paths,
    ``init_args`` names) without instantiating the model, data or trainer.

    Returns the parsed jsonargparse Namespace; raises ``OverrideError`` with the parser's message.
    """
    try:
        with warnings.catch_warnings():  # "args given while sys.argv has arguments": a runner's own argv
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            return _parse_only_cli()(args=copy.deepcopy(dict(config)), run=False).config
    except Exception as err:  # jsonargparse's ArgumentError and friends
        raise OverrideError(f"{where}: the Lightning CLI rejects it:\n{err}") from err
