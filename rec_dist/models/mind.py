"""MIND (Li et al. 2019, "Multi-Interest Network with Dynamic Routing for Recommendation at Tmall").

A user's behaviours are clustered into ``K_u = max(1, min(K, floor(log2 n_u)))``
interest capsules by B2I dynamic routing with one bilinear map shared by all
interests (``rec_dist.layers.capsule``); each capsule is concatenated with the
user's profile embedding and passed through a ReLU MLP::

    c_1..c_K  = B2I_routing(e(x_1), .., e(x_n))                 (K, D)
    v_k       = MLP([c_k ; profile])                           (K, D)     (no profile: MLP(c_k))
    training:   q = V^T softmax(p * V e(target))                label-aware attention
    serving:    score(i) = max_k v_k . e(i)

Items are scored through the embedding table the behaviours read. The
interests-collapse fixes are knobs: ``squash_power`` < 1 (sharpened squash)
and ``cosine_weight`` (a penalty on the mean pairwise cosine of a user's
interests). Protocol and shapes: ``rec_dist.models.multi_interest``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.layers.capsule import DynamicRouting
from rec_dist.layers.mlp import MLP
from rec_dist.models.base import FeatureSelection
from rec_dist.models.multi_interest import MultiInterestModel


class MIND(MultiInterestModel):
    """MIND; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature, item_feature: behaviours and scored item (one table; defaults: the
            ``history`` group's first member and the schema's ``item_column``).
        profile_features: groups or features of the user profile (None: the schema's ``user``
            group if there is one; [] for none).
        num_interests: K, the most interests.
        dynamic_interests: the per-user count that grows with the history (the paper's); False: K.
        iterations: routing iterations.
        squash_power: p of the squash in [0, 1] (1: the paper's; < 1: sharpened).
        attention_power: p of the label-aware attention (0: mean, 1: softmax, inf: argmax).
        cosine_weight: weight of the interest-cosine regulariser (0: off).
        hidden: hidden sizes of the ReLU MLP after the routing.
        dropout: of that MLP.
        routing_init_std: sigma of the fixed random routing-logit init.
    """

    model_name = "MIND"

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        profile_features: list[str] | None = None,
        num_interests: int = 4,
        dynamic_interests: bool = True,
        iterations: int = 3,
        squash_power: float = 1.0,
        attention_power: float = 1.0,
        cosine_weight: float = 0.0,
        hidden: Sequence[int] = (64,),
        dropout: float = 0.0,
        routing_init_std: float = 1.0,
    ) -> None:
        if profile_features is None:
            profile_features = ["user"] if "user" in schema.groups else []
        profile = FeatureSelection.from_schema(schema, profile_features, model="MIND: profile_features")
        super().__init__(schema, sequence_feature, item_feature, num_interests, dynamic_interests,
                         attention_power, cosine_weight, extra_features=profile.fields + profile.dense)
        if self.sequence_feature in profile.fields or self.item_feature in profile.fields:
            raise ConfigError("MIND: profile_features must not list the behaviour sequence or the scored item")
        if not 0.0 <= squash_power <= 1.0:
            raise ConfigError(f"MIND: squash_power must lie in [0, 1], got {squash_power}")
        if iterations <= 0:
            raise ConfigError(f"MIND: iterations must be positive, got {iterations}")
        self.profile = profile
        self.routing = DynamicRouting(self.dim, num_interests, self.max_len, iterations, shared_map=True,
                                      squash_power=squash_power, init_std=routing_init_std)
        in_features = self.dim + profile.flat_dim + profile.dense_dim
        self.mlp = MLP(in_features, hidden, "relu", dropout, batchnorm=False, output_dim=self.dim)

    def extract(self, events: JaggedSequence, counts: torch.Tensor, embedded: EmbeddedFeatures) -> torch.Tensor:
        capsules = self.routing(events.padded(), events.mask(), counts)  # (B, K, D)
        parts = [capsules]
        if self.profile.fields or self.profile.dense:
            profile = torch.cat([*self.profile.gather_fields(embedded), self.profile.gather_dense(embedded)], 1)
            parts.append(profile.unsqueeze(1).expand(-1, self.num_interests, -1))  # (B, K, P)
        return self.mlp(torch.cat(parts, dim=2))  # (B, K, D)
