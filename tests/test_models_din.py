"""DIN against a hand-computed reference (attention over the history, then the DNN), its default
query / sequence pairing and its configuration errors. The tests shared with DeepFM and DCN-V2
(gradients, learning, common configuration errors) are in ``test_models_deepfm_dcnv2``.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rec_dist.models import DIN
from tests.model_helpers import (
    ALL_DENSE,
    MAX_LEN,
    SEQ_TABLE_DIM,
    randomise,
    ref_fields,
    ref_head,
    to_batch,
    toy_rows,
    toy_schema,
)
from tests.test_layers import ref_attention, ref_mlp


def _din_reference(model: DIN, rows: dict[str, list], train: bool) -> dict[str, torch.Tensor]:
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    per_sample = [ref_fields(model, rows, b) for b in range(6)]
    query = torch.stack([torch.cat([s["item_id"], s["primary_genre"]]) for s in per_sample])  # (B, 8)
    keys = torch.zeros(6, MAX_LEN, 2 * SEQ_TABLE_DIM)
    lengths = []
    for b in range(6):
        hist, hist_genre = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        for t, (i, g) in enumerate(zip(hist, hist_genre, strict=True)):
            keys[b, t] = torch.cat([item[i], genre[g]])
        lengths.append(len(hist))
    interest = ref_attention(model.attention, query, keys, lengths, train=train)  # (B, 8)
    others = ["user_id", "tags", "genres"]  # the pooled features that are not queries, schema order
    x = torch.stack(
        [
            torch.cat([s[f] for f in others] + [query[b], interest[b]] + [s[f] for f in ALL_DENSE])
            for b, s in enumerate(per_sample)
        ]
    )
    return ref_head(model, ref_mlp(model.dnn, x, train=train))


@pytest.mark.parametrize("activation", ["dice", "prelu"])
@pytest.mark.parametrize("softmax", [False, True])
def test_din_matches_reference(activation, softmax):
    schema = toy_schema()
    rows = toy_rows()
    model = DIN(
        schema,
        tasks=["like"],
        query_features=["item_id", "primary_genre"],
        sequence_features=["hist_item_id", "hist_genre"],
        attention_hidden=[6, 4],
        hidden=[5, 3],
        activation=activation,
        attention_softmax=softmax,
    )
    randomise(model)
    batch = to_batch(schema, rows)
    model.train()  # batch statistics: attention over real positions only, DNN over the batch
    assert_close(model(batch)["like"], _din_reference(model, rows, train=True)["like"])
    model.eval()  # running statistics
    assert_close(model(batch)["like"], _din_reference(model, rows, train=False)["like"])


def test_din_pairs_sequences_with_their_tables_by_default():
    model = DIN(toy_schema())
    assert model.query_features == ("item_id", "primary_genre")
    assert model.sequence_features == ("hist_item_id", "hist_genre")
    assert model.selection.fields == ("user_id", "tags", "genres")


def test_din_configuration_errors():
    schema = toy_schema()
    with pytest.raises(ValueError, match="same length"):
        DIN(schema, query_features=["item_id", "primary_genre"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="give both"):
        DIN(schema, query_features=["item_id"])
    with pytest.raises(ValueError, match=r"unknown features \['movie_id'\]"):
        DIN(schema, query_features=["movie_id"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="must be of kind sequence"):
        DIN(schema, query_features=["item_id"], sequence_features=["genres"])
    with pytest.raises(ValueError, match="must be sparse or multi_hot"):
        DIN(schema, query_features=["hist_genre"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match=r"'user_id' \(table 'user', dim 8\).*same embedding_dim"):
        DIN(toy_schema(user_dim=8), query_features=["user_id"], sequence_features=["hist_item_id"])
    with pytest.raises(ValueError, match="share one max_len"):
        DIN(toy_schema(hist_genre_len=3))
    with pytest.raises(ValueError, match="already used elsewhere"):
        DIN(schema, features=["user_id", "item_id"])
