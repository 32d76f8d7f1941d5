"""Two-tower retrieval model (DSSM, Huang et al. 2013; YouTube DNN, Covington et al. 2016).

A query tower and an item tower map their own features to one vector space;
an item's score for a query is the inner product::

    x_q = [e_f for f in query fields; dense_q]            # (B, F_q*D + n_q)
    x_i = [e_f for f in item fields;  dense_i]            # (N, F_i*D + n_i)
    u   = MLP_q(x_q),  v = MLP_i(x_i)                     # (B, d), (N, d)
    u, v <- u / ||u||, v / ||v||                          # with normalize=True (cosine scores)
    s(q, i) = u · v                                       # (B, N)

A field ``e_f`` is a pooled id feature's embedding or a sequence's mean over
its events (YouTube DNN's averaged watch history). Both towers read one
``FeatureEmbeddings`` built over the union of their features, so a table
both sides read (the item table behind the target item and the history) is
one table. Trained with a sampled softmax over the scores
(``rec_dist.losses.sampled_softmax``); at serving the item vectors are
precomputed and searched by inner product.

``encode_item`` takes any batch holding the item features: a training
batch (each row's positive item) or an item-table batch (the corpus), which
lacks the query features; their lookups are then filled in as empty bags.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema, lookup_groups
from rec_dist.embedding.collection import EmbeddedFeatures, FeatureEmbeddings
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection


class Tower(nn.Module):
    """Fields and dense columns of one side -> MLP -> ``(B, d)``, L2-normalised when asked."""

    def __init__(
        self,
        selection: FeatureSelection,
        hidden: Sequence[int],
        output_dim: int,
        activation: str,
        dropout: float,
        batchnorm: bool,
        normalize: bool,
    ) -> None:
        super().__init__()
        self.selection = selection
        self.normalize = normalize
        in_features = selection.flat_dim + selection.dense_dim
        self.mlp = MLP(in_features, hidden, activation, dropout, batchnorm, output_dim=output_dim)

    def forward(self, embedded: EmbeddedFeatures, dense: torch.Tensor) -> torch.Tensor:
        fields = self.selection.gather_fields(embedded)  # [(B, D_f)]
        x = torch.cat([*fields, dense], dim=1)  # (B, sum D_f + n)
        out = self.mlp(x)  # (B, d)
        return F.normalize(out, dim=-1) if self.normalize else out  # (B, d)


class TwoTower(nn.Module):
    """Two-tower retrieval model; see the module docstring.

    Args:
        schema: the feature schema.
        query_features: groups or features of the query tower (None: the schema's ``user`` and
            ``context`` groups).
        item_features: groups or features of the item tower (None: the schema's ``item`` group);
            they must lie in the ``item`` group, the columns of the item table the corpus is read from.
        hidden: hidden sizes of each tower's MLP.
        output_dim: d, the width of the query and item vectors.
        activation, dropout, batchnorm: of the MLPs (``rec_dist.layers.mlp``).
        normalize: L2-normalise both vectors (scores are cosines; pair with a temperature).
    """

    def __init__(
        self,
        schema: Schema,
        query_features: list[str] | None = None,
        item_features: list[str] | None = None,
        hidden: Sequence[int] = (128,),
        output_dim: int = 64,
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.schema = schema
        name = type(self).__name__
        query_names = _default(schema, query_features, ("user", "context"), "query_features", name)
        item_names = _default(schema, item_features, ("item",), "item_features", name)
        query_sel = FeatureSelection.from_schema(schema, query_names, model=f"{name}: query_features")
        item_sel = FeatureSelection.from_schema(schema, item_names, model=f"{name}: item_features")
        query_set, item_set = set(query_sel.fields + query_sel.dense), set(item_sel.fields + item_sel.dense)
        overlap = sorted(query_set & item_set)
        if overlap:
            raise ValueError(f"{name}: features {overlap} are read by both towers; each feature belongs to one side")
        item_group = schema.groups.get("item")
        if item_group is not None and not item_set <= set(item_group):
            raise ValueError(
                f"{name}: item_features {sorted(item_set - set(item_group))} are not in the schema's item group "
                f"{list(item_group)}; the corpus pass reads only the item group from the item table"
            )
        for side, sel in (("query_features", query_sel), ("item_features", item_sel)):
            if not sel.fields and not sel.dense:
                raise ValueError(f"{name}: {side} selects no feature")
        inputs = [f for f in schema.features if f in query_set | item_set]  # schema order
        self._inputs = tuple(inputs)
        self.embeddings = FeatureEmbeddings(schema, [f for f in inputs if schema.features[f].is_id])
        self.query_tower = Tower(query_sel, hidden, output_dim, activation, dropout, batchnorm, normalize)
        self.item_tower = Tower(item_sel, hidden, output_dim, activation, dropout, batchnorm, normalize)
        self.output_dim = output_dim
        pooled, unpooled = lookup_groups(schema)
        ids = set(self.embeddings.features)
        self._sparse_keys = [f.name for f in pooled if f.name in ids]
        self._sequence_keys = [f.name for f in unpooled if f.name in ids]
        self._query_only_ids = [f for f in query_sel.fields if f not in (item_group or ())]
        # Dense layouts a batch may come in: rows read with only the model's columns (the data module's
        # default), rows holding every schema column, and item-table rows (the item group only).
        dense_of = {f.name: f.dim for f in schema.dense_features}
        item_dense = [f for f in dense_of if f in (item_group or item_set)]
        layouts = {"inputs": [f for f in dense_of if f in inputs], "full": list(dense_of), "items": item_dense}
        self._dense = {
            tower: {kind: _columns(layout, dense_of, sel.dense) for kind, layout in layouts.items()}
            for tower, sel in (("query", query_sel), ("item", item_sel))
        }

    @property
    def input_features(self) -> tuple[str, ...]:
        """Every schema feature either tower reads (schema order)."""
        return self._inputs

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Query vectors and the vectors of each row's own item, ``(B, d)`` each, from one lookup pass."""
        embedded = self.embeddings(batch)
        query = self.query_tower(embedded, self._gather(batch, "query", item_rows=False))  # (B, d)
        item = self.item_tower(embedded, self._gather(batch, "item", item_rows=False))  # (B, d)
        return query, item

    def encode_query(self, batch: Batch) -> torch.Tensor:
        """``(B, d)`` query vectors of training / evaluation rows."""
        embedded = self.embeddings(batch)
        return self.query_tower(embedded, self._gather(batch, "query", item_rows=False))  # (B, d)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        """``(N, d)`` item vectors of a training batch's items or of item-table rows."""
        item_rows = self._lacks_query_ids(item_batch)
        if item_rows:
            item_batch = self._complete(item_batch)
        embedded = self.embeddings(item_batch)
        return self.item_tower(embedded, self._gather(item_batch, "item", item_rows))  # (N, d)

    # ---- batches of item-table rows -------------------------------------------------------------
    def _lacks_query_ids(self, batch: Batch) -> bool:
        keys = set(batch.sparse.keys()) | set(batch.sequence.keys())
        return any(name not in keys for name in self._query_only_ids)

    def _complete(self, batch: Batch) -> Batch:
        """``batch`` with every id feature the embeddings look up, absent ones as empty bags (keys in
        the training batches' order, so a sharded lookup sees the layout it was built for)."""
        rows = batch.batch_size
        return Batch(
            sparse=_with_keys(batch.sparse, self._sparse_keys, rows),
            sequence=_with_keys(batch.sequence, self._sequence_keys, rows),
            dense=batch.dense,
            labels=batch.labels,
        )

    def _gather(self, batch: Batch, tower: str, item_rows: bool) -> torch.Tensor:
        """The tower's dense columns ``(B, n)``, located by the batch's dense layout."""
        dense = batch.dense  # (B, num_dense of this batch)
        width = dense.shape[1]
        kinds = ("items",) if item_rows else ("inputs", "full")
        for kind in kinds:
            total, columns = self._dense[tower][kind]
            if total == width and columns is not None:
                return dense[:, columns] if len(columns) != width else dense  # (B, n)
        raise ValueError(
            f"{type(self).__name__}: a batch with {width} dense columns matches none of the layouts this model "
            f"reads ({', '.join(k for k in kinds)}: {[self._dense[tower][k][0] for k in kinds]} columns)"
        )


def _default(
    schema: Schema, names: list[str] | None, groups: tuple[str, ...], knob: str, model: str
) -> list[str]:
    """``names`` as given, else the schema's ``groups`` that exist (at least one)."""
    if names is not None:
        return list(names)
    present = [g for g in groups if g in schema.groups]
    if not present:
        raise ValueError(
            f"{model}: schema {schema.name!r} has no {' / '.join(repr(g) for g in groups)} group; "
            f"list the features with `{knob}` (groups: {sorted(schema.groups)})"
        )
    return present


def _columns(layout: list[str], dims: dict[str, int], wanted: tuple[str, ...]) -> tuple[int, list[int] | None]:
    """(width of ``layout``, column indices of ``wanted`` in it; None when one is absent)."""
    starts, start = {}, 0
    for name in layout:
        starts[name] = start
        start += dims[name]
    if any(name not in starts for name in wanted):
        return start, None
    return start, [starts[n] + j for n in wanted for j in range(dims[n])]


def _with_keys(kjt: KeyedJaggedTensor, keys: list[str], rows: int) -> KeyedJaggedTensor:
    """``kjt`` holding ``keys`` (and its own), in ``keys`` order; a key it lacks gets ``rows`` empty bags."""
    have = kjt.keys()
    if all(k in have for k in keys):
        return kjt
    jts = kjt.to_dict()
    order = [k for k in keys] + [k for k in have if k not in keys]
    device = kjt.values().device
    values, lengths = [], []
    for key in order:
        if key in jts:
            values.append(jts[key].values())
            lengths.append(jts[key].lengths().to(torch.int32))
        else:
            values.append(torch.zeros(0, dtype=torch.int64, device=device))
            lengths.append(torch.zeros(rows, dtype=torch.int32, device=device))
    return KeyedJaggedTensor(
        keys=order, values=torch.cat(values).to(torch.int64), lengths=torch.cat(lengths)
    )
