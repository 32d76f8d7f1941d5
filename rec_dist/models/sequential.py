"""What every sequential recommender (GRU4Rec, SASRec, BERT4Rec, MIND, ComiRec) resolves from the schema the same way.

A next-item model reads one sequence of event item ids and scores items of
the same table (events and scored items share their embeddings), so both
features are checked once here, with errors naming the model and the knob.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rec_dist.data.schema import Schema
from rec_dist.embedding.jagged import segment_ids
from rec_dist.errors import ConfigError


@dataclass(frozen=True)
class SequenceInputs:
    """The resolved inputs: the events' feature, the scored item feature, their table's width."""

    sequence_feature: str
    item_feature: str
    table: str
    dim: int
    max_len: int | None  # the schema's max_len of the sequence feature (None when it sets none)


def resolve_sequence_inputs(schema: Schema, model: str, sequence_feature: str | None,
                            item_feature: str | None) -> SequenceInputs:
    """Defaults: the first member of the schema's first sequence group (else its only sequence feature),
    and the schema's ``item_column``. Both must read one table."""
    sequence_feature = sequence_feature or _default_sequence(schema, model)
    item_feature = item_feature or schema.extra.get("item_column") or ""
    for knob, name, kind in (("sequence_feature", sequence_feature, "sequence"),
                             ("item_feature", item_feature, "sparse")):
        if name not in schema.features or schema.features[name].kind != kind:
            raise ConfigError(f"{model}: {knob} {name!r} must name a {kind} feature of schema {schema.name!r}")
    seq_table, item_table = schema.features[sequence_feature].table, schema.features[item_feature].table
    if seq_table != item_table:
        raise ConfigError(
            f"{model}: sequence_feature {sequence_feature!r} (table {seq_table!r}) and item_feature "
            f"{item_feature!r} (table {item_table!r}) must read one table: events and scored items "
            f"share their embeddings"
        )
    dim = schema.tables[seq_table].embedding_dim  # type: ignore[index]
    return SequenceInputs(sequence_feature, item_feature, seq_table, dim, schema.features[sequence_feature].max_len)


def _default_sequence(schema: Schema, model: str) -> str:
    for members in schema.groups.values():
        if schema.features[members[0]].kind == "sequence":
            return members[0]
    sequences = [f.name for f in schema.of_kind("sequence")]
    if len(sequences) != 1:
        raise ConfigError(f"{model}: set sequence_feature; schema {schema.name!r} has sequences {sequences}")
    return sequences[0]


def append_per_row(values: torch.Tensor, offsets: torch.Tensor,
                   extra: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows with one more element at the end of each: ``(E + B, ...)`` values, ``(B+1,)`` offsets.

    ``values`` ``(E, ...)`` rows back to back, ``offsets`` ``(B+1,)``, ``extra`` ``(B, ...)`` the element
    appended to row b (BERT4Rec's tokens: a row's events, then its item or a [mask]). Differentiable in
    both inputs; works on ids and on embeddings alike.
    """
    batch, offsets = offsets.numel() - 1, offsets.long()
    new_offsets = offsets + torch.arange(batch + 1, device=offsets.device, dtype=offsets.dtype)  # (B+1,)
    rows = segment_ids(offsets, values.shape[0])  # (E,)
    moved = torch.arange(values.shape[0], device=values.device) + rows  # (E,) each event's new index
    out = values.new_zeros((values.shape[0] + batch, *values.shape[1:]))  # (E + B, ...)
    out = out.index_copy(0, moved, values).index_copy(0, new_offsets[1:] - 1, extra.to(values.dtype))
    return out, new_offsets
