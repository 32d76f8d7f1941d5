"""DeepFM (Guo et al. 2017, "DeepFM: A Factorization-Machine based Neural Network for CTR Prediction").

For F fields with embeddings ``v_1..v_F`` (one shared dim D), dense features
``x_d`` and each task t::

    logit_t = b_t + y_1st + y_FM + w_t · DNN([v_1; ...; v_F; x_d])
    y_1st   = sum over the ids of the id features of a per-id scalar weight
    y_FM    = sum_{i<j} <v_i, v_j>

The FM and DNN parts share the embeddings, as in the paper. Fields are the
selected pooled id features and the selected sequences, mean-pooled (a
sequence has no first-order weight). Shapes: fields ``(B, F, D)``, DNN input
``(B, F*D + num_dense)``, output ``{task: (B,)}``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.layers.interaction import FactorizationMachine
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead


class DeepFM(RankingModel):
    """DeepFM; see the module docstring.

    Args:
        schema: the feature schema.
        tasks: label names to predict, one logit each.
        features: fields and dense features to use (None: all; see ``rec_dist.models.base``).
            All selected id and sequence features must share one embedding_dim.
        hidden: DNN hidden sizes.
        activation: DNN activation (``rec_dist.layers.ACTIVATIONS``).
        dropout: DNN dropout.
        batchnorm: BatchNorm in the DNN.
        first_order: include the first-order (linear) term. It sums the per-id
            weights of every id feature of the schema that is not a sequence,
            whatever ``features`` selects (``FeatureEmbeddings`` gives only that sum).
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        features: list[str] | None = None,
        hidden: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
        first_order: bool = True,
    ) -> None:
        super().__init__(schema, tasks)
        self.selection = FeatureSelection.from_schema(schema, features, model="DeepFM")
        dim = self.selection.check_one_dim("DeepFM")
        if first_order and features is not None:
            left_out = [f.name for f in schema.id_features if f.kind != "sequence" and f.name not in features]
            if left_out:
                warnings.warn(
                    f"DeepFM: the first-order term still sums the weights of {left_out}, which `features` "
                    f"leaves out (FeatureEmbeddings gives only the total); set first_order: false to drop it",
                    stacklevel=2,
                )
        self.use_first_order = first_order
        first_order_ids = [f.name for f in schema.id_features if f.kind != "sequence"] if first_order else None
        self.declare_inputs(self.selection, first_order_ids)
        self.embeddings = FeatureEmbeddings(schema, features=self.input_features, first_order=first_order)
        self.fm = FactorizationMachine()
        num_fields = len(self.selection.fields)
        self.dnn = MLP(
            num_fields * dim + self.selection.dense_dim,
            hidden,
            activation=activation,
            dropout=dropout,
            batchnorm=batchnorm,
        )
        self.head = TaskHead(self.dnn.output_dim, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        fields = torch.stack(self.selection.gather_fields(embedded), dim=1)  # (B, F, D)
        dense = self.selection.gather_dense(embedded)  # (B, num_dense)
        offset = self.fm(fields)  # (B,)
        if self.use_first_order and embedded.first_order is not None:
            offset = offset + embedded.first_order  # (B,)
        hidden = self.dnn(torch.cat([fields.flatten(1), dense], dim=1))  # (B, H)
        return self.head(hidden, offset)  # {task: (B,)}
