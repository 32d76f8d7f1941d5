"""BST against a hand-computed reference (token by token attention, LayerNorm, FFN, then the DNN), with and
without POSO's gated heads; it learns a planted history signal; configuration errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from rec_dist.models import BST
from rec_dist.models.personalized import LHUCConfig, PersonalizationConfig, POSOConfig
from tests.model_helpers import (
    ALL_DENSE,
    MAX_LEN,
    SEQ_TABLE_DIM,
    bce,
    history_task,
    randomise,
    ref_fields,
    ref_head,
    to_batch,
    toy_rows,
    toy_schema,
)
from tests.sequence_helpers import MAX_LEN as TIMED_LEN
from tests.sequence_helpers import auc, recent_interest_task, timed_rows, timed_schema
from tests.test_layers import ref_mlp
from tests.test_personalization import ref_gate


def _layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    mean = sum(x) / len(x)
    var = sum((v - mean) ** 2 for v in x) / len(x)
    return (x - mean) / math.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attend(model: BST, tokens: torch.Tensor, real: list[int], code: torch.Tensor | None, i: int) -> torch.Tensor:
    """Output of query token ``i`` attending over the ``real`` tokens, one head at a time."""
    att, dim = model.attention, tokens.shape[1]
    heads = 2
    d = dim // heads
    if code is None:  # torch.nn.MultiheadAttention's packed projections
        wq, wk, wv = att.in_proj_weight.split(dim)
        bq, bk, bv = att.in_proj_bias.split(dim)
        out_w, out_b, gate = att.out_proj.weight, att.out_proj.bias, torch.ones(heads)
    else:
        wq, wk, wv = att.q_proj.weight, att.k_proj.weight, att.v_proj.weight
        bq, bk, bv = att.q_proj.bias, att.k_proj.bias, att.v_proj.bias
        out_w, out_b, gate = att.out_proj.weight, att.out_proj.bias, ref_gate(att.poso_gate, code)
    q = torch.mv(wq, tokens[i]) + bq
    keys = [torch.mv(wk, tokens[j]) + bk for j in real]
    values = [torch.mv(wv, tokens[j]) + bv for j in real]
    out = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = torch.stack([torch.dot(q[sl], k[sl]) / math.sqrt(d) for k in keys])
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        out.append(gate[h] * sum(w[n] * values[n][sl] for n in range(len(real))))
    return torch.mv(out_w, torch.cat(out)) + out_b


def _block(model: BST, tokens: torch.Tensor, code: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Transformer block over one row's real tokens (history then target): the target's output and the
    mean of the history's outputs (zeros for an empty history)."""
    real = list(range(len(tokens)))  # padding is neither key nor output here
    outputs = []
    for i in real:
        x = _layer_norm(model.norm1, tokens[i] + _attend(model, tokens, real, code, i))
        ffn = model.ffn[2].weight @ torch.nn.functional.leaky_relu(model.ffn[0].weight @ x + model.ffn[0].bias)
        outputs.append(_layer_norm(model.norm2, x + ffn + model.ffn[2].bias))
    history = torch.stack(outputs[:-1]).mean(0) if len(outputs) > 1 else torch.zeros_like(outputs[-1])
    return outputs[-1], history


def _bst_reference(model: BST, rows: dict[str, list]) -> dict[str, torch.Tensor]:
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    xs = []
    for b in range(len(rows["user_id"])):
        fields = ref_fields(model, rows, b)
        hist, hist_genre = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        tokens = [torch.cat([item[i], genre[g]]) + model.positions[t]
                  for t, (i, g) in enumerate(zip(hist, hist_genre, strict=True))]
        tokens.append(torch.cat([fields["item_id"], fields["primary_genre"]]) + model.positions[MAX_LEN])
        code = fields["user_id"] if model.code is not None else None
        target, history = _block(model, torch.stack(tokens), code)
        others = [fields[f] for f in ("user_id", "tags", "genres")]  # pooled non-query features, schema order
        xs.append(torch.cat(others + [target, history] + [fields[f] for f in ALL_DENSE]))
    return ref_head(model, ref_mlp(model.dnn, torch.stack(xs), train=False))


def _gap_bucket(gap: int, buckets: int) -> int:
    """The paper's bucketised time gap, by counting doublings (no log2)."""
    if gap <= 0:
        return 0
    bucket = 1
    while 2 ** bucket <= gap:
        bucket += 1
    return min(bucket, buckets - 1)


def test_bst_time_gap_positions_match_reference():
    """pos(v_t) = G[bucket(request - t(v_t))], the target's gap 0; order positions are gone."""
    schema, rows = timed_schema(), timed_rows(n=8)
    model = BST(schema, ["like"], query_features=["item_id", "primary_genre"],
                sequence_features=["hist_item_id", "hist_genre"], num_heads=2, ffn_hidden=6, hidden=[5],
                dropout=0.0, time_feature="hist_hour", request_time_feature="request_hour", time_gap_buckets=6)
    randomise(model)
    model.eval()
    assert not hasattr(model, "positions") and model.time_gaps.shape == (6, 8)
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    user = model.embeddings.pooled.embedding_bags["user"].weight
    xs, buckets = [], set()
    for b in range(8):
        hist, genres = rows["hist_item_id"][b][-TIMED_LEN:], rows["hist_genre"][b][-TIMED_LEN:]
        hours = rows["hist_hour"][b][-TIMED_LEN:]
        gaps = [_gap_bucket(rows["request_hour"][b] - h, 6) for h in hours]
        buckets.update(gaps)
        tokens = [torch.cat([item[i], genre[g]]) + model.time_gaps[k] for i, g, k in zip(hist, genres, gaps,
                                                                                          strict=True)]
        tokens.append(torch.cat([item[rows["item_id"][b]], genre[rows["primary_genre"][b]]]) + model.time_gaps[0])
        target, history = _block(model, torch.stack(tokens), None)
        xs.append(torch.cat([user[rows["user_id"][b]], target, history, torch.tensor([rows["age"][b]])]))
    assert len(buckets) >= 4  # the rows exercise several buckets, including the last (capped) one
    expected = ref_head(model, ref_mlp(model.dnn, torch.stack(xs)))["like"]
    assert_close(model(to_batch(schema, rows))["like"], expected)


