"""Counter-based Gaussian noise shared by every fewstep runtime (numpy reference).

One seed must give the same z and ε in Python, in an exported graph fed from Python and in the
C++ runtime (``fewstep_randn`` in ``runtime/include/fewstep.h``, ``fewstep._C.randn``), and a
sample's noise must not depend on the batch it is drawn in. So the noise is a pure function of
(seed, sample index, stream, element index):

Generator: Philox4x32-10 (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers: as easy
as 1, 2, 3"; constants as in Random123): round multipliers 0xD2511F53, 0xCD9E8D57, Weyl key
increments 0x9E3779B9, 0xBB67AE85, 10 rounds. Key = (seed & 0xffffffff, seed >> 32) for a
64-bit seed.

Streams: sample index ``i`` is absolute (``first_sample + b`` for row b of a batch); stream
``s`` is 0 for the initial z and 1 + j for the ε of the j-th stochastic plan row. Element n of
a sample's flattened tensor comes from counter ``(n//4 mod 2^32, n//4 >> 32, i, s)``, output
word ``n % 4``. Hence i < 2^32 and s < 2^32.

Box–Muller, per counter block, on word pairs (w0, w1) → (n0, n1) and (w2, w3) → (n2, n3), all
in float64 and rounded to float32 once at the end::

    u1 = (w0 + 0.5)·2^-32,  u2 = (w1 + 0.5)·2^-32       (both exact, in (0, 1))
    r  = sqrt(−2·ln u1),   n0 = r·cos(2π·u2),   n1 = r·sin(2π·u2)

The C++ side evaluates the same float64 expression in the same order with FMA contraction off.
+, ·, sqrt are correctly rounded on both sides; ln/cos/sin come from numpy and from the C
library, which can differ by one float64 ulp (numpy 2.4's AVX-512 log differs from glibc's on
~0.4 % of inputs), and such a difference moves the float32 result only when the float64 value
lies within an ulp of a float32 rounding boundary (about 2^-28 of those cases). The float32
outputs are therefore identical in practice (tests compare millions of values bit for bit) but
not by construction.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from ..errors import FewstepError

# One draw holds batch × sample size float32 values and ~10× that in uint64/float64 temporaries:
# 2^25 values (128 MiB out, ~3 GB at the peak) is the most one call may ask for.
MAX_ELEMENTS = 2**25


class NoiseError(FewstepError):
    """A seed, count or shape the generator cannot serve."""

__all__ = ["draw", "philox4x32_10", "randn"]

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def philox4x32_10(counter, key) -> np.ndarray:
    """Philox4x32-10 block function: ``counter`` uint32 [..., 4], ``key`` uint32 [..., 2] → uint32 [..., 4].

    ``counter`` and ``key`` broadcast against each other (over the leading axes).
    """
    ctr = np.asarray(counter)
    k = np.asarray(key)
    if ctr.shape[-1:] != (4,) or k.shape[-1:] != (2,):
        raise ValueError(f"philox4x32_10: counter must be [..., 4] and key [..., 2], got {ctr.shape} and {k.shape}")
    for name, a in (("counter", ctr), ("key", k)):
        if a.dtype != np.uint32:
            if a.dtype.kind not in "iu" or (a.size and (a.min() < 0 or a.max() > 0xFFFFFFFF)):
                raise ValueError(f"philox4x32_10: {name} must hold 32-bit unsigned integers")
    # 32-bit words are carried in uint64 so the 32x32 → 64-bit products are exact.
    ctr = ctr.astype(np.uint64)
    k = k.astype(np.uint64)
    c0, c1, c2, c3 = ctr[..., 0], ctr[..., 1], ctr[..., 2], ctr[..., 3]
    k0, k1 = k[..., 0], k[..., 1]
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    w0, w1 = np.uint64(PHILOX_W0), np.uint64(PHILOX_W1)
    for r in range(PHILOX_ROUNDS):
        if r:  # the key is bumped between rounds, not before the first
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = (p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32
    return np.stack(np.broadcast_arrays(c0, c1, c2, c3), axis=-1).astype(np.uint32)


def _check_int(name: str, value, lo: int, hi: int) -> int:
    """``value`` as a Python int in [lo, hi) (bool and float rejected: they are almost always bugs)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise NoiseError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    v = int(value)
    if not lo <= v < hi:
        def fmt(b):
            return f"2^{b.bit_length() - 1}" if b > 1024 and b & (b - 1) == 0 else str(b)

        raise NoiseError(f"{name} must be in [{fmt(lo)}, {fmt(hi)}), got {v}")
    return v


