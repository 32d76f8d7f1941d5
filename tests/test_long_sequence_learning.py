"""Short training runs of the long-sequence models on the long-range synthetic data (L = 200: every regular
log 100..200 events, each row sees >= 3/4 of it, so the planted old interest, the oldest 10 % of the log,
lies >= 65 events back and DIN over the last 50 events never sees it).

* SIM (hard search) learns the long-range interest: on the rows where only it can tell a click (regular
  users shown an item outside their preferred category) it beats DIN-last-50 by a clear margin.
* ETA, SIM (soft), SDIM and TWIN learn the planted signal (test AUC well above chance) in a shorter
  budget, and the searches of ETA, SIM (soft) and SDIM retrieve the planted events: for a candidate of
  the user's old-interest category, the events they keep (SDIM: the collisions) are of that category at
  least twice as often as the history's share. At this CPU budget their AUC on the long-range rows is
  not yet above DIN-last-50's, and TWIN's first stage still ranks by its learned age bias (it keeps
  mostly recent events), so only its learning is asserted.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from rec_dist.data.schema import Schema
from rec_dist.data.synth import user_profile
from rec_dist.embedding.jagged import concat_events
from rec_dist.layers.search import select_top_k
from rec_dist.models import DIN, ETA, SDIM, SIM, TWIN
from tests.long_sequence_helpers import auc, batches, long_range_data, old_interest_rows, scores, train

EPOCHS = 3
TRAIN_BATCHES = 30  # 7,680 training rows
SHORT_EPOCHS = 2
OTHERS = ["user_group", "item_price", "user_age_norm"]  # no user_id: the history must carry the user's tastes
SMALL = {"hidden": [32], "activation": "prelu", "features": OTHERS}
ATTENTION = {"attention_hidden": [16]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """30,000 rows; training reads the first TRAIN_BATCHES of the train split, evaluation the val and test
    splits (6,000 rows: the AUC differences asserted are several standard errors)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("long") / "data"
    full, last = long_range_data(out, 200, init_std=0.1, num_rows=30_000, num_users=700, num_items=2_000,
                                 embedding_dim=8)
    evaluate = ("val", "test")
    return {"dir": out, "full": full, "last": last,
            "train": batches(full, "train")[:TRAIN_BATCHES], "train50": batches(last, "train")[:TRAIN_BATCHES],
            "test": [b for s in evaluate for b in batches(full, s)],
            "test50": [b for s in evaluate for b in batches(last, s)],
            "rows": np.concatenate([old_interest_rows(out, s) for s in evaluate])}


@pytest.fixture(scope="module")
def din_last50(data):
    model = train(DIN(Schema.load(data["last"]), ["click"], **SMALL, **ATTENTION), data["train50"], EPOCHS)
    logits, labels = scores(model, data["test50"])
    return {"auc": auc(logits, labels), "old": auc(logits, labels, data["rows"])}


def test_sim_hard_search_learns_the_long_range_interest_din_last50_does_not(data, din_last50):
    schema = Schema.load(data["full"])
    model = SIM(schema, ["click"], search="hard", top_k=20, category_features=["item_category", "hist_category"],
                **SMALL, **ATTENTION)
    logits, labels = scores(train(model, data["train"], EPOCHS), data["test"])
    assert auc(logits, labels, data["rows"]) > din_last50["old"] + 0.03
    assert auc(logits, labels) > din_last50["auc"] + 0.01


def _old_interest_test_batch(data):
    """The first evaluation batch (val split) and which of its rows show an item of the user's old-interest category."""
    batch = data["test"][0]
    table = pq.read_table(data["dir"] / "val.parquet", columns=["user_id", "item_category"]).slice(0, batch.batch_size)
    profile = user_profile(table["user_id"].to_numpy(), data["dir"])
    chosen = profile["has_old_interest"] & (table["item_category"].to_numpy() == profile["old_interest_category"])
    return batch, torch.from_numpy(chosen)


def _category_share(model, batch, rows):
    """Among the chosen rows: (share of the events the search keeps that are of the candidate's category,
    the history's share). SDIM keeps (event, round) collisions."""
    embedded = model.embeddings(batch)
    history = concat_events({n: embedded.sequences[n] for n in model.sequence_features}, "test")
    query = torch.cat([embedded.pooled[n] for n in model.query_features], dim=1)  # (B, Dq)
    same = embedded.ids["hist_category"] == embedded.ids["item_category"].index_select(0, history.rows)  # (N,)
    in_rows = rows.index_select(0, history.rows)  # (N,)
    base = float(same[in_rows].float().mean())
    if isinstance(model, SDIM):
        hits = model.collisions(query, history)[in_rows]  # (n, m)
        return float((hits & same[in_rows].unsqueeze(1)).sum() / hits.sum()), base
    if isinstance(model, TWIN):
        kept = select_top_k(model.gsu_scores(query, history, embedded), history.offsets, model.top_k,
                            rows=history.rows)
    elif isinstance(model, ETA):
        kept = model.select(query, history)
    else:
        kept = model.select(query, history, embedded)
    index = kept.index[in_rows.index_select(0, kept.index)]
    return float(same.index_select(0, index).float().mean()), base


@pytest.mark.parametrize("name", ["eta", "sim_soft", "sdim", "twin"])
def test_search_models_learn_and_retrieve_the_planted_events(data, name):
    schema = Schema.load(data["full"])
    model = {
        "eta": lambda: ETA(schema, ["click"], top_k=20, hash_bits=32, **SMALL, **ATTENTION),
        "sim_soft": lambda: SIM(schema, ["click"], search="soft", top_k=20, **SMALL, **ATTENTION),
        "sdim": lambda: SDIM(schema, ["click"], hash_rounds=16, hash_width=3, **SMALL),
        "twin": lambda: TWIN(schema, ["click"], top_k=20, num_heads=2, head_dim=8, **SMALL),
    }[name]()
    logits, labels = scores(train(model, data["train"], SHORT_EPOCHS), data["test"])
    assert np.isfinite(logits).all()
    assert auc(logits, labels) > 0.6  # the planted signal (Bayes AUC ~0.77, ~0.70 without the old interest)
    if name == "twin":
        return  # its GSU ranks by its learned age bias at this budget (see the module docstring)
    batch, rows = _old_interest_test_batch(data)
    assert rows.sum() >= 5
    with torch.no_grad():
        kept_share, base_share = _category_share(model, batch, rows)
    assert kept_share > 2 * base_share, (kept_share, base_share)
