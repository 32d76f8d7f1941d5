"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation").

Causal self-attention over a user's item sequence. With ``e(x)`` the item
embedding (one table shared by the events and the items scored, the paper's
shared output embedding), ``p_t`` a learned position embedding and
``x_1..x_n`` a row's events, oldest first::

    h^0_t      = Dropout(e(x_t) * sqrt(D) + p_t)          (E, D) over the batch's E real events
    h^l        = Block_l(h^{l-1}),  l = 1..num_blocks      causal: position t reads positions <= t
    s_t        = LN(h^L_t)                                 (pre-LN; post-LN stacks end with their own LN)
    score(i|t) = <s_t, e(i)>                               the next item after event t

The blocks are ``rec_dist.layers.transformer`` (pre-LN as in the paper's
sec. III-B by default, ``norm_first=False`` for the post-LN ablation).
The ``sqrt(D)`` scale is the authors' released code (not in the paper).
Positions count from each row's oldest event (``p_1`` for the first event
given), so a state depends on the events up to it and nothing after
(the released code left-pads to ``max_len``, which ties positions to the
row's length). Rows are padded to the batch's own longest row, never to
``max_len``; ``max_len`` sizes the position table (the schema's ``max_len``
of the sequence feature by default).

Implements the next-item protocol (``rec_dist.models.protocols``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.errors import ConfigError, RecDistError
from rec_dist.layers.transformer import TransformerEncoder
from rec_dist.models.sequential import resolve_sequence_inputs


def position_table_size(model: str, max_len: int | None, schema_max_len: int | None, feature: str) -> int:
    """``max_len`` or the schema's, with an error naming both knobs when neither is set."""
    size = max_len or schema_max_len
    if not size or size <= 0:
        raise ConfigError(f"{model}: set max_len (the longest sequence; sizes the position table): "
                          f"the schema's feature {feature!r} sets no max_len")
    return int(size)


def check_length(model: str, length: int, max_len: int, feature: str) -> None:
    """A row longer than the position table is a data / config mismatch: say which knob to raise."""
    if length > max_len:
        raise RecDistError(f"{model}: a row of {feature!r} has {length} events but max_len is {max_len}; "
                           f"raise model.init_args.model.init_args.max_len or truncate the sequences")


class SASRec(nn.Module):
    """SASRec; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature: the sequence of event item ids (default: the first member of the schema's
            first sequence group).
        item_feature: the item id feature scored as the next item; it reads the same table as
            ``sequence_feature`` (default: the schema's ``item_column``).
        num_blocks: self-attention blocks (paper: 2).
        num_heads: attention heads (paper: 1).
        dropout: on the input embeddings, attention weights and each sub-layer (paper: 0.2, 0.5 on
            sparse data).
        max_len: the longest sequence (positions); default the schema's ``max_len`` of the sequence.
        norm_first: pre-LN blocks (paper) or post-LN.
        ffn_dim: hidden width of the feed-forward part (paper: D).
    """

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        max_len: int | None = None,
        norm_first: bool = True,
        ffn_dim: int | None = None,
    ) -> None:
        super().__init__()
        inputs = resolve_sequence_inputs(schema, "SASRec", sequence_feature, item_feature)
        self.sequence_feature, self.item_feature, dim = inputs.sequence_feature, inputs.item_feature, inputs.dim
        self.max_len = position_table_size("SASRec", max_len, inputs.max_len, self.sequence_feature)
        self.input_features = (self.sequence_feature, self.item_feature)
        self.embeddings = FeatureEmbeddings(schema, features=self.input_features)
        self.scale = math.sqrt(dim)
        self.positions = nn.Embedding(self.max_len, dim)
        # Positions start on the scale of the scaled item embeddings (nn.Embedding's N(0, 1) would drown them).
        nn.init.normal_(self.positions.weight, std=schema.tables[inputs.table].init_std * self.scale)
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, ffn_dim or dim, dropout, norm_first,
                                          activation="relu", where="SASRec")

    def forward(self, batch: Batch, item_batch: Batch) -> tuple[JaggedSequence, torch.Tensor]:
        """Training entry (the task calls the model itself, so DDP sees the step)."""
        return self.encode_sequence(batch), self.encode_item(item_batch)

    def encode_sequence(self, batch: Batch) -> JaggedSequence:
        events = self.embeddings(batch, complete=True).sequences[self.sequence_feature]  # values (E, D)
        length = events.max_length  # L, this batch's longest row
        if length == 0:
            return events
        check_length("SASRec", length, self.max_len, self.sequence_feature)
        real = events.mask()  # (B, L): row-major order of the real positions is the jagged order
        hidden = events.padded() * self.scale + self.positions.weight[:length]  # (B, L, D)
        hidden = self.encoder(self.dropout(hidden), real, causal=True)  # (B, L, D)
        return events.with_values(hidden[real])  # (E, D)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        return self.embeddings(item_batch, complete=True).pooled[self.item_feature]  # (N, D)
