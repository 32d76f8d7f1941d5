"""What the long-sequence rankers (SIM, ETA, SDIM, TWIN) share: DIN's frame around a cheaper interest.

As in DIN (``rec_dist.models.din``) the candidate's query features pair with aligned behaviour
sequences (``q_b`` ``(B, Dq)``, events ``k_t`` ``(N, Dq)``). What differs is the user interest
``u_b`` computed from them: a search over all events and an exact attention over the k it keeps
(SIM, ETA, TWIN), or hash-collision sampling without attention (SDIM). Each subclass implements
``interest(query, history, embedded) -> (B, interest_dim)``; the rest is shared::

    logit_t = w_t · DNN([other fields; q_b; u_b; x_dense]) + b_t

"Other fields" are the remaining pooled features and the other sequences, mean-pooled. Search knobs
(top-k, hash bits, ...) are constructor arguments, so a run's config logs them to MLflow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures, FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence, concat_events
from rec_dist.errors import ConfigError
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead, pair_query_sequences


def positive(value: int, name: str, model: str) -> int:
    """``value`` after checking it is a positive int (errors name the model's knob)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{model}: {name} must be a positive integer, got {value!r}")
    return value


class LongSequenceRanker(RankingModel):
    """Base of SIM, ETA, SDIM and TWIN; see the module docstring.

    Args:
        schema, tasks, query_features, sequence_features, features: as in DIN.
        hidden, activation, dropout, batchnorm: the DNN.
        interest_dim: size of ``interest()``'s output (None: ``Dq``, the query's size).
        extra_inputs: features the subclass reads beside the pairs (e.g. a category sequence).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str],
        query_features: list[str] | None,
        sequence_features: list[str] | None,
        features: list[str] | None,
        hidden: Sequence[int],
        activation: str,
        dropout: float,
        batchnorm: bool,
        interest_dim: int | None = None,
        extra_inputs: Iterable[str] = (),
    ) -> None:
        super().__init__(schema, tasks)
        name = type(self).__name__
        self.query_features, self.sequence_features = pair_query_sequences(
            schema, query_features, sequence_features, model=name
        )
        paired = self.query_features + self.sequence_features
        extra = tuple(f for f in extra_inputs if f not in paired)
        self.selection = FeatureSelection.from_schema(schema, features, exclude=paired + extra, model=name)
        self.query_dim = sum(schema.table_of(n).embedding_dim for n in self.query_features)
        self.interest_dim = self.query_dim if interest_dim is None else interest_dim
        inputs = self.declare_inputs(self.query_features, self.sequence_features, extra, self.selection)
        self.embeddings = FeatureEmbeddings(schema, inputs)
        self.dnn = MLP(
            self.selection.flat_dim + self.query_dim + self.interest_dim + self.selection.dense_dim,
            hidden,
            activation=activation,
            dropout=dropout,
            batchnorm=batchnorm,
        )
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def check_pair(self, pair: Sequence[str] | None, knob: str) -> tuple[str, str]:
        """A ``[candidate feature, per-event sequence feature]`` knob (e.g. SIM's category), checked."""
        name = type(self).__name__
        if pair is None or isinstance(pair, str) or len(pair) != 2:
            raise ConfigError(f"{name}: {knob} must be [<candidate's sparse feature>, <its per-event sequence "
                              f"feature>], got {pair!r}")
        target, sequence = pair
        for feature, kind in ((target, ("sparse",)), (sequence, ("sequence",))):
            if feature not in self.schema.features or self.schema.features[feature].kind not in kind:
                raise ConfigError(f"{name}: {knob}: {feature!r} must be a {kind[0]} feature of schema "
                                  f"{self.schema.name!r}")
        group = self.schema.group_of(self.sequence_features[0])
        if self.schema.features[sequence].max_len != self.schema.features[self.sequence_features[0]].max_len or (
                group is not None and sequence not in self.schema.groups[group]):
            raise ConfigError(f"{name}: {knob}: {sequence!r} must be aligned with {self.sequence_features[0]!r} "
                              f"(one value per event: same max_len and sequence group)")
        return target, sequence

    def interest(self, query: torch.Tensor, history: JaggedSequence, embedded: EmbeddedFeatures) -> torch.Tensor:
        """``(B, interest_dim)`` from the query ``(B, Dq)`` and the history (values ``(N, Dq)``)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        query = torch.cat([embedded.pooled[n] for n in self.query_features], dim=1)  # (B, Dq)
        history = concat_events({n: embedded.sequences[n] for n in self.sequence_features}, type(self).__name__)
        interest = self.interest(query, history, embedded)  # (B, interest_dim)
        parts = self.selection.gather_fields(embedded)  # [(B, D_f)]
        parts += [query, interest, self.selection.gather_dense(embedded)]
        hidden = self.dnn(torch.cat(parts, dim=1))  # (B, H)
        return self.head(hidden)  # {task: (B,)}
