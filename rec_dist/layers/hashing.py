"""SimHash signatures for ETA and SDIM (Charikar 2002: random hyperplanes preserve angles).

A fixed Gaussian projection ``R`` ``(D, rounds * bits)`` maps a vector x to ``rounds`` signatures of
``bits`` sign bits each::

    sig_j(x) = sum_i [ (x R)_{j*bits + i} > 0 ] * 2^i          j = 0..rounds-1

Two vectors at angle theta agree on one bit with probability ``1 - theta / pi``, so the Hamming
distance between signatures estimates the angle (ETA, Chen et al. 2021) and a whole round of tau bits
collides with probability ``(1 - theta / pi)^tau`` (SDIM, Cao et al. 2022). ``R`` is a buffer drawn
from ``seed`` (not trained; saved in the state dict) and no gradient flows through a signature: the
models hash their live, jointly trained embeddings, detached.
"""

from __future__ import annotations

import torch
from torch import nn

from rec_dist.errors import ConfigError

MAX_BITS = 52  # one round's bits are packed exactly through float64 (53-bit mantissa) into one int64
BLOCK_ROWS = 1 << 16  # vectors projected at once (bounds the (n, rounds * bits) temporary)


class SimHash(nn.Module):
    """``rounds`` SimHash signatures of ``bits`` bits each; see the module docstring.

    Args:
        dim: D, the size of the hashed vectors.
        bits: bits per signature (at most 52).
        rounds: independent signatures per vector (SDIM's m hashes; ETA uses one).
        seed: seed of the random projection.
    """

    def __init__(self, dim: int, bits: int, rounds: int = 1, seed: int = 0, where: str = "SimHash") -> None:
        super().__init__()
        if dim <= 0:
            raise ConfigError(f"{where}: the hashed vectors' dim must be positive, got {dim}")
        if not 1 <= bits <= MAX_BITS:
            raise ConfigError(f"{where}: hash bits must be in [1, {MAX_BITS}], got {bits}")
        if rounds <= 0:
            raise ConfigError(f"{where}: hash rounds must be positive, got {rounds}")
        self.dim, self.bits, self.rounds, self.seed = dim, bits, rounds, seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(dim, rounds * bits, generator=generator))  # (D, m*tau)
        # Packing the bits is one matmul with a block-diagonal matrix of powers of two: exact in float32 up to
        # 24 bits (half the memory of float64, which wider signatures need).
        exact = torch.float32 if bits <= 24 else torch.float64
        packing = torch.block_diag(*[2.0 ** torch.arange(bits, dtype=exact).unsqueeze(1)] * rounds)
        self.register_buffer("packing", packing, persistent=False)  # (m*tau, m)

    def signs(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, rounds, bits)`` bool: the sign bits of ``x`` ``(n, D)``."""
        with torch.no_grad():
            projected = x.detach().to(self.projection.dtype) @ self.projection  # (n, m*tau)
        return (projected > 0).view(x.shape[0], self.rounds, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, rounds)`` int64 signatures of ``x`` ``(n, D)``, in blocks of ``BLOCK_ROWS`` rows."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"SimHash(dim={self.dim}): expected (n, {self.dim}) vectors, got {tuple(x.shape)}")
        out = torch.empty(x.shape[0], self.rounds, dtype=torch.int64, device=x.device)  # (n, m)
        for start in range(0, x.shape[0], BLOCK_ROWS):
            block = slice(start, start + BLOCK_ROWS)
            bits = self.signs(x[block]).view(-1, self.rounds * self.bits)  # (b, m*tau)
            out[block] = (bits.to(self.packing.dtype) @ self.packing).long()  # (b, m)
        return out


def popcount(x: torch.Tensor) -> torch.Tensor:
    """Bits set in each non-negative int64 of ``x`` (SWAR bit counting: no per-byte lookup table in memory)."""
    x = x - ((x >> 1) & 0x5555555555555555)
    x = (x & 0x3333333333333333) + ((x >> 2) & 0x3333333333333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0F  # one count per byte
    x = x + (x >> 8)
    x = x + (x >> 16)
    return (x + (x >> 32)) & 0x7F


def hamming_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(n,)`` number of differing bits between the int64 signatures ``a`` and ``b`` ``(n, rounds)``,
    summed over the rounds."""
    return popcount(torch.bitwise_xor(a, b)).sum(dim=1)  # (n,)