def test_bst_learns_recent_interest_from_time_gaps():
    """The label follows the events of the last hours; how many old events come before them varies, so only
    the time gap tells which events are recent (held-out AUC)."""
    schema, train = recent_interest_task(n=300, seed=0, old=4)
    _, test = recent_interest_task(n=300, seed=1, old=4)
    torch.manual_seed(0)
    model = BST(schema, query_features=["item_id"], sequence_features=["hist_item_id"], features=[], num_heads=2,
                hidden=[16], dropout=0.0, time_feature="hist_hour", request_time_feature="request_hour",
                time_gap_buckets=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(60):
        optimizer.zero_grad()
        bce(model(train), train).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert auc(test.labels["like"], model(test)["like"]) > 0.9


@pytest.mark.parametrize("longest", [MAX_LEN, 2])
@pytest.mark.parametrize("poso", [None, "mha"])
def test_bst_matches_reference(poso, longest):
    schema = toy_schema()
    rows = toy_rows()
    rows["hist_item_id"][0], rows["hist_genre"][0] = [], []  # an empty history: only the target token
    for name in ("hist_item_id", "hist_genre"):  # longest 2: padded to 2, not max_len, same outputs
        rows[name] = [h[-longest:] for h in rows[name]]
    model = BST(schema, tasks=["like"], query_features=["item_id", "primary_genre"],
                sequence_features=["hist_item_id", "hist_genre"], num_heads=2, ffn_hidden=6, hidden=[5, 3],
                dropout=0.0, personalization=_poso(poso))
    randomise(model)
    model.eval()
    assert model.positions.shape == (MAX_LEN + 1, 2 * SEQ_TABLE_DIM)
    assert_close(model(to_batch(schema, rows))["like"], _bst_reference(model, rows)["like"])


def _poso(mode: str | None) -> PersonalizationConfig | None:
    """POSO on the attention heads (mode ``mha``), code = the user id's embedding."""
    return None if mode is None else PersonalizationConfig(poso=POSOConfig(mode=mode, features=["user_id"], scale=2.0))


def test_poso_heads_depend_on_the_personalisation_code():
    schema = toy_schema()
    rows = toy_rows()
    model = BST(schema, num_heads=2, hidden=[5], dropout=0.0, personalization=_poso("mha"))
    randomise(model)
    model.eval()
    before = model(to_batch(schema, rows))["like"]
    with torch.no_grad():
        for p in model.attention.poso_gate.parameters():
            p.zero_()  # every gate C * sigmoid(0) = 1: the same heads for every user
    assert not torch.allclose(before, model(to_batch(schema, rows))["like"])


def test_bst_learns_a_planted_history_signal():
    torch.manual_seed(0)
    schema, batch = history_task()
    model = BST(schema, num_heads=2, hidden=[16], dropout=0.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(80):
        optimizer.zero_grad()
        bce(model(batch), batch).backward()
        optimizer.step()
    from sklearn.metrics import roc_auc_score

    with torch.no_grad():
        auc = roc_auc_score(batch.labels["like"].numpy(), model(batch)["like"].numpy())
    assert auc > 0.95


def test_bst_configuration_errors():
    schema = toy_schema()
    with pytest.raises(ValueError, match=r"BST: personalization.poso.mode 'mmoe' is not supported; BST takes .*'mha'"):
        BST(schema, personalization=_poso("mmoe"))
    lhuc = PersonalizationConfig(lhuc=LHUCConfig(features=["user_id"]))
    with pytest.raises(ValueError, match=r"BST: personalization.lhuc is not supported; BST takes only personalizat"):
        BST(schema, personalization=lhuc)
    with pytest.raises(ValueError, match="must be divisible by num_heads 3"):
        BST(schema, num_heads=3)
    with pytest.raises(ValueError, match="^BST: personalization.poso.features: 'nope' is neither a feature nor"):
        BST(schema, personalization={"poso": {"mode": "mha", "features": ["nope"]}})
    with pytest.raises(ValueError, match="^BST: give both"):  # the pairing checks name the model
        BST(schema, query_features=["item_id"])
    with pytest.raises(ValueError, match="^BST: the sequence features must share one max_len"):
        BST(toy_schema(hist_genre_len=3))
    timed = timed_schema()
    with pytest.raises(ValueError, match="^BST: time_feature 'hist_hour' needs request_time_feature"):
        BST(timed, time_feature="hist_hour")
    with pytest.raises(ValueError, match="^BST: request_time_feature 'hist_genre' must name a sparse feature"):
        BST(timed, time_feature="hist_hour", request_time_feature="hist_genre")
    with pytest.raises(ValueError, match="^BST: time_gap_buckets must be at least 2"):
        BST(timed, time_feature="hist_hour", request_time_feature="request_hour", time_gap_buckets=1)
