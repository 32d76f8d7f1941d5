"""HSTU against a naive per-row loop (pointwise SiLU attention over j <= i divided by the fixed N, relative
position and time-gap biases, U gating, residual), padding- and causality-invariance, the ranker with its
appended candidate, the next-item model, and learning planted signals."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.functional import silu
from torch.testing import assert_close

from rec_dist.layers.hstu import HSTULayer, HSTUStack
from rec_dist.models.hstu import HSTU, HSTUNextItem
from tests.model_helpers import bce, history_task, randomise, ref_head, to_batch
from tests.sequence_helpers import MAX_LEN, auc, timed_rows, timed_schema
from tests.test_layers import ref_mlp


def _bucket(gap: int, buckets: int) -> int:
    """log2 bucket by counting doublings: 0 for gap <= 0, 1 for 1, 2 for 2-3, 3 for 4-7, ..."""
    if gap <= 0:
        return 0
    bucket = 1
    while 2 ** bucket <= gap:
        bucket += 1
    return min(bucket, buckets - 1)


def _norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean()
    return (x - mean) / math.sqrt(((x - mean) ** 2).mean() + norm.eps) * norm.weight + norm.bias


def ref_layer(layer: HSTULayer, tokens: list[torch.Tensor], times: list[int] | None) -> list[torch.Tensor]:
    """One HSTU layer over one row's real tokens, token by token, head by head (the paper's eq. 1-3)."""
    heads, dq, dv = layer.num_heads, layer.attention_dim, layer.linear_dim
    projected = [silu(layer.f1.weight @ _norm(x, layer.input_norm) + layer.f1.bias) for x in tokens]
    u = [p[: heads * dv] for p in projected]
    v = [p[heads * dv: 2 * heads * dv] for p in projected]
    q = [p[2 * heads * dv: 2 * heads * dv + heads * dq] for p in projected]
    k = [p[2 * heads * dv + heads * dq:] for p in projected]
    positions, time_bias = layer.bias.position, layer.bias.time
    out = []
    for i in range(len(tokens)):
        attended = []
        for h in range(heads):
            acc = torch.zeros(dv)
            for j in range(i + 1):  # causal
                rab = positions[min(i - j, positions.numel() - 1)]
                if time_bias is not None:
                    rab = rab + time_bias[_bucket(times[i] - times[j], time_bias.numel())]
                score = q[i][h * dq:(h + 1) * dq] @ k[j][h * dq:(h + 1) * dq] + rab
                acc = acc + silu(score) / layer.normalizer * v[j][h * dv:(h + 1) * dv]
            attended.append(acc)
        gated = u[i] * _norm(torch.cat(attended), layer.output_norm)
        out.append(tokens[i] + layer.f2.weight @ gated + layer.f2.bias)
    return out


def ref_stack(stack: HSTUStack, tokens: list[torch.Tensor], times: list[int] | None) -> list[torch.Tensor]:
    for layer in stack.layers:
        tokens = ref_layer(layer, tokens, times)
    return tokens


def _random_layer(time_buckets: int | None = 6) -> HSTULayer:
    torch.manual_seed(0)
    layer = HSTULayer(6, num_heads=2, attention_dim=3, linear_dim=4, normalizer=9, num_positions=4,
                      time_buckets=time_buckets)
    randomise(layer, std=0.5)
    return layer


@pytest.mark.parametrize("time_buckets", [None, 6])
def test_layer_matches_per_row_loop_whatever_the_padding(time_buckets):
    layer = _random_layer(time_buckets)
    lengths = [0, 3, 6, 1]
    x = torch.randn(4, 8, 6)  # padded to 8 > the longest row (6): the extra padding must change nothing
    times = torch.sort(torch.randint(0, 100, (4, 8)), dim=1).values
    out = layer(x, torch.tensor(lengths), times if time_buckets else None)
    tight = layer(x[:, :6], torch.tensor(lengths), times[:, :6] if time_buckets else None)
    for b, n in enumerate(lengths):
        ref = ref_layer(layer, list(x[b, :n]), times[b, :n].tolist())
        for i in range(n):
            assert_close(out[b, i], ref[i], atol=1e-5, rtol=1e-4)
            assert_close(tight[b, i], ref[i], atol=1e-5, rtol=1e-4)


def test_layer_is_causal():
    layer = _random_layer()
    x, times = torch.randn(1, 5, 6), torch.arange(5).view(1, 5) * 10
    changed = x.clone()
    changed[0, 4] += 1.0
    before, after = layer(x, torch.tensor([5]), times), layer(changed, torch.tensor([5]), times)
    assert_close(before[0, :4], after[0, :4])  # earlier tokens never read a later one
    assert not torch.allclose(before[0, 4], after[0, 4])


def test_ranker_matches_reference():
    """The candidate is appended after each row's real events (at its own position, the request time as its
    time) and its output feeds the DNN with the other fields."""
    schema, rows = timed_schema(), timed_rows(n=6)
    model = HSTU(schema, ["like"], query_features=["item_id", "primary_genre"],
                 sequence_features=["hist_item_id", "hist_genre"], num_layers=2, num_heads=2, attention_dim=3,
                 linear_dim=4, time_feature="hist_hour", request_time_feature="request_hour", time_buckets=8,
                 hidden=[5])
    randomise(model, std=0.5)
    model.eval()
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    user = model.embeddings.pooled.embedding_bags["user"].weight
    xs = []
    for b in range(6):
        hist, genres = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        times = rows["hist_hour"][b][-MAX_LEN:] + [rows["request_hour"][b]]
        candidate = torch.cat([item[rows["item_id"][b]], genre[rows["primary_genre"][b]]])
        tokens = [torch.cat([item[i], genre[g]]) for i, g in zip(hist, genres, strict=True)] + [candidate]
        target = ref_stack(model.encoder, tokens, times)[-1]
        xs.append(torch.cat([user[rows["user_id"][b]], target, candidate, torch.tensor([rows["age"][b]])]))
    expected = ref_head(model, ref_mlp(model.dnn, torch.stack(xs)))["like"]
    assert_close(model(to_batch(schema, rows))["like"], expected, atol=1e-5, rtol=1e-4)
    assert model.encoder.layers[0].normalizer == MAX_LEN + 1


def test_ranker_learns_planted_history_signal():
    schema, batch = history_task(n=300)
    torch.manual_seed(0)
    model = HSTU(schema, ["like"], num_layers=1, attention_dim=8, linear_dim=8, hidden=[16])
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(50):
        optimizer.zero_grad()
        bce(model(batch), batch).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert auc(batch.labels["like"], model(batch)["like"]) > 0.9


def test_next_item_states_match_reference():
    schema, rows = timed_schema(), timed_rows(n=6)
    schema = schema.select(["item_id", "hist_item_id", "hist_hour"])
    schema = type(schema)(schema.name, schema.tables, schema.features, schema.labels, {"item_column": "item_id"},
                          schema.groups)
    rows = {k: rows[k] for k in ("item_id", "hist_item_id", "hist_hour", "like")}
    model = HSTUNextItem(schema, num_layers=1, num_heads=2, attention_dim=3, linear_dim=4, time_feature="hist_hour",
                         time_buckets=8)
    randomise(model, std=0.5)
    assert model.sequence_feature == "hist_item_id" and model.input_features[-1] == "hist_hour"
    states = model.encode_sequence(to_batch(schema, rows))
    item = model.embeddings.unpooled.embeddings["item"].weight
    expected = []
    for b in range(6):
        hist, times = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_hour"][b][-MAX_LEN:]
        out = ref_stack(model.encoder, [item[i] for i in hist], times)
        expected += [model.project.weight @ o + model.project.bias for o in out]
    assert_close(states.values, torch.stack(expected), atol=1e-5, rtol=1e-4)


def test_configuration_errors():
    schema = timed_schema()
    with pytest.raises(ValueError, match="^HSTU: time_feature 'hist_hour' needs request_time_feature"):
        HSTU(schema, time_feature="hist_hour")
    with pytest.raises(ValueError, match="^HSTU: num_layers must be positive"):
        HSTU(schema, num_layers=0)
    with pytest.raises(ValueError, match="^HSTUNextItem: item_feature 'hist_genre' must name a sparse feature"):
        HSTUNextItem(schema, sequence_feature="hist_item_id", item_feature="hist_genre")


def test_next_item_learns_the_successor_rule(tmp_path_factory, tmp_path):
    """Through NextItemTask (full softmax over the items) on the planted cycle 1 -> 2 -> ... -> 40 -> 1
    (``tests.test_next_item_task``): the state after the last event ranks its successor in the top 5."""
    from rec_dist.tasks.next_item import NextItemTask
    from tests.test_next_item_task import fit_task, successor_data

    root = successor_data(tmp_path_factory.mktemp("successor") / "data")
    task, trainer, data = fit_task(root, tmp_path, NextItemTask,
                                   lambda schema: HSTUNextItem(schema, num_layers=1, attention_dim=8, linear_dim=8),
                                   3, lr=0.01, loss="full", positions="last")
    result = trainer.test(task, datamodule=data, verbose=False)[0]
    assert result["test/recall_at_5"] > 0.9, result  # popularity: about 0.2 (flat over the cycle)


def test_row_blocks_give_the_same_outputs_and_gradients():
    """row_block runs 2 rows at a time, each block padded to its own longest row and recomputed in the
    backward: the real positions' outputs and every gradient equal the all-rows run."""
    torch.manual_seed(0)
    whole = HSTUStack(6, 2, num_heads=2, attention_dim=3, linear_dim=4, normalizer=9, num_positions=4, time_buckets=6)
    randomise(whole, std=0.5)
    blocked = HSTUStack(6, 2, row_block=2, num_heads=2, attention_dim=3, linear_dim=4, normalizer=9, num_positions=4,
                        time_buckets=6)
    blocked.load_state_dict(whole.state_dict())
    lengths = torch.tensor([0, 3, 6, 1, 2])
    x = torch.randn(5, 6, 6)
    times = torch.sort(torch.randint(0, 100, (5, 6)), dim=1).values
    real = torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)  # (B, L)
    outputs = []
    for stack in (whole, blocked):
        inputs = x.clone().requires_grad_(True)
        out = stack(inputs, lengths, times)[real]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outputs.append((out.detach(), inputs.grad[real], [p.grad for p in stack.parameters()]))
    assert_close(outputs[0][0], outputs[1][0], atol=1e-6, rtol=1e-5)
    assert_close(outputs[0][1], outputs[1][1], atol=1e-6, rtol=1e-5)
    for a, b in zip(outputs[0][2], outputs[1][2], strict=True):
        assert_close(a, b, atol=1e-5, rtol=1e-4)
