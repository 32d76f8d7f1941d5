"""SASRec and BERT4Rec against per-row references built from the naive Transformer loop; SASRec's
causality; BERT4Rec's tokens, [mask] and query; the jagged helpers they share."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.models.bert4rec import BERT4Rec
from rec_dist.models.protocols import check_protocol, query_vectors
from rec_dist.models.sasrec import SASRec
from rec_dist.models.sequential import append_per_row
from rec_dist.tasks.masked_item import draw_mask
from tests.test_transformer import naive_encoder, naive_layer_norm
from tests.tiny_runs import tiny_synth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tiny_synth(tmp_path_factory.mktemp("synth"), num_rows=400)
    schema = Schema.load(path)
    table = pq.read_table(path.parent / "train.parquet").slice(0, 24)
    return schema, ColumnChunk.from_arrow(table, schema, "train.parquet").to_batch(schema)


def _rows(batch):
    events = batch.sequence["hist_item_id"]
    starts, lengths = events.offsets()[:-1].tolist(), events.lengths().tolist()
    assert min(lengths) == 0 < max(lengths)  # the slice has empty and non-empty histories
    return events.values(), list(zip(starts, lengths, strict=True))


def _with_events(batch, values):
    """``batch`` with other item ids in its history sequence (same lengths)."""
    kjt = batch.sequence
    changed = type(kjt)(keys=kjt.keys(), lengths=kjt.lengths(), values=torch.cat(
        [values if k == "hist_item_id" else kjt[k].values() for k in kjt.keys()]))
    return type(batch)(batch.sparse, changed, batch.dense, batch.labels)


def test_sasrec_states_match_a_per_row_reference(data):
    schema, batch = data
    torch.manual_seed(0)
    model = SASRec(schema, sequence_feature="hist_item_id", item_feature="item_id", num_heads=2,
                   dropout=0.5).eval()
    check_protocol(model, "next_item")
    table = model.embeddings.unpooled.embeddings["item"].weight  # (num_items, D)
    ids, rows = _rows(batch)
    with torch.no_grad():
        states = model.encode_sequence(batch)
        assert torch.equal(states.offsets, batch.sequence["hist_item_id"].offsets())
        for start, n in rows:
            if n:
                x = table[ids[start : start + n]] * math.sqrt(table.shape[1]) + model.positions.weight[:n]  # (n, D)
                torch.testing.assert_close(states.values[start : start + n], naive_encoder(model.encoder, x, True),
                                           atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.encode_item(batch), table[batch.ids("item_id")])


def test_sasrec_is_causal(data):
    schema, batch = data
    torch.manual_seed(0)
    model = SASRec(schema, sequence_feature="hist_item_id", item_feature="item_id").eval()
    ids, rows = _rows(batch)
    start, n = max(rows, key=lambda r: r[1])
    cut = start + n // 2  # change the events from the middle of the longest row on
    changed = ids.clone()
    changed[cut : start + n] = (changed[cut : start + n] + 1) % schema.tables["item"].num_embeddings
    with torch.no_grad():
        before, after = model.encode_sequence(batch).values, model.encode_sequence(_with_events(batch, changed)).values
    torch.testing.assert_close(before[start:cut], after[start:cut])  # states up to t never read t+1..n
    assert (before[cut : start + n] - after[cut : start + n]).abs().amax(dim=1).min() > 1e-4


def _bert_reference(model, table, tokens, masked):
    """One row's token states by the module docstring's formulas: [mask], positions, LN, encoder, W^P."""
    x = torch.where(masked.unsqueeze(1), model.mask_token, table[tokens])  # (n, D)
    x = naive_layer_norm(x + model.positions.weight[: len(tokens)], model.input_norm)
    hidden = naive_encoder(model.encoder, x, causal=False)
    first = model.project[0]
    pre = hidden @ first.weight.T + first.bias
    return 0.5 * pre * (1 + torch.erf(pre / math.sqrt(2)))  # GELU


def test_bert4rec_tokens_and_query_match_a_per_row_reference(data):
    schema, batch = data
    torch.manual_seed(0)
    model = BERT4Rec(schema, sequence_feature="hist_item_id", item_feature="item_id", dropout=0.5).eval()
    check_protocol(model, "masked_item")
    table = model.embeddings.unpooled.embeddings["item"].weight
    ids, rows = _rows(batch)
    items = batch.ids("item_id")
    masked = torch.rand(ids.numel() + len(rows)) < 0.4  # (E + B,)
    with torch.no_grad():
        states = model.encode_tokens(batch, masked)
        query = query_vectors(model, batch)  # (B, D): what evaluation scores the corpus with
        for row, (start, n) in enumerate(rows):
            tokens = torch.cat([ids[start : start + n], items[row : row + 1]])  # the row's events, then its item
            at = slice(start + row, start + row + n + 1)  # the row's tokens in the (E + B) layout
            assert states.ids[at].tolist() == tokens.tolist()
            torch.testing.assert_close(states.values[at], _bert_reference(model, table, tokens, masked[at]),
                                       atol=1e-5, rtol=1e-4)
            last_masked = torch.zeros(n + 1, dtype=torch.bool)
            last_masked[-1] = True  # the query: a [mask] after the last event, whatever the row's item
            torch.testing.assert_close(query[row], _bert_reference(model, table, tokens, last_masked)[-1],
                                       atol=1e-5, rtol=1e-4)


def test_bert4rec_reads_both_directions(data):
    schema, batch = data
    torch.manual_seed(0)
    model = BERT4Rec(schema, sequence_feature="hist_item_id", item_feature="item_id").eval()
    ids, rows = _rows(batch)
    start, n = max(rows, key=lambda r: r[1])
    changed = ids.clone()
    changed[start + n - 1] = (changed[start + n - 1] + 1) % schema.tables["item"].num_embeddings
    masked = torch.zeros(ids.numel() + len(rows), dtype=torch.bool)
    with torch.no_grad():
        before = model.encode_tokens(batch, masked).values
        after = model.encode_tokens(_with_events(batch, changed), masked).values
    row = [r[0] for r in rows].index(start)
    assert (before[start + row] - after[start + row]).abs().max() > 1e-4  # the first token sees the last


def test_append_per_row_and_draw_mask_against_loops():
    offsets = torch.tensor([0, 3, 3, 5])
    values = torch.tensor([7, 8, 9, 4, 5])
    out, new_offsets = append_per_row(values, offsets, torch.tensor([10, 11, 12]))
    assert out.tolist() == [7, 8, 9, 10, 11, 4, 5, 12] and new_offsets.tolist() == [0, 4, 5, 8]
    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([0, 1, 1, 4, 1004])  # rows of 1, 0, 3 and 1000 tokens
    masked = torch.stack([draw_mask(offsets, 0.3, generator) for _ in range(200)])  # (200, T)
    for start, stop in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True):
        if stop > start:
            assert masked[:, start:stop].any(dim=1).all()  # every non-empty row masks at least one token
    assert abs(masked[:, 4:].float().mean().item() - 0.3) < 0.01  # the long row: the drawn rate
    # One token: masked always (drawn with 0.3, else the fallback); three: 1 - 0.7^3 drawn, else the last.
    assert masked[:, 0].all()
    assert abs(masked[:, 3].float().mean().item() - (0.3 + 0.7**3)) < 0.07


def test_knobs_name_the_model(data):
    schema, _ = data
    with pytest.raises(ConfigError, match="SASRec: item_feature 'hist_item_id' must name a sparse feature"):
        SASRec(schema, sequence_feature="hist_item_id", item_feature="hist_item_id")
    with pytest.raises(ConfigError, match="BERT4Rec: num_heads 3 must divide the embedding dim"):
        BERT4Rec(schema, sequence_feature="hist_item_id", item_feature="item_id", num_heads=3)
