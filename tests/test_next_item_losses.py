"""Next-item losses against hand computations; the task's candidates per loss; bad knobs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rec_dist.data.items import ItemTable
from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses.next_item import bce_one_negative_loss, uniform_negatives_softmax_loss
from rec_dist.losses.sampled_softmax import sampled_softmax_loss
from rec_dist.models.bert4rec import BERT4Rec
from rec_dist.models.gru4rec import GRU4Rec
from rec_dist.models.sasrec import SASRec
from rec_dist.tasks.masked_item import MaskedItemTask
from rec_dist.tasks.next_item import NextItemTask
from tests.test_next_item_task import SCHEMA, successor_data

# Two states, three items (ids 5, 6, 7), d = 2; every dot product below is worked out by hand.
STATES = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
ITEMS = {5: torch.tensor([0.5, 1.0]), 6: torch.tensor([2.0, -1.0]), 7: torch.tensor([-1.0, 0.5])}
#   s_0 . (5, 6, 7) = 0.5, 2.0, -1.0        s_1 . (5, 6, 7) = 2.0, -2.0, 1.0


def _vectors(ids):
    return torch.stack([ITEMS[i] for i in ids])


def test_full_softmax_is_cross_entropy_over_every_item():
    tau = 0.5
    loss = sampled_softmax_loss(STATES, _vectors([5, 6, 7]), torch.tensor([1, 0]), temperature=tau)
    row0 = -(2.0 / tau) + math.log(math.exp(0.5 / tau) + math.exp(2.0 / tau) + math.exp(-1.0 / tau))
    row1 = -(2.0 / tau) + math.log(math.exp(2.0 / tau) + math.exp(-2.0 / tau) + math.exp(1.0 / tau))
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_sampled_softmax_with_shared_uniform_negatives_masks_accidental_hits():
    # Positives 6 (state 0) and 5 (state 1); negatives 7, 5, 7: for state 1 the 5 is its own positive.
    loss = uniform_negatives_softmax_loss(STATES, _vectors([6, 5]), torch.tensor([6, 5]), _vectors([7, 5, 7]),
                                          torch.tensor([7, 5, 7]), temperature=2.0)
    row0 = -1.0 + math.log(math.exp(1.0) + math.exp(-0.5) + math.exp(0.25) + math.exp(-0.5))
    row1 = -1.0 + math.log(math.exp(1.0) + math.exp(0.5) + math.exp(0.5))  # the hit (5) left out
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_bce_with_one_negative_is_sasrecs_loss():
    def log_sigmoid(x):
        return -math.log(1 + math.exp(-x))

    # State 0: positive 5, negative 6. State 1: positive 6, negative 6 (a hit: its negative term drops out).
    loss = bce_one_negative_loss(STATES, _vectors([5, 6]), torch.tensor([5, 6]), _vectors([6, 6]),
                                 torch.tensor([6, 6]))
    row0 = -log_sigmoid(0.5) - math.log(1 - 1 / (1 + math.exp(-2.0)))
    row1 = -log_sigmoid(-2.0)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    with pytest.raises(ValueError, match="bce: one negative per state"):
        bce_one_negative_loss(STATES, _vectors([5, 6]), torch.tensor([5, 6]), _vectors([6]), torch.tensor([6]))


@pytest.fixture(scope="module")
def schema():
    return Schema.from_dict(SCHEMA)


@pytest.fixture(scope="module")
def table(tmp_path_factory, schema):
    root = successor_data(tmp_path_factory.mktemp("successor") / "data")
    return ItemTable.load(root / "items.parquet", schema)  # items 1..40


def _task(schema, loss, **kwargs):
    return NextItemTask(lambda s: GRU4Rec(s, hidden=8), schema=schema, loss=loss, **kwargs)


def test_candidates_per_loss(schema, table):
    targets = torch.tensor([9, 3, 9, 40])
    torch.manual_seed(0)
    full = _task(schema, "full").candidates(targets, table)
    assert full.ids.tolist() == list(range(1, 41)) and full.labels.tolist() == [8, 2, 8, 39]
    batch = _task(schema, "in_batch").candidates(targets, table)
    assert batch.ids.tolist() == [3, 9, 40] and batch.labels.tolist() == [1, 0, 1, 2]
    assert batch.negatives_from is None
    sampled = _task(schema, "sampled", num_negatives=500).candidates(targets, table)
    assert sampled.ids[:3].tolist() == [3, 9, 40] and sampled.negatives_from == 3 and sampled.ids.numel() == 503
    negatives = sampled.ids[3:]
    assert set(negatives.tolist()) == set(range(1, 41))  # uniform over the item table: all 40 show up in 500
    assert negatives.float().mean().item() == pytest.approx(20.5, abs=1.5)
    bce = _task(schema, "bce").candidates(targets, table)
    assert bce.ids.numel() == 3 + 4 and bce.negatives_from == 3  # one negative per trained state


def test_next_item_loss_picks_each_states_positive(schema):
    task = _task(schema, "bce", temperature=1.0)
    targets = torch.tensor([6, 5])
    from rec_dist.tasks.next_item import Candidates

    candidates = Candidates(torch.tensor([5, 6, 6, 6]), torch.tensor([1, 0]), negatives_from=2)
    items = _vectors(candidates.ids.tolist())
    expected = bce_one_negative_loss(STATES, _vectors([6, 5]), targets, _vectors([6, 6]), torch.tensor([6, 6]))
    assert task.next_item_loss(STATES, items, targets, candidates).item() == pytest.approx(expected.item())
    full = Candidates(torch.tensor([5, 6, 7]), torch.tensor([1, 0]))
    logits = STATES @ _vectors([5, 6, 7]).T
    assert task.next_item_loss(STATES, _vectors([5, 6, 7]), targets, full).item() == pytest.approx(
        F.cross_entropy(logits, torch.tensor([1, 0])).item())


def test_bad_knobs_raise_config_errors(schema):
    def gru(s):
        return GRU4Rec(s, hidden=8)

    with pytest.raises(ConfigError, match="model.init_args.loss must be one of"):
        NextItemTask(gru, schema=schema, loss="softmax")
    with pytest.raises(ConfigError, match="model.init_args.num_negatives must be positive for loss: sampled"):
        NextItemTask(gru, schema=schema, loss="sampled", num_negatives=0)
    with pytest.raises(ConfigError, match="model.init_args.mask_prob must be in"):
        MaskedItemTask(lambda s: BERT4Rec(s), schema=schema, mask_prob=0.0)
    with pytest.raises(TypeError, match="SASRec is not a masked_item model"):
        MaskedItemTask(lambda s: SASRec(s), schema=schema)
    with pytest.raises(TypeError, match="BERT4Rec is not a next_item model"):
        NextItemTask(lambda s: BERT4Rec(s), schema=schema)
