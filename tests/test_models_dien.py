"""DIEN against a per-row reference (GRU and AUGRU written out step by step from the paper's equations,
the target attention, the auxiliary loss over consecutive pairs with the negatives the model drew); the
AUGRU's attention gate; learning a planted history signal; RankingTask adds the auxiliary loss."""

from __future__ import annotations

import pytest
import torch
from torch.nn.functional import logsigmoid
from torch.testing import assert_close

from rec_dist.layers.recurrent import AUGRUCell
from rec_dist.models.dien import DIEN
from rec_dist.models.protocols import AUXILIARY_LOSS
from rec_dist.tasks.ranking import RankingTask
from tests.model_helpers import (
    MAX_LEN,
    bce,
    history_task,
    randomise,
    ref_fields,
    ref_head,
    to_batch,
    toy_rows,
    toy_schema,
)
from tests.sequence_helpers import auc
from tests.test_layers import ref_mlp


def _gru_step(w_ih, w_hh, b_ih, b_hh, x, h, attention=None):
    """One step, gates written out; ``attention`` scales the update gate (AUGRU), None is the plain GRU
    (whose update gate weighs the old state: h' = (1 - z) h~ + z h)."""
    d = h.shape[0]
    r = torch.sigmoid(w_ih[:d] @ x + b_ih[:d] + w_hh[:d] @ h + b_hh[:d])
    z = torch.sigmoid(w_ih[d:2 * d] @ x + b_ih[d:2 * d] + w_hh[d:2 * d] @ h + b_hh[d:2 * d])
    n = torch.tanh(w_ih[2 * d:] @ x + b_ih[2 * d:] + r * (w_hh[2 * d:] @ h + b_hh[2 * d:]))
    if attention is None:
        return (1 - z) * n + z * h
    u = attention * z
    return (1 - u) * h + u * n


def _reference(model: DIEN, rows: dict[str, list]) -> tuple[torch.Tensor, torch.Tensor]:
    tables = model.embeddings.unpooled.embeddings
    item, genre = tables["item"].weight, tables["genre"].weight
    gru, cell, bilinear = model.extractor, model.evolution.cell, model.attention.weight[0]
    xs, all_states, all_events = [], [], []
    for b in range(len(rows["item_id"])):
        fields = ref_fields(model, rows, b)
        target = torch.cat([fields["item_id"], fields["primary_genre"]])
        hist, genres = rows["hist_item_id"][b][-MAX_LEN:], rows["hist_genre"][b][-MAX_LEN:]
        events = [torch.cat([item[i], genre[g]]) for i, g in zip(hist, genres, strict=True)]
        h, states = torch.zeros(8), []
        for e in events:
            h = _gru_step(gru.weight_ih_l0, gru.weight_hh_l0, gru.bias_ih_l0, gru.bias_hh_l0, e, h)
            states.append(h)
        final = torch.zeros(8)
        if states:
            scores = torch.stack([s @ bilinear @ target for s in states])
            weights = torch.softmax(scores, 0)
            for s, a in zip(states, weights, strict=True):
                final = _gru_step(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, s, final, a)
        xs.append(torch.cat([fields["user_id"], fields["tags"], fields["genres"], target, final,
                             fields["age"], fields["vec"]]))
        all_states.append(states)
        all_events.append(events)
    logits = ref_head(model, ref_mlp(model.dnn, torch.stack(xs), train=model.training))["like"]
    if not model.training:
        return logits, None
    # auxiliary loss: consecutive pairs of each row, in jagged order, with the drawn negatives
    flat_events = [e for events in all_events for e in events]
    index, keep = model.last_negatives
    terms, p = [], 0
    for states, events in zip(all_states, all_events, strict=True):
        for t in range(len(events) - 1):
            if keep[p]:
                negative = flat_events[index[p]]
                terms.append(-logsigmoid(states[t] @ events[t + 1]) - logsigmoid(-(states[t] @ negative)))
            p += 1
    auxiliary = torch.stack(terms).mean() if terms else None
    return logits, auxiliary


@pytest.mark.parametrize("train", [False, True])
def test_dien_matches_reference(train):
    schema, rows = toy_schema(), toy_rows()
    model = DIEN(schema, ["like"], query_features=["item_id", "primary_genre"],
                 sequence_features=["hist_item_id", "hist_genre"], auxiliary_weight=0.5, hidden=[5],
                 activation="prelu")
    randomise(model)
    model.train(train)
    out = model(to_batch(schema, rows))
    logits, auxiliary = _reference(model, rows)
    assert_close(out["like"], logits)
    if train:
        index, keep = model.last_negatives
        histories = [h[-MAX_LEN:] for h in rows["hist_item_id"]]
        ids = [i for h in histories for i in h]
        starts = [sum(len(h) for h in histories[:b]) for b in range(len(histories))]
        next_event = [starts[b] + t + 1 for b, h in enumerate(histories) for t in range(len(h) - 1)]
        assert len(index) == len(next_event)
        assert all(ids[int(index[k])] != ids[next_event[k]] for k in range(len(index)) if keep[k])
        assert_close(out[AUXILIARY_LOSS], 0.5 * auxiliary)
    else:
        assert AUXILIARY_LOSS not in out  # scoring never sees the training-only loss


def test_augru_attention_gates_the_update():
    cell = AUGRUCell(3, 2)
    x, h = torch.randn(4, 3), torch.randn(4, 2)
    assert_close(cell(x, h, torch.zeros(4)), h)  # an ignored event leaves the interest as it was
    full = cell(x, h, torch.ones(4))
    for b in range(4):
        assert_close(full[b], _gru_step(cell.weight_ih, cell.weight_hh, cell.bias_ih, cell.bias_hh, x[b], h[b],
                                        torch.tensor(1.0)))


def test_dien_learns_planted_history_signal():
    schema, train = history_task(n=300, seed=0)
    torch.manual_seed(0)
    model = DIEN(schema, ["like"], hidden=[16], activation="relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(40):
        optimizer.zero_grad()
        out = model(train)
        (bce({"like": out["like"]}, train) + out[AUXILIARY_LOSS]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert auc(train.labels["like"], model(train)["like"]) > 0.9


def test_ranking_task_adds_and_logs_the_auxiliary_loss():
    """Through a real Lightning fit: the step's loss is the BCE plus the model's auxiliary loss, and both are
    logged (``train/loss`` the BCE alone, ``train/auxiliary_loss``)."""
    import lightning.pytorch as pl

    schema = toy_schema()
    batches = torch.utils.data.DataLoader([to_batch(schema, toy_rows(seed=s)) for s in range(2)], batch_size=None)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            metrics = trainer.callback_metrics
            seen.append((outputs["loss"].detach(), metrics["train/loss_step"], metrics["train/auxiliary_loss_step"]))

    torch.manual_seed(0)
    task = RankingTask(lambda s, t: DIEN(s, t, hidden=[4], auxiliary_weight=2.0), schema=schema, label="like",
                       group_feature=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, callbacks=[Record()])
    trainer.fit(task, train_dataloaders=batches)
    assert len(seen) == 2
    for loss, bce_loss, auxiliary in seen:
        assert auxiliary > 0
        assert_close(loss, bce_loss + auxiliary)
