"""Sampled softmax (in-batch): against a per-row loop and hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from rec_dist.losses.sampled_softmax import in_batch_softmax_loss, sampled_softmax_loss


def naive_in_batch(q, v, ids, tau=1.0, log_q=None):
    """Per-row loop: -log(exp(s_bb) / sum over non-hit columns j of exp(s_bj))."""
    losses = []
    for b in range(len(q)):
        terms, positive = [], None
        for j in range(len(v)):
            s = float(sum(q[b][k] * v[j][k] for k in range(len(q[b])))) / tau
            if log_q is not None:
                s -= log_q[j]
            if j == b:
                positive = s
            if j == b or ids is None or ids[j] != ids[b]:
                terms.append(s)
        losses.append(-(positive - math.log(sum(math.exp(t) for t in terms))))
    return losses


def test_hand_values():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    v = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # row 0: logits (2, 1), row 1: logits (0, 2)
    expected = [-(2 - math.log(math.exp(2) + math.exp(1))), -(2 - math.log(1 + math.exp(2)))]
    got = in_batch_softmax_loss(q, v, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(in_batch_softmax_loss(q, v)) == pytest.approx(sum(expected) / 2, rel=1e-6)


@pytest.mark.parametrize("with_log_q", [False, True])
def test_against_naive_loop_with_accidental_hits(with_log_q):
    g = torch.Generator().manual_seed(0)
    q, v = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    ids = torch.tensor([5, 7, 5, 9, 7, 5])  # rows 0/2/5 and 1/4 share an item
    log_q = torch.log(torch.tensor([0.3, 0.1, 0.3, 0.05, 0.1, 0.3])) if with_log_q else None
    got = in_batch_softmax_loss(q, v, ids, temperature=0.5, log_q=log_q, reduction="none")
    ref = naive_in_batch(q.tolist(), v.tolist(), ids.tolist(), 0.5, None if log_q is None else log_q.tolist())
    assert got.tolist() == pytest.approx(ref, rel=1e-5)


def test_log_q_is_subtracted_not_added():
    """Two candidates with equal scores: the one with the larger sampling probability gets the lower logit."""
    q = torch.tensor([[1.0], [1.0]])
    v = torch.tensor([[1.0], [1.0]])
    log_q = torch.log(torch.tensor([0.5, 0.125]))
    got = in_batch_softmax_loss(q, v, log_q=log_q, reduction="none")
    # row 0: logits (1 - ln .5, 1 - ln .125) = positive is the *smaller* logit -> loss > ln 2
    s0, s1 = 1 - math.log(0.5), 1 - math.log(0.125)
    assert float(got[0]) == pytest.approx(-(s0 - math.log(math.exp(s0) + math.exp(s1))), rel=1e-6)
    assert float(got[0]) > math.log(2) > float(got[1])


def test_accidental_hit_mask_changes_the_loss():
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    same = torch.tensor([3, 3])
    # Both rows bought item 3: with the mask each row sees only its positive -> loss 0.
    assert float(in_batch_softmax_loss(q, v, same)) == pytest.approx(0.0, abs=1e-7)
    assert float(in_batch_softmax_loss(q, v)) == pytest.approx(math.log(2), rel=1e-6)


def test_general_candidates_and_gradients():
    """Extra candidates (cross-worker / mixed negatives) with labels pointing at each positive."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(3, 4, generator=g, requires_grad=True)
    cands = torch.randn(5, 4, generator=g, requires_grad=True)
    labels = torch.tensor([2, 0, 4])
    pos_ids, cand_ids = torch.tensor([10, 11, 12]), torch.tensor([11, 13, 10, 10, 12])
    loss = sampled_softmax_loss(q, cands, labels, pos_ids, cand_ids, temperature=0.2)
    ref = 0.0
    for b in range(3):
        logits = (q[b] @ cands.T) / 0.2
        keep = [j for j in range(5) if j == labels[b] or cand_ids[j] != pos_ids[b]]  # column 3 = row 0's item
        ref = ref - torch.log_softmax(logits[keep], 0)[keep.index(int(labels[b]))] / 3
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    grads = torch.autograd.grad(loss, (q, cands))
    ref_grads = torch.autograd.grad(ref, (q, cands))
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="log_q must be"):
        in_batch_softmax_loss(torch.zeros(2, 3), torch.zeros(2, 3), log_q=torch.zeros(3))
    with pytest.raises(ValueError, match="same d"):
        in_batch_softmax_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="temperature"):
        in_batch_softmax_loss(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)
