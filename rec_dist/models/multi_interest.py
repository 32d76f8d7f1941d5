"""What MIND and ComiRec share: the retrieval protocol for a user represented by K interests.

A multi-interest model reads a behaviour sequence (item ids sharing one table
with the scored item) and extracts ``K`` interest vectors per user (how:
``extract``, the subclass's business). The item vector is the item's
embedding ``e_i`` from that same table, so interests and items live in one
``D``-dim space.

- **Training** (``forward``): each row's interests attend to the row's
  positive item (label-aware attention with power p, MIND eq. 10; p = inf is
  ComiRec's argmax), giving one ``(B, D)`` query per row; the task's in-batch
  softmax then trains it like any two-tower query.
- **Serving / evaluation** (``encode_query``): ``(B, K, D)``. A user with
  ``K_u < K`` interests (MIND's count grows with the history) has its absent
  slots filled with a copy of its first interest, so the evaluator's
  best-interest score ``max_k v_k . e_i`` is the max over the real interests
  (a zero slot would score every item at least 0). ``interests(batch)`` also
  returns the ``(B, K)`` mask of the real ones.
- **Anti-collapse**: ``squash_power`` < 1 (routing models) and
  ``cosine_weight`` > 0, which adds ``cosine_weight x`` the mean pairwise
  cosine (each clipped at 0) of each user's interests to the training loss
  (``auxiliary_losses()``, added by ``RecTask.add_auxiliary_losses``).
  ``diagnostics()`` reports ``interest_cosine``, that mean pairwise cosine, for
  the last batch the model saw (training and evaluation), logged by the task.
"""

from __future__ import annotations

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import EmbeddedFeatures, FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError
from rec_dist.layers.capsule import interest_counts, interest_mask
from rec_dist.layers.multi_interest import fill_absent, label_aware_attention, mean_pairwise_cosine
from rec_dist.models.sequential import resolve_sequence_inputs


class MultiInterestModel(nn.Module):
    """Base of the multi-interest retrievers; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature: the behaviour sequence (default: the first member of the schema's
            ``history`` group, else its only sequence feature).
        item_feature: the scored item id (default: the schema's ``item_column``); same table as
            ``sequence_feature``.
        num_interests: K, the most interests per user.
        dynamic_interests: MIND's per-user count ``max(1, min(K, floor(log2 n)))``; False: K for all.
        attention_power: p of the label-aware attention (0: mean of the interests; ``inf``: the one
            closest to the label, as ComiRec trains).
        cosine_weight: weight of the mean-pairwise-cosine regulariser (0: off).
        extra_features: more features the subclass reads (MIND's user profile).
    """

    model_name = "MultiInterestModel"

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None,
        item_feature: str | None,
        num_interests: int,
        dynamic_interests: bool,
        attention_power: float,
        cosine_weight: float,
        extra_features: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        name = self.model_name
        self.schema = schema
        inputs = resolve_sequence_inputs(schema, name, sequence_feature or _default_sequence(schema, name),
                                         item_feature)
        self.sequence_feature, self.item_feature = inputs.sequence_feature, inputs.item_feature
        if num_interests <= 0:
            raise ConfigError(f"{name}: num_interests must be positive, got {num_interests}")
        if not attention_power >= 0:
            raise ConfigError(f"{name}: attention_power must be >= 0 (or inf), got {attention_power}")
        if not cosine_weight >= 0:
            raise ConfigError(f"{name}: cosine_weight must be >= 0, got {cosine_weight}")
        self.dim, self.max_len = inputs.dim, int(inputs.max_len or 0)
        self.num_interests, self.dynamic_interests = num_interests, dynamic_interests
        self.attention_power, self.cosine_weight = float(attention_power), float(cosine_weight)
        wanted = {self.sequence_feature, self.item_feature, *extra_features}
        self.input_features = tuple(f for f in schema.features if f in wanted)  # schema order
        self.embeddings = FeatureEmbeddings(schema, [f for f in self.input_features if schema.features[f].is_id])
        self._aux: dict[str, torch.Tensor] = {}
        self._diagnostics: dict[str, torch.Tensor] = {}

    # ---- what a subclass provides --------------------------------------------------------------------
    def extract(self, events: JaggedSequence, counts: torch.Tensor, embedded: EmbeddedFeatures) -> torch.Tensor:
        """``(B, K, D)`` interests of the behaviours ``events`` (``counts`` ``(B,)`` interests per user)."""
        raise NotImplementedError

    # ---- shared --------------------------------------------------------------------------------------
    def interests(self, batch: Batch, embedded: EmbeddedFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Interests ``(B, K, D)`` (absent ones zero) and the ``(B, K)`` mask of those each user has."""
        embedded = self.embeddings(batch, complete=True) if embedded is None else embedded
        events = embedded.sequences[self.sequence_feature]  # values (N, D)
        counts = interest_counts(events.lengths, self.num_interests, self.dynamic_interests)  # (B,)
        present = interest_mask(counts, self.num_interests)  # (B, K)
        interests = self.extract(events, counts, embedded)  # (B, K, D)
        self._diagnostics = {"interest_cosine": mean_pairwise_cosine(interests.detach(), present)}
        return interests, present

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: the label-attended query ``(B, D)`` and each row's item vector ``(B, D)``."""
        embedded = self.embeddings(batch)
        interests, present = self.interests(batch, embedded)  # (B, K, D), (B, K)
        item = embedded.pooled[self.item_feature]  # (B, D)
        query = label_aware_attention(interests, present, item, self.attention_power)  # (B, D)
        self._aux = {}
        if self.cosine_weight > 0:
            self._aux["interest_cosine"] = self.cosine_weight * mean_pairwise_cosine(interests, present, True)
        return query, item

    def encode_query(self, batch: Batch) -> torch.Tensor:
        """``(B, K, D)``: every user's interests, absent ones filled with its first interest."""
        interests, present = self.interests(batch)
        return fill_absent(interests, present)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        """``(N, D)`` item embeddings (item-table rows lack the sequence: looked up as empty)."""
        return self.embeddings(item_batch, complete=True).pooled[self.item_feature]  # (N, D)

    def auxiliary_losses(self) -> dict[str, torch.Tensor]:
        """Weighted extra training losses of the last ``forward`` (the interest-cosine regulariser)."""
        return dict(self._aux)

    def diagnostics(self) -> dict[str, torch.Tensor]:
        """Detached values about the last batch's interests: ``interest_cosine``."""
        return dict(self._diagnostics)


def _default_sequence(schema: Schema, model: str) -> str:
    history = schema.groups.get("history")
    if history and schema.features[history[0]].kind == "sequence":
        return history[0]
    sequences = [f.name for f in schema.of_kind("sequence")]
    if len(sequences) != 1:
        raise ConfigError(f"{model}: set sequence_feature; schema {schema.name!r} has sequences {sequences}")
    return sequences[0]
