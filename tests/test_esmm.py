"""ESMM's CTCVR logit (exact and finite at extreme logits), its outputs and ``cvr_logits``, and
its task checks; ESMM against the hand-computed reference is in ``test_multitask_models``.
"""

from __future__ import annotations

from decimal import Decimal, getcontext

import pytest
import torch
from torch.testing import assert_close

from rec_dist.data.schema import Schema
from rec_dist.models import ESMM, ctcvr_logit
from tests.model_helpers import bce, randomise, to_batch, toy_rows, toy_schema
from tests.multitask_refs import LHUC, knobs, naive_ctcvr
from tests.test_personalization import one_thread  # noqa: F401  (autouse: one intra-op thread)


def exact_ctcvr(a: float, b: float) -> float:
    """logit(sigmoid(a) sigmoid(b)) in 80-digit decimal arithmetic."""
    getcontext().prec = 80
    sa = 1 / (1 + (-Decimal(a)).exp())
    sb = 1 / (1 + (-Decimal(b)).exp())
    p = sa * sb
    return float((p / (1 - p)).ln())


VALUES = [-60.0, -30.0, -10.0, -2.0, -0.5, 0.0, 0.5, 2.0, 10.0, 30.0, 60.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ctcvr_logit_is_exact_and_finite_at_extremes(dtype):
    grid = torch.tensor(VALUES, dtype=dtype)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    a, b = a.reshape(-1).requires_grad_(True), b.reshape(-1).requires_grad_(True)
    got = ctcvr_logit(a, b)
    assert torch.isfinite(got).all()
    expected = torch.tensor([exact_ctcvr(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)], dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert_close(got, expected, rtol=tol, atol=tol)
    got.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # the naive formula agrees where it is defined ...
    moderate = (a.abs() <= 10) & (b.abs() <= 10)
    assert_close(got[moderate], naive_ctcvr(a, b)[moderate], rtol=1e-4, atol=1e-4)
    # ... and breaks down at the extremes in float32 (sigmoid(30) rounds to 1)
    if dtype == torch.float32:
        assert not torch.isfinite(naive_ctcvr(torch.tensor(30.0), torch.tensor(30.0)))


def test_esmm_outputs_and_cvr_logits():
    schema, rows = toy_schema(), toy_rows()
    model = ESMM(schema, ["click", "like"], tower_hidden=[4])
    randomise(model)
    batch = to_batch(schema, rows)
    out = model(batch)
    cvr = model.cvr_logits(batch)
    assert cvr.shape == (6,)
    assert_close(torch.sigmoid(out["like"]), torch.sigmoid(out["click"]) * torch.sigmoid(cvr))
    assert_close(out["like"], ctcvr_logit(out["click"], cvr))
    # extreme tower outputs: no NaN / inf in the logits, the loss or the gradients
    with torch.no_grad():
        model.towers[0].layers[-1].bias.fill_(40.0)
        model.towers[1].layers[-1].bias.fill_(-40.0)
    out = model(batch)
    loss = bce(out, batch)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in out.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_esmm_task_errors():
    schema = toy_schema()
    with pytest.raises(ValueError, match="exactly"):
        ESMM(schema, ["click"])
    with pytest.raises(ValueError, match="ESMM: personalization.lhuc and personalization.poso scale the bottom"):
        ESMM(schema, ["click", "like"], **knobs(LHUC))
    regression = Schema.from_dict(
        {
            "name": "r",
            "tables": {"u": {"num_embeddings": 3, "embedding_dim": 4}},
            "features": {"user_id": {"kind": "sparse", "table": "u"}},
            "labels": {"click": {"kind": "binary"}, "rating": {"kind": "regression"}},
        }
    )
    with pytest.raises(ValueError, match="must be a binary label"):
        ESMM(regression, ["click", "rating"])
