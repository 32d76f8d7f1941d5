"""ComiRec (Cen et al. 2020, "Controllable Multi-Interest Framework for Recommendation").

Two interest extractors over a user's behaviours ``e(x_1..x_n)``, K interests each:

- **ComiRec-DR**: dynamic routing with one map per interest (``W_k e_i``),
  routing logits starting at 0 and the predictions detached in all but the
  last iteration (``rec_dist.layers.capsule``);
- **ComiRec-SA**: self-attention, ``V = softmax(W_2 tanh(W_1 (H + P)^T)) H``
  (``rec_dist.layers.multi_interest``).

Training picks, for each row, the interest closest to its positive item
(``attention_power = inf``; a finite p gives MIND's soft label-aware
attention) and trains it with the task's sampled softmax. At serving an item
scores ``max_k v_k . e(i)``; ``rec_dist.layers.multi_interest.controllable_aggregation``
is the paper's greedy accuracy/diversity selection over the union of the
interests' top-N lists. Anti-collapse knobs as in MIND: ``squash_power``
(DR) and ``cosine_weight``.
"""

from __future__ import annotations

import torch

from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.layers.capsule import DynamicRouting, interest_mask
from rec_dist.layers.multi_interest import SelfAttentiveInterests
from rec_dist.models.multi_interest import MultiInterestModel


class ComiRecDR(MultiInterestModel):
    """ComiRec-DR; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature, item_feature: behaviours and scored item (one table).
        num_interests: K.
        iterations: routing iterations.
        squash_power: p of the squash in [0, 1] (1: the paper's; < 1: sharpened).
        attention_power: label-aware attention power in training (inf: argmax, the paper's).
        cosine_weight: weight of the interest-cosine regulariser (0: off).
        dynamic_interests: MIND's per-user interest count instead of K for everyone.
    """

    model_name = "ComiRecDR"

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        num_interests: int = 4,
        iterations: int = 3,
        squash_power: float = 1.0,
        attention_power: float = float("inf"),
        cosine_weight: float = 0.0,
        dynamic_interests: bool = False,
    ) -> None:
        super().__init__(schema, sequence_feature, item_feature, num_interests, dynamic_interests,
                         attention_power, cosine_weight)
        if not 0.0 <= squash_power <= 1.0:
            raise ConfigError(f"ComiRecDR: squash_power must lie in [0, 1], got {squash_power}")
        if iterations <= 0:
            raise ConfigError(f"ComiRecDR: iterations must be positive, got {iterations}")
        self.routing = DynamicRouting(self.dim, num_interests, self.max_len, iterations, shared_map=False,
                                      squash_power=squash_power, detach_routing=True)

    def extract(self, events: JaggedSequence, counts: torch.Tensor, embedded: EmbeddedFeatures) -> torch.Tensor:
        return self.routing(events.padded(), events.mask(), counts)  # (B, K, D)


class ComiRecSA(MultiInterestModel):
    """ComiRec-SA; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature, item_feature: behaviours and scored item (one table).
        num_interests: K.
        attention_dim: width of W_1 (None: 4 D, as the paper's code).
        positions: add trainable position embeddings (0 = most recent) before the attention.
        attention_power: label-aware attention power in training (inf: argmax, the paper's).
        cosine_weight: weight of the interest-cosine regulariser (0: off).
        dynamic_interests: MIND's per-user interest count instead of K for everyone.
    """

    model_name = "ComiRecSA"

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        num_interests: int = 4,
        attention_dim: int | None = None,
        positions: bool = True,
        attention_power: float = float("inf"),
        cosine_weight: float = 0.0,
        dynamic_interests: bool = False,
    ) -> None:
        super().__init__(schema, sequence_feature, item_feature, num_interests, dynamic_interests,
                         attention_power, cosine_weight)
        if attention_dim is not None and attention_dim <= 0:
            raise ConfigError(f"ComiRecSA: attention_dim must be positive, got {attention_dim}")
        self.extractor = SelfAttentiveInterests(self.dim, num_interests, self.max_len, attention_dim, positions)

    def extract(self, events: JaggedSequence, counts: torch.Tensor, embedded: EmbeddedFeatures) -> torch.Tensor:
        interests = self.extractor(events.padded(), events.mask())  # (B, K, D)
        return interests * interest_mask(counts, self.num_interests).unsqueeze(2)  # (B, K, D): absent interests zero
