"""BERT4Rec (Sun et al. 2019, "BERT4Rec: Sequential Recommendation with Bidirectional Encoder
Representations from Transformer").

A bidirectional Transformer trained by the cloze task: some items of a
sequence are replaced by a [mask] token and recovered from both sides. The
tokens of a row are its events ``x_1..x_n`` followed by one more token
(``append_per_row``): the row's own item in training, where it may be masked
like any other, and [mask] at inference, whose state predicts the next
item (the paper's "append [mask] at the end" at test time)::

    u_j        = m if token j is masked else e(x_j)       m: the learned [mask] embedding
    h^0_j      = Dropout(LN(u_j + p_j))                    (E + B, D) over the batch's tokens
    h^l        = Block_l(h^{l-1})                          bidirectional: every token reads every token
    s_j        = GELU(W^P h^L_j + b^P)                     the paper's eq. 7 projection
    score(i|j) = <s_j, e(i)>                               the item behind token j

``e`` is the item table shared by events, tokens and scored items. Post-LN
blocks as in the paper (``norm_first=True`` gives pre-LN with a final LN and
no input LN). The paper's per-item output bias ``b^O`` is left out: the
protocol's item vectors are the shared embeddings. Which tokens are masked
is decided by the task (``rec_dist.tasks.masked_item``), so a given mask
gives a deterministic state; the model applies it.

Implements the masked-item protocol (``rec_dist.models.protocols``).
"""

from __future__ import annotations

import torch
from torch import nn

from rec_dist.data.batch import Batch
from rec_dist.data.schema import Schema
from rec_dist.embedding.collection import FeatureEmbeddings
from rec_dist.embedding.jagged import JaggedSequence
from rec_dist.layers.transformer import TransformerEncoder
from rec_dist.models.sasrec import check_length, position_table_size
from rec_dist.models.sequential import append_per_row, resolve_sequence_inputs


class BERT4Rec(nn.Module):
    """BERT4Rec; see the module docstring.

    Args:
        schema: the feature schema.
        sequence_feature: the sequence of event item ids (default: the first member of the schema's
            first sequence group).
        item_feature: the row's item, appended as the last token in training and scored; it reads
            the same table as ``sequence_feature`` (default: the schema's ``item_column``).
        num_blocks: Transformer blocks (paper: 2).
        num_heads: attention heads (paper: 2).
        dropout: on the input, attention weights and each sub-layer (paper: 0.1).
        max_len: the longest event sequence (positions: ``max_len + 1`` with the appended token);
            default the schema's ``max_len`` of the sequence.
        norm_first: pre-LN blocks, or post-LN as in the paper.
        ffn_dim: hidden width of the feed-forward part (paper: 4 D).
    """

    def __init__(
        self,
        schema: Schema,
        sequence_feature: str | None = None,
        item_feature: str | None = None,
        num_blocks: int = 2,
        num_heads: int = 2,
        dropout: float = 0.1,
        max_len: int | None = None,
        norm_first: bool = False,
        ffn_dim: int | None = None,
    ) -> None:
        super().__init__()
        inputs = resolve_sequence_inputs(schema, "BERT4Rec", sequence_feature, item_feature)
        self.sequence_feature, self.item_feature, dim = inputs.sequence_feature, inputs.item_feature, inputs.dim
        self.max_len = position_table_size("BERT4Rec", max_len, inputs.max_len, self.sequence_feature)
        self.input_features = (self.sequence_feature, self.item_feature)
        self.embeddings = FeatureEmbeddings(schema, features=self.input_features)
        # [mask] and positions start on the item table's scale (nn.Embedding's N(0, 1) would drown the items).
        init_std = schema.tables[inputs.table].init_std
        self.mask_token = nn.Parameter(torch.randn(dim) * init_std)  # (D,) the [mask] embedding m
        self.positions = nn.Embedding(self.max_len + 1, dim)  # events + the appended token
        nn.init.normal_(self.positions.weight, std=init_std)
        self.input_norm = nn.Identity() if norm_first else nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(dim, num_blocks, num_heads, ffn_dim or 4 * dim, dropout, norm_first,
                                          activation="gelu", where="BERT4Rec")
        self.project = nn.Sequential(nn.Linear(dim, dim), nn.GELU())  # W^P, b^P

    def forward(self, batch: Batch, item_batch: Batch, masked: torch.Tensor) -> tuple[JaggedSequence, torch.Tensor]:
        """Training entry (the task calls the model itself, so DDP sees the step)."""
        return self.encode_tokens(batch, masked), self.encode_item(item_batch)

    def encode_tokens(self, batch: Batch, masked: torch.Tensor) -> JaggedSequence:
        """``(E + B, D)`` one state per token (events, then the row's item); ``masked`` ``(E + B,)`` bool."""
        embedded = self.embeddings(batch, complete=True)
        events = embedded.sequences[self.sequence_feature]  # values (E, D)
        tokens, offsets = append_per_row(events.values, events.offsets, embedded.pooled[self.item_feature])
        if masked.shape != (tokens.shape[0],):
            raise ValueError(f"BERT4Rec: masked must be ({tokens.shape[0]},) (one flag per token), "
                             f"got {tuple(masked.shape)}")
        tokens = torch.where(masked.unsqueeze(1), self.mask_token.to(tokens.dtype), tokens)  # (E + B, D)
        ids = None if events.ids is None else append_per_row(events.ids, events.offsets,
                                                             embedded.ids[self.item_feature])[0]
        return self._encode(JaggedSequence(tokens, offsets, ids))

    def encode_query(self, batch: Batch) -> torch.Tensor:
        """``(B, D)`` the state of a [mask] appended after each row's last event (the row's item is not read)."""
        events = self.embeddings(batch, complete=True).sequences[self.sequence_feature]  # values (E, D)
        fill = self.mask_token.to(events.values.dtype).expand(events.batch_size, -1)  # (B, D)
        tokens, offsets = append_per_row(events.values, events.offsets, fill)  # (E + B, D)
        states = self._encode(JaggedSequence(tokens, offsets))
        return states.values[offsets[1:] - 1]  # (B, D)

    def _encode(self, tokens: JaggedSequence) -> JaggedSequence:
        length = tokens.max_length  # L = longest row + 1
        if length == 0:  # a batch of no rows (evaluation pads short ranks with those)
            return tokens.with_values(self.project(tokens.values))
        check_length("BERT4Rec", length - 1, self.max_len, self.sequence_feature)
        real = tokens.mask()  # (B, L)
        hidden = self.dropout(self.input_norm(tokens.padded() + self.positions.weight[:length]))  # (B, L, D)
        hidden = self.encoder(hidden, real, causal=False)  # (B, L, D)
        return tokens.with_values(self.project(hidden[real]))  # (E + B, D)

    def encode_item(self, item_batch: Batch) -> torch.Tensor:
        return self.embeddings(item_batch, complete=True).pooled[self.item_feature]  # (N, D)
