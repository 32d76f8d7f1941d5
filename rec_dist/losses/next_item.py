"""Next-item losses with sampled negatives: softmax over N uniform negatives, and SASRec's BCE.

For trained states ``s_i`` ``(T, d)``, the vector of each state's positive
(the item that came next) ``v_i`` ``(T, d)`` and negative item vectors
``u_j``, with temperature ``tau``:

**Sampled softmax with N uniform negatives** (Jean et al. 2015; the
"SASRec + sampled negatives" of Klenitskiy & Vasilev, RecSys 2023): the N
negatives are drawn uniformly from the item table once per step and shared
by every state; a negative that is the state's own positive (an accidental
hit) is masked out::

    loss_i = -log  exp(s_i·v_i / tau) / (exp(s_i·v_i / tau) + sum_{j: id(u_j) != id(v_i)} exp(s_i·u_j / tau))

With uniform sampling every item has the same ``log Q``, which cancels in
the softmax: no logQ correction is needed.

**Binary cross-entropy with one negative** (SASRec, Kang & McAuley 2018,
eq. 7): one uniform negative ``u_i`` per state; its term is dropped when it
is the state's own positive::

    loss_i = -log sigma(s_i·v_i / tau) - [id(u_i) != id(v_i)] log(1 - sigma(s_i·u_i / tau))

Both return the mean over the T states. (The full softmax over every item,
and the softmax over the batch's distinct targets, are
``rec_dist.losses.sampled_softmax.sampled_softmax_loss`` with those
candidates.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(states: torch.Tensor, positives: torch.Tensor, positive_ids: torch.Tensor, negatives: torch.Tensor,
           negative_ids: torch.Tensor, temperature: float, loss: str) -> None:
    if states.dim() != 2 or positives.shape != states.shape or negatives.dim() != 2 \
            or negatives.shape[1] != states.shape[1]:
        raise ValueError(f"{loss}: states and positives must be (T, d) and negatives (N, d), got "
                         f"{tuple(states.shape)}, {tuple(positives.shape)}, {tuple(negatives.shape)}")
    if positive_ids.shape != (states.shape[0],) or negative_ids.shape != (negatives.shape[0],):
        raise ValueError(f"{loss}: positive_ids must be ({states.shape[0]},) and negative_ids "
                         f"({negatives.shape[0]},), got {tuple(positive_ids.shape)}, {tuple(negative_ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"{loss}: temperature must be positive, got {temperature}")


def uniform_negatives_softmax_loss(
    states: torch.Tensor,
    positives: torch.Tensor,
    positive_ids: torch.Tensor,
    negatives: torch.Tensor,
    negative_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Softmax of each state's positive against N shared negatives (module docstring); a scalar.

    ``states``, ``positives`` ``(T, d)``, ``positive_ids`` ``(T,)``; ``negatives`` ``(N, d)``,
    ``negative_ids`` ``(N,)``.
    """
    _check(states, positives, positive_ids, negatives, negative_ids, temperature, "sampled softmax")
    positive = (states * positives).sum(dim=1, keepdim=True)  # (T, 1)
    negative = states @ negatives.T  # (T, N)
    hit = positive_ids.unsqueeze(1) == negative_ids.unsqueeze(0)  # (T, N): a negative that is the positive
    logits = torch.cat([positive, negative.masked_fill(hit, float("-inf"))], dim=1) / temperature  # (T, 1 + N)
    return F.cross_entropy(logits.float(), torch.zeros_like(positive_ids))  # the positive is column 0


def bce_one_negative_loss(
    states: torch.Tensor,
    positives: torch.Tensor,
    positive_ids: torch.Tensor,
    negatives: torch.Tensor,
    negative_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """SASRec's binary cross-entropy, one negative per state (module docstring); a scalar.

    ``states``, ``positives``, ``negatives`` ``(T, d)``; ``positive_ids``, ``negative_ids`` ``(T,)``.
    """
    _check(states, positives, positive_ids, negatives, negative_ids, temperature, "bce")
    if negatives.shape != states.shape:
        raise ValueError(f"bce: one negative per state: negatives must be {tuple(states.shape)}, "
                         f"got {tuple(negatives.shape)}")
    positive = (states * positives).sum(dim=1).float() / temperature  # (T,)
    negative = (states * negatives).sum(dim=1).float() / temperature  # (T,)
    keep = (negative_ids != positive_ids).to(negative.dtype)  # (T,): an accidental hit is no negative
    return (F.softplus(-positive) + keep * F.softplus(negative)).mean()  # -log sig(p) - log(1 - sig(n))
