"""DCN-V2 (Wang et al. 2021, "DCN V2: Improved Deep & Cross Network and Practical
Lessons for Web-scale Learning to Rank Systems").

    x_0     = [e_1; ...; e_F; x_d]                         (B, N)
    x_{l+1} = x_0 ⊙ (W_l x_l + b_l) + x_l                   cross layers, W_l = U_l V_l^T if low rank
    stacked:  h = DNN(Cross(x_0))                            (B, H)
    parallel: h = [Cross(x_0); DNN(x_0)]                     (B, N + H)
    logit_t = w_t · h + b_t

Fields are the selected pooled id features and the selected sequences,
mean-pooled; their embedding dims may differ. Output ``{task: (B,)}``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.errors import ConfigError
from rec_dist.layers.interaction import CrossNetV2
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection, RankingModel, TaskHead

STRUCTURES = ("stacked", "parallel")


class DCNv2(RankingModel):
    """DCN-V2; see the module docstring.

    Args:
        schema: the feature schema.
        tasks: label names to predict, one logit each.
        features: fields and dense features to use (None: all; see ``rec_dist.models.base``).
        num_cross_layers: number of cross layers (0: the cross network is the identity).
        low_rank: rank r of ``W_l = U_l V_l^T``; None for full-rank ``W_l``.
        structure: ``'stacked'`` (cross, then DNN) or ``'parallel'`` (cross and DNN side by side).
        hidden: DNN hidden sizes.
        activation: DNN activation (``rec_dist.layers.ACTIVATIONS``).
        dropout: DNN dropout.
        batchnorm: BatchNorm in the DNN.
    """

    def __init__(
        self,
        schema: Schema,
        tasks: Sequence[str] = ("like",),
        features: list[str] | None = None,
        num_cross_layers: int = 3,
        low_rank: int | None = None,
        structure: str = "stacked",
        hidden: Sequence[int] = (256, 128),
        activation: str = "relu",
        dropout: float = 0.0,
        batchnorm: bool = False,
    ) -> None:
        super().__init__(schema, tasks)
        if structure not in STRUCTURES:
            raise ConfigError(f"DCNv2: structure must be one of {list(STRUCTURES)}, got {structure!r}")
        self.selection = FeatureSelection.from_schema(schema, features, model="DCNv2")
        self.declare_inputs(self.selection)
        in_features = self.selection.flat_dim + self.selection.dense_dim
        if in_features == 0:
            raise ConfigError("DCNv2: `features` selects no input at all")
        self.structure = structure
        self.embeddings = FeatureEmbeddings(schema, features=self.input_features)
        self.cross = CrossNetV2(in_features, num_cross_layers, low_rank)
        self.dnn = MLP(in_features, hidden, activation=activation, dropout=dropout, batchnorm=batchnorm)
        head_in = self.dnn.output_dim + (in_features if structure == "parallel" else 0)
        self.head = TaskHead(head_in, self.tasks)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        embedded = self.embeddings(batch)
        x0 = torch.cat(
            self.selection.gather_fields(embedded) + [self.selection.gather_dense(embedded)], dim=1
        )  # (B, N)
        if self.structure == "stacked":
            hidden = self.dnn(self.cross(x0))  # (B, H)
        else:
            hidden = torch.cat([self.cross(x0), self.dnn(x0)], dim=1)  # (B, N + H)
        return self.head(hidden)  # {task: (B,)}
