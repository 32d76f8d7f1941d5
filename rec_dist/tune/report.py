"""The study's results table as a user reads it: one row per trial, one column per parameter.

Parameters are dotted config keys that share long prefixes
(``model.init_args.model.init_args.personalization.poso.scale``); cut to a
fixed width they all read ``model.init_ar…``. A column is therefore named by
the end of its key that tells it apart from the others (``poso_scale``,
``new_user_below``, ``balancer``); ``results.csv`` keeps the full keys.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

# Parts that say nothing about which knob a key is: the Lightning CLI's nesting and its top-level sections.
NESTING = "init_args"
CLASS = "class_path"
SECTIONS = frozenset({"model", "data", "trainer"})


def _parts(key: str) -> list[str]:
    """The key's meaningful parts: without ``init_args`` and a trailing ``class_path`` (a class names its slot)."""
    parts = [p for p in key.split(".") if p != NESTING]
    if len(parts) > 1 and parts[-1] == CLASS:
        parts = parts[:-1]
    return parts


def _short(parts: list[str], length: int) -> str:
    return "_".join(parts[-length:])


def column_names(keys: Iterable[str]) -> dict[str, str]:
    """``{key: column name}``: the key's last part, with its parent in front unless the parent is a config
    section (``poso.scale`` -> ``poso_scale``, ``data.init_args.new_user_below`` -> ``new_user_below``), and
    more parts where two keys would share a name. Keys without dots (``trial``, ``val/auc``) stay as they are."""
    keys = list(dict.fromkeys(keys))
    parts = {k: _parts(k) for k in keys}
    length = {k: 1 if len(p) < 2 or p[-2] in SECTIONS else 2 for k, p in parts.items()}
    while True:
        names: dict[str, list[str]] = {}
        for k in keys:
            names.setdefault(_short(parts[k], length[k]), []).append(k)
        clashes = [k for same in names.values() if len(same) > 1 for k in same if length[k] < len(parts[k])]
        if not clashes:
            break
        for k in clashes:
            length[k] += 1
    out = {k: _short(parts[k], length[k]) for k in keys}
    if len(set(out.values())) < len(out):  # a key that is the end of another: only the full keys differ
        out = {k: k for k in keys}
    return out


def print_results(rows: Sequence[dict[str, Any]], title: str) -> None:
    """The rows as a table (rich), parameter columns named by ``column_names``."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    names = column_names(columns)
    for column in columns:
        table.add_column(names[column], overflow="fold")
    for row in rows:
        table.add_row(*[_cell(row.get(c)) for c in columns])
    Console(width=200).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).removeprefix("rec_dist.balancing.").removeprefix("rec_dist.models.")
