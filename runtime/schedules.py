"""σ schedules. Each returns n + 1 float64 values σ_0 > … > σ_{n−1} > σ_n = 0.

The final 0 is the data end of the grid; a step to σ = 0 returns the denoiser output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


class ScheduleError(ValueError):
    pass


def _check(n: int, sigma_min: float, sigma_max: float):
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ScheduleError(f"schedule: number of steps must be an integer ≥ 1, got {n!r}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ScheduleError(f"schedule: need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")


def _close(s: np.ndarray) -> np.ndarray:
    return np.append(np.asarray(s, dtype=np.float64), 0.0)


def edm(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) eq. 5: uniform in σ^(1/ρ)."""
    _check(n, sigma_min, sigma_max)
    if n == 1:
        return _close([sigma_max])
    i = np.arange(n, dtype=np.float64) / (n - 1)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _close((hi + i * (lo - hi)) ** rho)


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    """Uniform in log-SNR = −2 log σ (DPM-Solver's 'logSNR' / time-uniform in λ)."""
    _check(n, sigma_min, sigma_max)
    if n == 1:
        return _close([sigma_max])
    return _close(np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n)))


def vp_uniform_t(
    n: int, sigma_min: float, sigma_max: float, beta_d: float = 19.9, beta_min: float = 0.1
) -> np.ndarray:
    """Uniform in the continuous VP time t (Song et al. 2021; EDM's 'VP' discretisation).

    σ(t) = sqrt(exp(½β_d t² + β_min t) − 1); t runs uniformly from t(σ_max) to t(σ_min).
    """
    _check(n, sigma_min, sigma_max)

    def t_of(sig):  # inverse of σ(t): solve ½β_d t² + β_min t = log(1 + σ²)
        return (math.sqrt(beta_min**2 + 2 * beta_d * math.log1p(sig**2)) - beta_min) / beta_d

    if n == 1:
        return _close([sigma_max])
    t = np.linspace(t_of(sigma_max), t_of(sigma_min), n)
    return _close(np.sqrt(np.expm1(0.5 * beta_d * t**2 + beta_min * t)))


def explicit(sigmas: Sequence[float]) -> np.ndarray:
    """A given list, strictly decreasing and positive; 0 is appended unless it ends in 0."""
    s = np.asarray(list(sigmas), dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ScheduleError("schedule: explicit sigmas must be a non-empty list")
    if not np.all(np.isfinite(s)):
        raise ScheduleError("schedule: explicit sigmas must be finite")
    if s[-1] != 0.0:
        s = np.append(s, 0.0)
    if np.any(s[:-1] <= 0) or np.any(np.diff(s) >= 0):
        raise ScheduleError(f"schedule: explicit sigmas must be positive and strictly decreasing, got {list(s)}")
    return s


SCHEDULES = {"edm": edm, "logsnr": logsnr_uniform, "vp": vp_uniform_t}


def make(name: str, n: int, sigma_min: float, sigma_max: float) -> np.ndarray:
    try:
        fn = SCHEDULES[name]
    except KeyError:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}") from None
    return fn(n, sigma_min, sigma_max)
