"""SIM, ETA, SDIM and TWIN against naive per-row references on the toy batch (``tests.model_helpers``):
each row's search done by a loop over its events, then the second stage by the paper's formula, then
the shared DNN and head. Also: TWIN's first stage ranks by the second stage's own logits (one
parameterisation), cross features enter only as scalar biases, and the configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rec_dist.errors import ConfigError
from rec_dist.models import ETA, SDIM, SIM, TWIN
from tests.model_helpers import MAX_LEN, randomise, ref_fields, ref_head, to_batch, toy_rows, toy_schema
from tests.test_layers import ref_attention, ref_mlp

PAIRS = {"query_features": ["item_id", "primary_genre"], "sequence_features": ["hist_item_id", "hist_genre"]}
SMALL = {"hidden": [5], "activation": "prelu"}
K = 2  # rows hold up to MAX_LEN = 4 events: the search matters


def _rows_and_events(model, rows):
    """Per row: query (Dq,), keys [(Dq,)], raw genre ids of the events (the last MAX_LEN)."""
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    out = []
    for b in range(len(rows["item_id"])):
        hist, hist_genre = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        query = torch.cat([item[rows["item_id"][b]], genre[rows["primary_genre"][b]]])
        keys = [torch.cat([item[i], genre[g]]) for i, g in zip(hist, hist_genre, strict=True)]
        out.append((query, keys, hist_genre))
    return out


def _best(scores: list[float], k: int, allowed: list[bool] | None = None) -> list[int]:
    """Positions of the k best scores (ties: the most recent), back in time order."""
    candidates = [t for t in range(len(scores)) if allowed is None or allowed[t]]
    return sorted(sorted(candidates, key=lambda t: (-scores[t], -t))[:k])


def _attend(model, per_row, kept: list[list[int]]) -> torch.Tensor:
    """DIN's attention unit (the naive reference of tests.test_layers) over each row's kept events."""
    query = torch.stack([q for q, _, _ in per_row])
    keys = torch.zeros(len(per_row), K, query.shape[1])
    for b, ((_, k, _), chosen) in enumerate(zip(per_row, kept, strict=True)):
        for slot, t in enumerate(chosen):
            keys[b, slot] = k[t]
    return ref_attention(model.attention, query, keys, [len(c) for c in kept])


def _forward(model, rows, interest: torch.Tensor) -> torch.Tensor:
    """The shared frame: DNN([other fields; query; interest; dense]) and the head, per sample."""
    per_sample = [ref_fields(model, rows, b) for b in range(len(rows["item_id"]))]
    x = torch.stack([
        torch.cat([s[f] for f in model.selection.fields] + [torch.cat([s[q] for q in model.query_features]),
                                                            interest[b], s["age"], s["vec"]])
        for b, s in enumerate(per_sample)
    ])
    return ref_head(model, ref_mlp(model.dnn, x))["like"]


def _check(model, interest_of_row):
    randomise(model)
    model.eval()
    schema_rows = toy_rows()
    per_row = _rows_and_events(model, schema_rows)
    interest = interest_of_row(per_row, schema_rows)
    assert_close(model(to_batch(model.schema, schema_rows))["like"], _forward(model, schema_rows, interest))


def test_sim_hard_search_matches_reference():
    model = SIM(toy_schema(), ["like"], **PAIRS, search="hard", top_k=K,
                category_features=["primary_genre", "hist_genre"], **SMALL)

    def interest(per_row, rows):
        kept = [_best([0.0] * len(keys), K, [g == rows["primary_genre"][b] for g in genres])
                for b, (_, keys, genres) in enumerate(per_row)]
        assert any(len(c) for c in kept) and any(not c for c in kept)  # matches and rows without any
        return _attend(model, per_row, kept)

    _check(model, interest)


def test_sim_soft_search_matches_reference():
    model = SIM(toy_schema(), ["like"], **PAIRS, search="soft", top_k=K, **SMALL)

    def interest(per_row, rows):
        kept = [_best([float((q @ k).detach()) for k in keys], K) for q, keys, _ in per_row]
        return _attend(model, per_row, kept)

    _check(model, interest)


def test_eta_hamming_search_matches_reference():
    model = ETA(toy_schema(), ["like"], **PAIRS, top_k=K, hash_bits=6, **SMALL)

    def interest(per_row, rows):
        projection = model.hash.projection  # (Dq, bits)

        def bits(v):
            return [float(v @ projection[:, i]) > 0 for i in range(6)]

        kept = []
        for q, keys, _ in per_row:
            distance = [sum(a != c for a, c in zip(bits(q), bits(k), strict=True)) for k in keys]
            kept.append(_best([-d for d in distance], K))
        return _attend(model, per_row, kept)

    _check(model, interest)


@pytest.mark.parametrize("aggregation", ["l2", "mean"])
def test_sdim_collision_aggregation_matches_reference(aggregation):
    rounds, width = 5, 2
    model = SDIM(toy_schema(), ["like"], **PAIRS, hash_rounds=rounds, hash_width=width, aggregation=aggregation,
                 **SMALL)

    def interest(per_row, rows):
        projection = model.hash.projection  # (Dq, rounds * width)

        def signature(v, j):
            return [float(v @ projection[:, j * width + i]) > 0 for i in range(width)]

        out, collided = [], 0
        for q, keys, _ in per_row:
            total = torch.zeros(q.shape[0])
            for j in range(rounds):
                hits = [k for k in keys if signature(k, j) == signature(q, j)]
                collided += len(hits)
                if hits:
                    s = torch.stack(hits).sum(0)
                    total = total + (s / s.norm() if aggregation == "l2" else s / len(hits))
            out.append(total / rounds)
        assert collided > 0
        return torch.stack(out)

    _check(model, interest)


def _twin_alpha(model, q, k, age, cross=None):
    """Per head: (W^q_h q)·(W^k_h k)/sqrt(d) + beta_h[bucket(age)] (+ w_h · cross)."""
    att = model.attention
    heads, d = att.heads, att.head_dim
    qp, kp = att.query.weight @ q + att.query.bias, att.key.weight @ k + att.key.bias
    bucket = min(int(math.floor(math.log2(age + 1))), model.age_buckets - 1)
    alpha = torch.stack([qp[h * d:(h + 1) * d] @ kp[h * d:(h + 1) * d] / math.sqrt(d) for h in range(heads)])
    alpha = alpha + att.age_bias.weight[bucket]
    if cross is not None:
        alpha = alpha + att.cross_bias.weight @ cross
    return alpha  # (H,)


def test_twin_matches_reference_with_one_parameterisation_for_both_stages():
    model = TWIN(toy_schema(), ["like"], **PAIRS, top_k=K, num_heads=2, head_dim=3, age_buckets=3, **SMALL)

    def interest(per_row, rows):
        att, out = model.attention, []
        for q, keys, _ in per_row:
            n = len(keys)
            alphas = [_twin_alpha(model, q, k, n - 1 - t) for t, k in enumerate(keys)]  # (H,) per event
            kept = _best([float(a.mean()) for a in alphas], K)  # GSU: the heads' mean of the ESU's logits
            heads = []
            for h in range(att.heads):
                logits = torch.stack([alphas[t][h] for t in kept]) if kept else torch.zeros(0)
                weights = torch.softmax(logits, dim=0)
                values = [(att.value.weight @ keys[t] + att.value.bias)[h * 3:(h + 1) * 3] for t in kept]
                heads.append(sum((w * v for w, v in zip(weights, values, strict=True)), torch.zeros(3)))
            out.append(att.output.weight @ torch.cat(heads) + att.output.bias)
        return torch.stack(out)

    _check(model, interest)


def test_twin_cross_features_are_scalar_biases_only():
    """A cross feature moves alpha by w_h · c_t whatever the candidate, and never enters the keys or values."""
    schema = toy_schema()
    model = TWIN(schema, ["like"], query_features=["item_id"], sequence_features=["hist_item_id"],
                 cross_features=["hist_genre"], top_k=K, num_heads=2, head_dim=3, **SMALL)
    randomise(model)
    model.eval()
    rows = toy_rows()
    embedded = model.embeddings(to_batch(schema, rows))
    history = embedded.sequences["hist_item_id"]
    query = embedded.pooled["item_id"]
    cross = embedded.sequences["hist_genre"].values
    scores = model.gsu_scores(query, history, embedded)
    genre = model.embeddings.unpooled.embeddings["genre"].weight
    rows_of = history.rows.tolist()
    ages = (history.offsets.diff()[history.rows] - 1 - (torch.arange(len(rows_of)) - history.offsets[history.rows]))
    for t, b in enumerate(rows_of):
        c = genre[rows["hist_genre"][b][-MAX_LEN:][t - int(history.offsets[b])]]
        assert_close(cross[t], c)
        with_cross = _twin_alpha(model, query[b], history.values[t], int(ages[t]), c)
        assert_close(scores[t], with_cross.mean())
        bias = with_cross - _twin_alpha(model, query[b], history.values[t], int(ages[t]))
        other = _twin_alpha(model, query[(b + 1) % len(query)], history.values[t], int(ages[t]), c)
        assert_close(bias, model.attention.cross_bias.weight @ c)  # the same bias for another candidate:
        assert_close(other - _twin_alpha(model, query[(b + 1) % len(query)], history.values[t], int(ages[t])), bias)
    assert model.attention.key.in_features == schema.table_of("hist_item_id").embedding_dim  # item side only


def test_configuration_errors():
    schema = toy_schema()
    with pytest.raises(ConfigError, match=r"SIM: category_features must be \[<candidate's sparse feature>"):
        SIM(schema, ["like"], search="hard")
    with pytest.raises(ConfigError, match="SIM: category_features: 'genres' must be a sparse feature"):
        SIM(schema, ["like"], search="hard", category_features=["genres", "hist_genre"])
    with pytest.raises(ConfigError, match="SIM: search must be 'hard' or 'soft'"):
        SIM(schema, ["like"], search="fuzzy")
    with pytest.raises(ConfigError, match="ETA: top_k must be a positive integer, got 0"):
        ETA(schema, ["like"], top_k=0)
    with pytest.raises(ConfigError, match=r"ETA: hash bits must be in \[1, 52\]"):
        ETA(schema, ["like"], hash_bits=64)
    with pytest.raises(ConfigError, match="SDIM: aggregation must be 'l2' or 'mean'"):
        SDIM(schema, ["like"], aggregation="max")
    with pytest.raises(ConfigError, match="SDIM: hash_rounds must be a positive integer"):
        SDIM(schema, ["like"], hash_rounds=0)
    with pytest.raises(ConfigError, match="TWIN: cross feature 'hist_genre' is also an item-side sequence"):
        TWIN(schema, ["like"], **PAIRS, cross_features=["hist_genre"])
    with pytest.raises(ConfigError, match="must be aligned with 'hist_item_id'"):
        SIM(toy_schema(hist_genre_len=3), ["like"], query_features=["item_id"], sequence_features=["hist_item_id"],
            search="hard", category_features=["primary_genre", "hist_genre"])
