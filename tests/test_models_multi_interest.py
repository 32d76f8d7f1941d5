"""MIND, ComiRec-DR and ComiRec-SA: the towers against naive per-user references read straight from the
tables, the training query (label-aware attention) and the regulariser, the task hook, and learning on
planted signal (users mixing two item clusters: K = 2 interests retrieve both, one vector cannot)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from rec_dist.data.schema import Schema
from rec_dist.errors import ConfigError
from rec_dist.losses.sampled_softmax import in_batch_softmax_loss
from rec_dist.models import MIND, ComiRecDR, ComiRecSA
from rec_dist.models.protocols import check_protocol
from rec_dist.tasks.retrieval import RetrievalTask
from tests.model_helpers import randomise, to_batch
from tests.multi_interest_refs import (
    naive_count,
    naive_label_attention,
    naive_mean_cosine,
    naive_routing,
    naive_self_attention,
)

MAX_LEN = 8
SCHEMA = {
    "name": "mi",
    "tables": {
        "user": {"num_embeddings": 10, "embedding_dim": 4},
        "item": {"num_embeddings": 30, "embedding_dim": 4},
        "genre": {"num_embeddings": 5, "embedding_dim": 4},
    },
    "features": {
        "user_id": {"kind": "sparse", "table": "user"},
        "age": {"kind": "dense"},
        "item_id": {"kind": "sparse", "table": "item"},
        "genre": {"kind": "sparse", "table": "genre"},
        "hist_item_id": {"kind": "sequence", "table": "item", "max_len": MAX_LEN},
    },
    "labels": {"like": {"kind": "binary"}},
    "groups": {"user": ["user_id", "age"], "item": ["item_id", "genre"], "history": ["hist_item_id"]},
    "item_column": "item_id",
    "user_column": "user_id",
}
HISTORIES = [[], [3], [4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12]]  # last: truncated


def rows() -> dict[str, list]:
    n = len(HISTORIES)
    return {"user_id": [1, 2, 3, 4, 5], "age": [0.5, -1.0, 0.0, 2.0, 1.5], "item_id": [7, 8, 9, 10, 11],
            "genre": [1, 2, 3, 4, 0], "hist_item_id": HISTORIES, "like": [1.0] * n}


def tables(model) -> dict[str, torch.Tensor]:
    out = {}
    if model.embeddings.pooled is not None:
        out.update({n: b.weight.detach() for n, b in model.embeddings.pooled.embedding_bags.items()})
    out.update({n: t.weight.detach() for n, t in model.embeddings.unpooled.embeddings.items()})
    return out


def reference_interests(model, r: dict, b: int) -> tuple[torch.Tensor, int]:
    """One user's ``(K, D)`` interests (absent ones zero) and its K_u, from the tables and the papers."""
    t = tables(model)
    hist = r["hist_item_id"][b][-MAX_LEN:]
    events = t["item"][hist] if hist else torch.zeros(0, 4)
    k = model.num_interests
    k_u = naive_count(len(hist), k) if model.dynamic_interests else k
    if isinstance(model, ComiRecSA):
        ex = model.extractor
        out = naive_self_attention(events, ex.w1.weight.detach(), ex.w2.weight.detach(),
                                   ex.positions.weight.detach())
        return out * (torch.arange(k) < k_u).unsqueeze(1), k_u
    routing = model.routing
    caps = naive_routing(events, routing.maps.detach(), routing.initial_logits, k_u, k, routing.iterations,
                         routing.squash_power)
    if isinstance(model, ComiRecDR):
        return caps, k_u
    profile = torch.cat([t["user"][r["user_id"][b]], torch.tensor([r["age"][b]])])  # fields, then dense
    out = model.mlp(torch.cat([caps, profile.expand(k, -1)], dim=1)).detach()  # (K, D)
    return out, k_u


