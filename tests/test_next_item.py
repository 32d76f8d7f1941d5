"""Next-item protocol: GRU4Rec against a per-row loop, causality, the task's targets."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.data.columns import ColumnChunk
from rec_dist.data.schema import Schema
from rec_dist.models.gru4rec import GRU4Rec
from rec_dist.models.protocols import check_protocol, query_vectors
from rec_dist.tasks.next_item import next_targets
from tests.tiny_runs import tiny_synth


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tiny_synth(tmp_path_factory.mktemp("synth"), num_rows=400)
    schema = Schema.load(path)
    table = pq.read_table(path.parent / "train.parquet").slice(0, 24)
    return schema, ColumnChunk.from_arrow(table, schema, "train.parquet").to_batch(schema)


def _model(schema, **kwargs):
    torch.manual_seed(0)
    return GRU4Rec(schema, sequence_feature="hist_item_id", item_feature="item_id", hidden=12, **kwargs).eval()


def test_gru4rec_states_match_a_gru_run_row_by_row(data):
    schema, batch = data
    model = _model(schema, num_layers=2)
    check_protocol(model, "next_item")
    table = model.embeddings.unpooled.embeddings["item"].weight  # (num_items, D)
    events = batch.sequence["hist_item_id"]
    with torch.no_grad():
        states = model.encode_sequence(batch)
        assert states.values.shape == (events.values().numel(), table.shape[1])
        assert torch.equal(states.offsets, events.offsets())
        lengths = events.lengths().tolist()
        assert min(lengths) == 0 < max(lengths)  # the slice has empty and non-empty histories
        start = 0
        for n in lengths:
            if n:
                ids = events.values()[start : start + n]
                out, _ = model.gru(table[ids].unsqueeze(0))  # (1, n, H): one row, no padding at all
                torch.testing.assert_close(states.values[start : start + n], model.project(out[0]))
            start += n
        items = model.encode_item(batch)  # (B, D): the candidate item of each row
        torch.testing.assert_close(items, table[batch.ids("item_id")])


def test_gru4rec_is_causal(data):
    schema, batch = data
    model = _model(schema)
    events = batch.sequence["hist_item_id"]
    row = int(torch.argmax(events.lengths()))  # the longest row
    start, n = int(events.offsets()[row]), int(events.lengths()[row])
    changed_values = events.values().clone()
    changed_values[start + n - 1] = (changed_values[start + n - 1] + 1) % schema.tables["item"].num_embeddings
    changed = batch.sequence.__class__(keys=batch.sequence.keys(), values=torch.cat(
        [changed_values if k == "hist_item_id" else batch.sequence[k].values() for k in batch.sequence.keys()]),
        lengths=batch.sequence.lengths())
    altered = type(batch)(batch.sparse, changed, batch.dense, batch.labels)
    with torch.no_grad():
        before, after = model.encode_sequence(batch).values, model.encode_sequence(altered).values
    # The last event of that row changed: its state moves, every earlier state of it does not.
    torch.testing.assert_close(before[start : start + n - 1], after[start : start + n - 1])
    assert not torch.allclose(before[start + n - 1], after[start + n - 1])


def test_next_targets_and_last_states_against_a_loop(data):
    offsets = torch.tensor([0, 3, 3, 5])  # rows of 3, 0 and 2 events
    events = torch.tensor([7, 8, 9, 4, 5])
    row_items = torch.tensor([10, 11, 12])
    assert next_targets(events, offsets, row_items).tolist() == [8, 9, 10, 5, 12]
    schema, batch = data
    model = _model(schema)
    with torch.no_grad():
        states, query = model.encode_sequence(batch), query_vectors(model, batch)
    for row, (start, stop) in enumerate(zip(states.offsets[:-1].tolist(), states.offsets[1:].tolist(), strict=True)):
        expected = states.values[stop - 1] if stop > start else torch.zeros(states.values.shape[1])
        torch.testing.assert_close(query[row], expected)


def test_gru4rec_needs_one_table_for_events_and_items(data):
    schema, _ = data
    with pytest.raises(ValueError, match="GRU4Rec: sequence_feature 'hist_category' .* must read one table"):
        GRU4Rec(schema, sequence_feature="hist_category", item_feature="item_id")
    with pytest.raises(ValueError, match="GRU4Rec: item_feature 'hist_item_id' must name a sparse feature"):
        GRU4Rec(schema, sequence_feature="hist_item_id", item_feature="hist_item_id")