def _check_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise NoiseError(f"shape must be a sequence of positive integers, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or d < 1:
            raise NoiseError(f"shape must be a sequence of positive integers, got {shape!r}")
    return tuple(int(d) for d in dims)


def _randn(seed: int, batch: int, per_sample: int, stream: int, first_sample: int) -> np.ndarray:
    """float32 [batch, per_sample]; arguments already validated."""
    blocks = -(-per_sample // 4)
    b = np.arange(blocks, dtype=np.uint64)
    ctr = np.empty((batch, blocks, 4), np.uint64)
    ctr[..., 0] = b & _MASK32
    ctr[..., 1] = b >> _SHIFT32
    ctr[..., 2] = np.arange(first_sample, first_sample + batch, dtype=np.uint64)[:, None]
    ctr[..., 3] = stream
    key = np.array([seed & 0xFFFFFFFF, seed >> 32], np.uint64)
    w = philox4x32_10(ctr, key).astype(np.float64)
    # Keep this expression and its evaluation order in step with box_muller() in runtime/src/philox.cpp.
    u = (w + 0.5) * 2.0**-32
    r = np.sqrt(-2.0 * np.log(u[..., 0::2]))
    theta = (2.0 * math.pi) * u[..., 1::2]
    out = np.empty((batch, blocks, 4), np.float64)
    out[..., 0::2] = r * np.cos(theta)
    out[..., 1::2] = r * np.sin(theta)
    return out.reshape(batch, blocks * 4)[:, :per_sample].astype(np.float32)


def randn(seed: int, batch: int, shape, stream: int = 0, first_sample: int = 0) -> np.ndarray:
    """Standard-normal float32 [batch, *shape]: samples first_sample … first_sample+batch−1 of ``stream``.

    ``seed`` in [0, 2^64); ``stream`` in [0, 2^32) (0 = z, 1 + j = ε of stochastic row j);
    ``first_sample + batch`` ≤ 2^32. Row b equals ``randn(seed, 1, shape, stream, first_sample + b)[0]``.
    """
    seed = _check_int("seed", seed, 0, 2**64)
    batch = _check_int("batch", batch, 1, 2**32)
    dims = _check_shape(shape)
    stream = _check_int("stream", stream, 0, 2**32)
    first_sample = _check_int("first_sample", first_sample, 0, 2**32)
    if first_sample + batch > 2**32:
        raise NoiseError(f"first_sample + batch must be ≤ 2^32 (sample indices are 32-bit), got {first_sample + batch}")
    per_sample = math.prod(dims)
    if batch * per_sample > MAX_ELEMENTS:
        raise NoiseError(f"{batch:,} samples × {per_sample:,} values = {batch * per_sample:,} values in one draw; "
                         f"at most {MAX_ELEMENTS:,} (draw in batches with first_sample)")
    return _randn(seed, batch, per_sample, stream, first_sample).reshape((batch, *dims))


def draw(seed: int, batch: int, shape, n_stochastic: int, first_sample: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """All the noise one plan run needs: ``z`` [batch, *shape] (stream 0) and ``noise``
    [n_stochastic, batch, *shape] (slice j = stream 1 + j), float32, as the executors take them.
    """
    n_stochastic = _check_int("n_stochastic", n_stochastic, 0, 2**32)  # streams 1 … n_stochastic < 2^32
    z = randn(seed, batch, shape, 0, first_sample)
    noise = np.empty((n_stochastic, *z.shape), np.float32)
    for j in range(n_stochastic):
        noise[j] = randn(seed, batch, shape, 1 + j, first_sample)
    return z, noise
