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
lacks the query features (``FeatureEmbeddings(..., complete=True)`` looks
them up as empty bags).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures, FeatureEmbeddings
from rec_dist.errors import ConfigError
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

    def forward(self, embedded: EmbeddedFeatures) -> torch.Tensor:
        fields = self.selection.gather_fields(embedded)  # [(B, D_f)]
        x = torch.cat([*fields, self.selection.gather_dense(embedded)], dim=1)  # (B, sum D_f + n)
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
            raise ConfigError(f"{name}: features {overlap} are read by both towers; each feature belongs to one side")
        item_group = schema.groups.get("item")
        if item_group is not None and not item_set <= set(item_group):
            raise ConfigError(
                f"{name}: item_features {sorted(item_set - set(item_group))} are not in the schema's item group "
                f"{list(item_group)}; the corpus pass reads only the item group from the item table"
            )
        for side, sel in (("query_features", query_sel), ("item_features", item_sel)):
            if not sel.fields and not sel.dense:
                raise ConfigError(f"{name}: {side} selects no feature")
        inputs = [f for f in schema.features if f in query_set | item_set]  # schema order
        self._inputs = tuple(inputs)
        self.embeddings = FeatureEmbeddings(schema, [f for f in inputs if schema.features[f].is_id])
        self.query_tower = Tower(query_sel, hidden, output_dim, activation, dropout, batchnorm, normalize)
        self.item_tower = Tower(item_sel, hidden, output_dim, activation, dropout, batchnorm, normalize)
        self.output_dim = output_dim

    @property
    def input_features(self) -> tuple[str, ...]:
        """Every schema feature either tower reads (schema order)."""
        return self._inputs

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Query vectors and the vectors of each row's own item, ``(B, d)`` each, from one lookup pass."""
        embedded = self.embeddings(batch)
        return self.query_tower(embedded), self.item_tower(embedded)  # (B, d), (B, d)

    def encode_query(self, batch: Batch) -> torch.Tensor:
        """``(B, d)`` query vectors of training / evaluation rows."""
        return self.query_tower(self.embeddings(batch))  # (B, d)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        """``(N, d)`` item vectors of a training batch's items or of item-table rows (which lack the
        query features: those are looked up as empty bags)."""
        return self.item_tower(self.embeddings(item_batch, complete=True))  # (N, d)


def _default(
    schema: Schema, names: list[str] | None, groups: tuple[str, ...], knob: str, model: str
) -> list[str]:
    """``names`` as given, else the schema's ``groups`` that exist (at least one)."""
    if names is not None:
        return list(names)
    present = [g for g in groups if g in schema.groups]
    if not present:
        raise ConfigError(
            f"{model}: schema {schema.name!r} has no {' / '.join(repr(g) for g in groups)} group; "
            f"list the features with `{knob}` (groups: {sorted(schema.groups)})"
        )
    return present
