"""Sequence pooling (sum / mean / max / attention, time decay) against a naive per-row loop; the
PooledSequenceDNN model end to end against the same loop; learning a planted recent-interest signal,
which only time decay isolates; configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rec_dist.layers.pooling import SequencePooling
from rec_dist.models.pooling import PooledSequenceDNN
from tests.model_helpers import bce, randomise, ref_head, to_batch
from tests.sequence_helpers import MAX_LEN, auc, recent_interest_task, timed_rows, timed_schema
from tests.test_layers import ref_mlp


def _ref_pool(pool: SequencePooling, events: list[torch.Tensor], ages: list[float] | None,
              query: torch.Tensor | None) -> torch.Tensor:
    """One row, event by event, straight from the formulas of rec_dist.layers.pooling."""
    if not events:
        return torch.zeros(pool.dim)
    if pool.decays:
        half_life = math.exp(float(pool.log_half_life))
        weights = [2.0 ** (-a / half_life) for a in ages]
    else:
        weights = [1.0] * len(events)
    if pool.mode == "sum":
        return sum(w * e for w, e in zip(weights, events, strict=True))
    if pool.mode == "mean":
        return sum(w * e for w, e in zip(weights, events, strict=True)) / sum(weights)
    if pool.mode == "max":
        return torch.stack([w * e for w, e in zip(weights, events, strict=True)]).max(0).values
    q = pool.learned_query if query is None else pool.query_map.weight @ query
    scores = [torch.dot(q, e) / math.sqrt(pool.dim) for e in events]
    exps = [w * torch.exp(s) for w, s in zip(weights, scores, strict=True)]
    return sum(x / sum(exps) * e for x, e in zip(exps, events, strict=True))


MODES = [(m, False) for m in ("sum", "mean", "max", "attention")] + [("attention", True)]  # target: a query


@pytest.mark.parametrize(("mode", "target"), MODES)
@pytest.mark.parametrize("half_life", [None, 30.0])
def test_pooling_matches_per_row_loop(mode, target, half_life):
    torch.manual_seed(0)
    lengths = [0, 3, 1, 5]
    values = torch.randn(sum(lengths), 4)
    ages = torch.randint(0, 100, (sum(lengths),))
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    rows = torch.repeat_interleave(torch.arange(4), torch.tensor(lengths))
    query = torch.randn(4, 3) if target else None
    pool = SequencePooling(mode, 4, query_dim=3 if target else None, half_life=half_life)
    values.requires_grad_(True)
    out = pool(values, offsets, rows, ages if half_life else None, query)
    refs = []
    for b in range(4):
        a, z = offsets[b], offsets[b + 1]
        refs.append(_ref_pool(pool, list(values[a:z]), ages[a:z].tolist(), None if query is None else query[b]))
        assert_close(out[b], refs[-1], atol=1e-6, rtol=1e-5)
    weights = torch.randn(4, 4)  # the gradients agree too (segment max / sums / softmax backward)
    (grad,) = torch.autograd.grad((out * weights).sum(), values)
    (ref_grad,) = torch.autograd.grad((torch.stack(refs) * weights).sum(), values)
    assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_learned_half_life_gets_a_gradient():
    pool = SequencePooling("mean", 2, half_life=10.0, learn_decay=True)
    values, offsets, rows = torch.randn(3, 2), torch.tensor([0, 3]), torch.zeros(3, dtype=torch.long)
    pool(values, offsets, rows, torch.tensor([0, 5, 50])).sum().backward()
    assert pool.log_half_life.grad is not None and pool.log_half_life.grad != 0


def _model_reference(model: PooledSequenceDNN, rows: dict[str, list]) -> torch.Tensor:
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    xs = []
    for b in range(len(rows["item_id"])):
        hist = rows["hist_item_id"][b][-MAX_LEN:]
        genres, hours = rows["hist_genre"][b][-MAX_LEN:], rows["hist_hour"][b][-MAX_LEN:]
        events = [torch.cat([item[i], genre[g]]) for i, g in zip(hist, genres, strict=True)]
        ages = [rows["request_hour"][b] - h for h in hours]
        query = torch.cat([item[rows["item_id"][b]], genre[rows["primary_genre"][b]]])
        pooled = _ref_pool(model.pooling, events, ages, query)
        user = model.embeddings.pooled.embedding_bags["user"].weight[rows["user_id"][b]]
        xs.append(torch.cat([user, query, pooled, torch.tensor([rows["age"][b]])]))
    return ref_head(model, ref_mlp(model.dnn, torch.stack(xs)))["like"]


def test_model_matches_reference_with_target_attention_and_decay():
    schema, rows = timed_schema(), timed_rows()
    model = PooledSequenceDNN(schema, ["like"], sequence_features=["hist_item_id", "hist_genre"], pooling="attention",
                              query_features=["item_id", "primary_genre"], time_feature="hist_hour",
                              request_time_feature="request_hour", half_life=40.0, hidden=[5])
    randomise(model)
    with torch.no_grad():
        model.pooling.log_half_life.fill_(math.log(40.0))
    assert model.input_features == ("item_id", "primary_genre", "hist_item_id", "hist_genre", "user_id", "age",
                                    "hist_hour", "request_hour")
    assert "hour" not in model.embeddings.unpooled.embeddings  # times are read raw, never embedded
    assert_close(model(to_batch(schema, rows))["like"], _model_reference(model, rows))


def _train(model, batch, steps=60):
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(steps):
        optimizer.zero_grad()
        bce(model(batch), batch).backward()
        optimizer.step()
    return model.eval()


def test_time_decay_isolates_the_recent_interest():
    """The label follows the last 1-2 events' group; 8 older events of random groups come first. Time-decayed
    mean pooling learns it (held-out AUC > 0.9); plain mean pooling, drowned by the old events, does far worse."""
    schema, train = recent_interest_task(seed=0)
    _, test = recent_interest_task(seed=1)
    aucs = {}
    for half_life in (None, 5.0):
        torch.manual_seed(0)
        kwargs = {"time_feature": "hist_hour", "request_time_feature": "request_hour"} if half_life else {}
        model = PooledSequenceDNN(schema, ["like"], sequence_features=["hist_item_id"], pooling="mean",
                                  features=["item_id"], half_life=half_life, hidden=[16], **kwargs)
        model = _train(model, train)
        with torch.no_grad():
            aucs[half_life] = auc(test.labels["like"], model(test)["like"])
    assert aucs[5.0] > 0.9, aucs
    assert aucs[None] < aucs[5.0] - 0.1, aucs


def test_configuration_errors():
    schema = timed_schema()
    with pytest.raises(ValueError, match="mode 'median' is not one of"):
        PooledSequenceDNN(schema, pooling="median")
    with pytest.raises(ValueError, match="query_features are the attention's query; pooling 'mean'"):
        PooledSequenceDNN(schema, query_features=["item_id", "primary_genre"])
    with pytest.raises(ValueError, match="time_feature 'hist_genres' must name a sequence feature"):
        PooledSequenceDNN(schema, time_feature="hist_genres", request_time_feature="request_hour", half_life=1.0)
    with pytest.raises(ValueError, match="needs request_time_feature"):
        PooledSequenceDNN(schema, time_feature="hist_hour", half_life=1.0)
    with pytest.raises(ValueError, match="time decay needs both time_feature and half_life"):
        PooledSequenceDNN(schema, time_feature="hist_hour", request_time_feature="request_hour")
    with pytest.raises(ValueError, match="half_life must be positive"):
        PooledSequenceDNN(schema, time_feature="hist_hour", request_time_feature="request_hour", half_life=0.0)