MODELS = {
    "mind": lambda s: MIND(s, num_interests=3, hidden=[6], squash_power=0.5, attention_power=2.0, cosine_weight=0.3),
    "comirec_dr": lambda s: ComiRecDR(s, num_interests=3, squash_power=0.7, cosine_weight=0.3),
    "comirec_sa": lambda s: ComiRecSA(s, num_interests=3, attention_dim=5, attention_power=1.5, cosine_weight=0.3),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_towers_and_training_query_match_the_reference(name):
    schema = Schema.from_dict(SCHEMA)
    model = MODELS[name](schema)
    randomise(model)
    model.eval()
    check_protocol(model, "retrieval")
    r = rows()
    batch = to_batch(schema, r)
    with torch.no_grad():
        query = model.encode_query(batch)  # (B, K, D)
        train_query, item = model(batch)  # (B, D), (B, D)
        corpus = model.encode_item(batch)
    t = tables(model)
    torch.testing.assert_close(item, t["item"][r["item_id"]])
    torch.testing.assert_close(corpus, item)
    cosines = []
    for b in range(len(HISTORIES)):
        want, k_u = reference_interests(model, r, b)
        torch.testing.assert_close(query[b, :k_u], want[:k_u], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(query[b, k_u:], want[:1].expand(3 - k_u, -1), rtol=1e-4, atol=1e-6)  # filled
        attended = naive_label_attention(want, k_u, t["item"][r["item_id"][b]], model.attention_power)
        torch.testing.assert_close(train_query[b], attended, rtol=1e-4, atol=1e-6)
        cosines.append(naive_mean_cosine(want, k_u))
    pairs = [c for c in cosines if c is not None]
    assert float(model.diagnostics()["interest_cosine"]) == pytest.approx(sum(pairs) / len(pairs), abs=1e-5)
    if name == "mind":
        assert [naive_count(len(h[-MAX_LEN:]), 3) for h in HISTORIES] == [1, 1, 1, 2, 3]
        assert model.input_features == ("user_id", "age", "item_id", "hist_item_id")


def test_regulariser_is_the_clipped_mean_cosine():
    schema = Schema.from_dict(SCHEMA)
    model = ComiRecDR(schema, num_interests=3, cosine_weight=0.5)
    randomise(model)
    batch = to_batch(schema, rows())
    model(batch)
    interests, present = model.interests(batch)
    per_user = [naive_mean_cosine(interests[b].detach(), int(present[b].sum()), positive_only=True)
                for b in range(len(HISTORIES))]
    plain = [naive_mean_cosine(interests[b].detach(), int(present[b].sum())) for b in range(len(HISTORIES))]
    assert any(abs(a - b) > 1e-3 for a, b in zip(per_user, plain, strict=True))  # some pair has cosine < 0
    want = 0.5 * sum(per_user) / len(per_user)  # every user has K = 3 interests (ComiRec: no dynamic count)
    assert float(model.auxiliary_losses()["interest_cosine"]) == pytest.approx(want, abs=1e-6)


def test_the_task_adds_the_regulariser_to_the_loss():
    schema = Schema.from_dict(SCHEMA)
    task = RetrievalTask(model=lambda s: MIND(s, num_interests=3, hidden=[6], cosine_weight=0.7), schema=schema,
                         temperature=0.5)
    task.trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged: dict[str, torch.Tensor] = {}
    task.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # capture what the step logs
    randomise(task.model)
    batch = to_batch(schema, rows())
    loss = task.training_step(batch, 0)
    query, item = task.model(batch)
    plain = in_batch_softmax_loss(query, item, batch.ids("item_id"), 0.5)
    auxiliary = task.model.auxiliary_losses()["interest_cosine"]
    assert float(auxiliary) > 0
    torch.testing.assert_close(loss, plain + auxiliary)
    torch.testing.assert_close(logged["train/auxiliary_loss"], auxiliary)
    torch.testing.assert_close(logged["train/interest_cosine"], task.model.diagnostics()["interest_cosine"])
    torch.testing.assert_close(logged["train/loss"], loss)


def test_errors_name_the_knob():
    schema = Schema.from_dict(SCHEMA)
    with pytest.raises(ConfigError, match="MIND: squash_power must lie in"):
        MIND(schema, squash_power=2.0)
    with pytest.raises(ConfigError, match="ComiRecSA: sequence_feature .* item_feature 'genre' .* must read one table"):
        ComiRecSA(schema, item_feature="genre")
    with pytest.raises(ConfigError, match="ComiRecDR: num_interests must be positive"):
        ComiRecDR(schema, num_interests=0)
    with pytest.raises(ConfigError, match="MIND: attention_power"):
        MIND(schema, attention_power=-1.0)
    assert MIND(schema, profile_features=[]).input_features == ("item_id", "hist_item_id")


# ---- planted signal -------------------------------------------------------------------------------------------
CLUSTERS, PER_CLUSTER, DIM, HIST = 16, 4, 4, 6  # 16 clusters in 4 dims: no vector points at every pair
PLANTED = Schema.from_dict({
    "name": "planted",
    "tables": {"item": {"num_embeddings": CLUSTERS * PER_CLUSTER + 1, "embedding_dim": DIM}},
    "features": {"item_id": {"kind": "sparse", "table": "item"},
                 "hist_item_id": {"kind": "sequence", "table": "item", "max_len": HIST}},
    "labels": {"like": {"kind": "binary"}},
    "item_column": "item_id",
})


def planted_rows(users: int, rows_per_user: int, seed: int) -> dict[str, list]:
    """Each user likes two random clusters: half its history from each, targets from either."""
    rng = np.random.default_rng(seed)
    out: dict[str, list] = {"item_id": [], "hist_item_id": [], "like": []}
    for _ in range(users):
        pair = rng.choice(CLUSTERS, 2, replace=False)
        hist = [int(c * PER_CLUSTER + rng.integers(PER_CLUSTER) + 1) for c in pair for _ in range(HIST // 2)]
        rng.shuffle(hist)
        for _ in range(rows_per_user):
            cluster = pair[rng.integers(2)]
            out["item_id"].append(int(cluster * PER_CLUSTER + rng.integers(PER_CLUSTER) + 1))
            out["hist_item_id"].append(hist)
            out["like"].append(1.0)
    return out


def hit_rate(model, r: dict, k: int) -> float:
    """HR@k of each row's target among all items, an item scored by its best interest."""
    with torch.no_grad():
        query = model.encode_query(to_batch(PLANTED, r))  # (B, K, D)
        n = CLUSTERS * PER_CLUSTER
        corpus = {"item_id": list(range(1, n + 1)), "hist_item_id": [[]] * n, "like": [1.0] * n}
        items = model.encode_item(to_batch(PLANTED, corpus))  # (n, D)
        top = torch.einsum("bkd,nd->bkn", query, items).amax(1).topk(k, dim=1).indices + 1  # (B, k) ids
    return float((top == torch.tensor(r["item_id"]).unsqueeze(1)).any(1).double().mean())


def train(make, num_interests: int) -> float:
    torch.manual_seed(0)
    model = make(num_interests)
    data = planted_rows(300, 4, seed=1)
    batches = [to_batch(PLANTED, {k: v[s:s + 128] for k, v in data.items()}) for s in range(0, 1200, 128)]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for epoch in range(20):
        for i in np.random.default_rng(epoch).permutation(len(batches)):
            query, item = model(batches[i])
            loss = in_batch_softmax_loss(query, item, batches[i].ids("item_id"), temperature=0.2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return hit_rate(model, planted_rows(200, 1, seed=2), k=2 * PER_CLUSTER)


PLANTED_MODELS = {
    "mind": lambda k: MIND(PLANTED, num_interests=k, dynamic_interests=False, hidden=[], squash_power=0.0),
    "comirec_dr": lambda k: ComiRecDR(PLANTED, num_interests=k),
    "comirec_sa": lambda k: ComiRecSA(PLANTED, num_interests=k),
}


@pytest.mark.parametrize("name", list(PLANTED_MODELS))
def test_two_interests_retrieve_both_clusters_better_than_one_vector(name):
    torch.set_num_threads(1)
    two, one = train(PLANTED_MODELS[name], 2), train(PLANTED_MODELS[name], 1)
    chance = 2 * PER_CLUSTER / (CLUSTERS * PER_CLUSTER)
    assert two >= 0.75, (two, one)
    assert two >= one + 0.2, (two, one)
    assert one > 2 * chance  # the one-vector model learnt something too: the gap is the interests'
    assert not math.isnan(two)
