"""Behaviour-to-interest dynamic routing (MIND, Li et al. 2019; ComiRec-DR, Cen et al. 2020).

A user's behaviours ``e_1..e_n`` (item embeddings, ``(n, D)``) are clustered
into ``K_u`` interest capsules by routing by agreement (Sabour et al. 2017)::

    e_hat_{k|i} = S e_i              MIND's B2I routing: one bilinear map S shared by all interests
    e_hat_{k|i} = W_k e_i            ComiRec-DR: one map per interest
    b_{ki}      <- init              MIND: fixed random N(0, sigma^2) (a shared S would make every
                                     capsule identical from a zero start); ComiRec-DR: 0
    repeat r times:
        w_{ki} = softmax_k(b_{ki})                   over the user's K_u interests, per behaviour i
        z_k    = sum_i w_{ki} e_hat_{k|i}
        u_k    = squash_p(z_k)
        b_{ki} <- b_{ki} + u_k . e_hat_{k|i}         (not after the last iteration)

    squash_p(z) = (|z|^2 / (1 + |z|^2))^p  z / |z|     p in [0, 1]

``p = 1`` is the capsule squash of the papers: a capsule fed by few or weak
behaviours is shrunk towards zero and then never wins a ranking, one way
interests collapse onto the strongest ones. The *sharpened* squash ``p < 1``
keeps the direction and raises short lengths towards 1 (``p = 0`` is plain L2
normalisation), so every interest competes on its direction.

The number of interests grows with the history (MIND, eq. 9; torch-rechub
#240 is the bug of a fixed count)::

    K_u = max(1, min(K, floor(log2 n_u)))          (n_u = 0 or 1: one interest)

Interests ``k >= K_u`` take no routing weight and come out as zero vectors;
``interest_mask`` says which exist. Shapes: events ``(B, L, D)`` padded with a
``(B, L)`` mask (L this batch's longest history), capsules ``(B, K, D)``.
"""

from __future__ import annotations

import torch
from torch import nn

SQUASH_EPS = 1e-9


def squash(z: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """``(|z|^2 / (1 + |z|^2))^power * z / |z|`` over the last dim; 0 stays 0 (with finite gradients)."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"squash: power must lie in [0, 1], got {power}")
    norm2 = (z * z).sum(-1, keepdim=True).clamp(min=SQUASH_EPS)  # (..., 1)
    scale = (norm2 / (1.0 + norm2)) ** power / norm2.sqrt()  # (..., 1)
    return z * scale


def interest_counts(lengths: torch.Tensor, max_interests: int, dynamic: bool = True) -> torch.Tensor:
    """``(B,)`` interests per user: ``max(1, min(K, floor(log2 n)))`` (``dynamic``), else K for everyone."""
    if not dynamic:
        return torch.full_like(lengths, max_interests)
    log2 = torch.floor(torch.log2(lengths.clamp(min=1).double())).long()  # (B,)
    return log2.clamp(min=1, max=max_interests)


def interest_mask(counts: torch.Tensor, max_interests: int) -> torch.Tensor:
    """``(B, K)`` True for the interests a user has (the first ``counts[b]``)."""
    return torch.arange(max_interests, device=counts.device).unsqueeze(0) < counts.unsqueeze(1)


class DynamicRouting(nn.Module):
    """Behaviour-to-interest routing; see the module docstring.

    Args:
        dim: D, width of the behaviour embeddings and of the capsules.
        num_interests: K, the most interests a user gets.
        max_len: the longest history (size of MIND's fixed random routing-logit init).
        iterations: routing iterations r.
        shared_map: True: MIND's one bilinear map S with random logit init; False: ComiRec-DR's
            map per interest with zero init.
        squash_power: p of the (sharpened) squash, in [0, 1].
        init_std: sigma of MIND's random logit init (drawn once, from ``seed``, then fixed: the
            same history always gives the same interests).
        detach_routing: ComiRec-DR's stop-gradient: the logit updates of all but the last
            iteration see the predictions ``e_hat`` detached.
    """

    def __init__(
        self,
        dim: int,
        num_interests: int,
        max_len: int,
        iterations: int = 3,
        shared_map: bool = True,
        squash_power: float = 1.0,
        init_std: float = 1.0,
        detach_routing: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if num_interests <= 0 or iterations <= 0 or max_len <= 0:
            raise ValueError(
                f"DynamicRouting: num_interests, iterations and max_len must be positive, "
                f"got {num_interests}, {iterations}, {max_len}"
            )
        if not 0.0 <= squash_power <= 1.0:
            raise ValueError(f"DynamicRouting: squash_power must lie in [0, 1], got {squash_power}")
        self.num_interests, self.iterations, self.max_len = num_interests, iterations, max_len
        self.shared_map, self.squash_power, self.detach_routing = shared_map, squash_power, detach_routing
        maps = 1 if shared_map else num_interests
        self.maps = nn.Parameter(torch.empty(maps, dim, dim))  # S (1, D, D) or W_k (K, D, D)
        nn.init.xavier_uniform_(self.maps.view(maps * dim, dim))
        if shared_map:
            generator = torch.Generator().manual_seed(seed)
            init = torch.randn(num_interests, max_len, generator=generator) * init_std  # (K, max_len)
        else:
            init = torch.zeros(num_interests, max_len)
        self.register_buffer("initial_logits", init)

    def predictions(self, events: torch.Tensor) -> torch.Tensor:
        """``(B, K, L, D)``: ``e_hat_{k|i}``, each behaviour through its interest's map."""
        hat = torch.einsum("mde,ble->bmld", self.maps, events)  # (B, 1 or K, L, D)
        return hat.expand(-1, self.num_interests, -1, -1)  # (B, K, L, D)

    def forward(self, events: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Capsules ``(B, K, D)`` of padded ``events`` ``(B, L, D)`` (``mask`` ``(B, L)`` real positions),
        ``counts`` ``(B,)`` interests per user; capsules ``k >= counts[b]`` are zero."""
        batch, length, _ = events.shape
        if length > self.max_len:
            raise ValueError(f"DynamicRouting: histories of {length} events exceed max_len {self.max_len}")
        hat = self.predictions(events)  # (B, K, L, D)
        hat_routing = hat.detach() if self.detach_routing else hat
        logits = self.initial_logits[:, :length].unsqueeze(0).expand(batch, -1, -1)  # (B, K, L)
        absent = ~interest_mask(counts, self.num_interests).unsqueeze(2)  # (B, K, 1)
        real = mask.unsqueeze(1).to(events.dtype)  # (B, 1, L)
        capsules = events.new_zeros(batch, self.num_interests, events.shape[2])
        for iteration in range(self.iterations):
            last = iteration == self.iterations - 1
            weights = torch.softmax(logits.masked_fill(absent, float("-inf")), dim=1) * real  # (B, K, L)
            source = hat if last else hat_routing
            capsules = squash(torch.einsum("bkl,bkld->bkd", weights, source), self.squash_power)  # (B, K, D)
            if not last:
                logits = logits + torch.einsum("bkd,bkld->bkl", capsules, hat_routing)  # (B, K, L)
        return capsules.masked_fill(absent, 0.0)  # (B, K, D)
