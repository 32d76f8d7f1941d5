"""Counter-based randomness: SplitMix64 hashing RNG, Zipf inverse CDF, seeded affine permutation.

Every random number is a pure function of ``(seed, stream, key)``; nothing is stateful.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_MASK = (1 << 64) - 1
_G = 0x9E3779B97F4A7C15
_M1 = 0xBF58476D1CE4E5B9
_M2 = 0x94D049BB133111EB
_G64, _M164, _M264 = np.uint64(_G), np.uint64(_M1), np.uint64(_M2)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)

# Stream ids: one per independent random quantity. Never renumber (it changes every data set).
(S_USER, S_IMP_SRC, S_IMP_ITEM, S_LEN, S_HIST_SRC, S_HIST_ITEM, S_CLICK, S_LIKE, S_PURCHASE,
 S_WT_BOUNCE, S_WT_1, S_WT_2, S_PREF, S_NEW, S_HAS_OLD, S_OLD, S_AGE_1, S_AGE_2, S_PRICE_1,
 S_PRICE_2, S_BLOCK, S_PERM_USER, S_PERM_ITEM) = range(1, 24)
# Per-user histories (user_history_len > 0): log length, event source / item, a row's history end.
S_ULEN, S_UHIST_SRC, S_UHIST_ITEM, S_END = range(24, 28)


def _mix_int(x: int) -> int:
    x &= _MASK
    x ^= x >> 30
    x = (x * _M1) & _MASK
    x ^= x >> 27
    x = (x * _M2) & _MASK
    return x ^ (x >> 31)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, in place on a fresh uint64 array."""
    z ^= z >> _S30
    z *= _M164
    z ^= z >> _S27
    z *= _M264
    z ^= z >> _S31
    return z


class _Rng:
    def __init__(self, seed: int) -> None:
        self._root = _mix_int(_mix_int(int(seed)) + _G)

    def key(self, stream: int) -> int:
        return _mix_int(self._root + (stream * _G & _MASK))

    def bits(self, keys: np.ndarray, stream: int) -> np.ndarray:
        z = np.asarray(keys).astype(np.uint64)
        z *= _G64
        z += np.uint64(self.key(stream))
        return _mix(z)

    @staticmethod
    def to_uniform(bits: np.ndarray) -> np.ndarray:
        """Uniform in the open interval (0, 1)."""
        return ((bits >> _S11).astype(np.float64) + 0.5) * (2.0**-53)

    def uniform(self, keys: np.ndarray, stream: int) -> np.ndarray:
        return self.to_uniform(self.bits(keys, stream))

    def below(self, keys: np.ndarray, stream: int, n: int) -> np.ndarray:
        return (self.bits(keys, stream) % np.uint64(n)).astype(np.int64)

    def normal(self, keys: np.ndarray, s1: int, s2: int) -> np.ndarray:
        u1, u2 = self.uniform(keys, s1), self.uniform(keys, s2)
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


def _zipf_rank(u: np.ndarray, n: int, a: float) -> np.ndarray:
    """Rank in 1..n with P(k) ~ k**-a: continuous inverse CDF of x**-a on [0.5, n+0.5), rounded."""
    lo, hi = 0.5, n + 0.5
    if abs(a - 1.0) < 1e-9:
        x = lo * np.exp(u * math.log(hi / lo))
    else:
        e = 1.0 - a
        lo_e, hi_e = lo**e, hi**e
        x = (lo_e + u * (hi_e - lo_e)) ** (1.0 / e)
    return np.clip(np.floor(x + 0.5), 1, n).astype(np.int64)


@dataclass(frozen=True)
class _Perm:
    """Seeded affine bijection rank (1..n) <-> id (1..n): id = (a*(rank-1) + b) % n + 1."""

    n: int
    a: int
    b: int
    a_inv: int

    @classmethod
    def make(cls, n: int, rng: _Rng, stream: int) -> _Perm:
        if n == 1:
            return cls(1, 1, 0, 1)
        a = 1 + rng.key(stream) % (n - 1)
        while math.gcd(a, n) != 1:
            a = a % (n - 1) + 1
        b = rng.key(stream + 1000) % n
        return cls(n, a, b, pow(a, -1, n))

    def to_id(self, rank: np.ndarray) -> np.ndarray:
        return (self.a * (rank - 1) + self.b) % self.n + 1

    def to_rank(self, ids: np.ndarray) -> np.ndarray:
        return (self.a_inv * ((ids - 1 - self.b) % self.n)) % self.n + 1

