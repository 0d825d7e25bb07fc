"""Quality metrics: FD-digits, class accuracy, precision / recall (k-NN manifolds), sliced W2 (GMM point
sets), endpoint RMSE.

Inputs may be torch tensors or numpy arrays; statistics are computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch


def _np64(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().to(torch.float64).numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or inf")
    return a


def _images(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x.detach().cpu() if isinstance(x, torch.Tensor) else np.asarray(x)).to(torch.float32)
    if t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or tuple(t.shape[1:]) != (1, 8, 8):
        raise ValueError(f"{name}: expected digits images [N, 1, 8, 8] (or [N, 8, 8]) in [−1, 1], got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: contains NaN or inf")
    return t


def digit_features(x, classifier=None, batch: int = 1000) -> np.ndarray:
    """The shipped classifier's 64-d penultimate features, float64 [N, 64]."""
    from .classifier import load_classifier

    clf = classifier or load_classifier()
    x = _images(x, "samples")
    with torch.no_grad():
        f = torch.cat([clf.features(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    return f.to(torch.float64).numpy()


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """|μ1 − μ2|² + tr Σ1 + tr Σ2 − 2 tr √(Σ1^½ Σ2 Σ1^½).

    The symmetric form keeps every matrix square root a symmetric PSD eigendecomposition
    (no general sqrtm, no complex parts); tr √(Σ1 Σ2) is the same number."""
    s1h = _sqrt_psd(cov1)
    m = s1h @ cov2 @ s1h
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    d = mu1 - mu2
    return float(max(d @ d + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt, 0.0))


def _gauss(f: np.ndarray):
    return f.mean(0), np.cov(f, rowvar=False)


def fd_digits(samples, reference, classifier=None) -> float:
    """Fréchet distance between Gaussian fits of classifier features of ``samples`` and ``reference``
    (both [N, 1, 8, 8] in [−1, 1]; ≥ 2 images each). Lower is better; real-vs-real is the floor."""
    fa, fb = digit_features(samples, classifier), digit_features(reference, classifier)
    if fa.shape[0] < 2 or fb.shape[0] < 2:
        raise ValueError(f"fd_digits needs at least 2 images per set, got {fa.shape[0]} and {fb.shape[0]}")
    return frechet_distance(*_gauss(fa), *_gauss(fb))


def precision_recall(generated, real, k: int = 3, batch: int = 1024) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019) of feature sets [N, d], [M, d].

    Each set's manifold is the union of closed balls around its points, radius = the distance to the
    point's k-th nearest neighbour in its own set (the point itself excluded). Precision = fraction of
    ``generated`` points inside the real manifold; recall = fraction of ``real`` points inside the
    generated one. Mode collapse shows as low recall at high precision. Euclidean distances, float64."""
    a, b = _np64(generated, "generated"), _np64(real, "real")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"precision_recall: expected feature sets [N, d] and [M, d] with the same d, "
                         f"got {a.shape} and {b.shape}")
    if not 1 <= k < min(len(a), len(b)):
        raise ValueError(f"precision_recall: k = {k} needs more than k points in each set, "
                         f"got {len(a)} and {len(b)}")
    ra, rb = _knn_radius(a, k, batch), _knn_radius(b, k, batch)
    return _inside(a, b, rb, batch), _inside(b, a, ra, batch)


def _dist(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # from coordinate differences (not |x|² + |y|² − 2x·y, which cancels for near points): a point's distance
    # to an identical point is exactly 0
    return torch.cdist(torch.from_numpy(x), torch.from_numpy(y), compute_mode="donot_use_mm_for_euclid_dist").numpy()


def _knn_radius(f: np.ndarray, k: int, batch: int) -> np.ndarray:
    out = np.empty(len(f))
    for i in range(0, len(f), batch):
        d = _dist(f[i:i + batch], f)
        d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = -np.inf  # itself: never one of its neighbours
        out[i:i + batch] = np.partition(d, k, axis=1)[:, k]  # sorted position 0 holds the self entry
    return out


def _inside(q: np.ndarray, ref: np.ndarray, radius: np.ndarray, batch: int) -> float:
    """Fraction of ``q`` within ``radius[j]`` of some ``ref[j]``."""
    hit = np.zeros(len(q), bool)
    for i in range(0, len(q), batch):
        hit[i:i + batch] = (_dist(q[i:i + batch], ref) <= radius[None]).any(1)
    return float(hit.mean())


def digits_precision_recall(samples, reference, k: int = 3, classifier=None) -> tuple[float, float]:
    """``precision_recall`` in the digits classifier's 64-d feature space (FD-digits' features)."""
    return precision_recall(digit_features(samples, classifier), digit_features(reference, classifier), k)


def class_accuracy(samples, labels, classifier=None) -> float:
    """Fraction of ``samples`` the shipped classifier assigns to the requested ``labels`` ([N] ints)."""
    from .classifier import load_classifier

    x = _images(samples, "samples")
    y = torch.as_tensor(labels.detach().cpu() if isinstance(labels, torch.Tensor) else np.asarray(labels)).long()
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels: expected shape ({x.shape[0]},), one per sample, got {tuple(y.shape)}")
    clf = classifier or load_classifier()
    with torch.no_grad():
        pred = torch.cat([clf(x[i:i + 1000]).argmax(1) for i in range(0, x.shape[0], 1000)])
    return float((pred == y).double().mean())


def sliced_w2(a, b, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between point sets a [N, d] and b [M, d]:
    √(mean over random unit directions θ of W2²(θ·a, θ·b)).

    Each 1-D W2 is exact: sorted projections matched in order when N = M, otherwise both
    empirical quantile functions evaluated at the max(N, M) mid-point levels (k + ½)/n.
    For b = a + v the value is √(mean (θ·v)²) ≈ |v|/√d (exactly |v| in 1-D)."""
    a, b = _np64(a, "a"), _np64(b, "b")
    if a.ndim == 1:
        a = a[:, None]
    if b.ndim == 1:
        b = b[:, None]
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"sliced_w2: expected point sets [N, d] and [M, d] with the same d, "
                         f"got {a.shape} and {b.shape}")
    if len(a) == 0 or len(b) == 0:
        raise ValueError("sliced_w2: empty point set")
    theta = projections(a.shape[1], n_proj, seed)
    pa, pb = np.sort(a @ theta.T, axis=0), np.sort(b @ theta.T, axis=0)
    if len(pa) != len(pb):
        n = max(len(pa), len(pb))
        levels = (np.arange(n) + 0.5) / n
        pa, pb = _quantiles(pa, levels), _quantiles(pb, levels)
    return float(np.sqrt(((pa - pb) ** 2).mean()))


def projections(dim: int, n_proj: int, seed: int = 0) -> np.ndarray:
    """The unit directions sliced_w2 uses: [n_proj, dim], Gaussian draws normalised (seeded)."""
    th = np.random.default_rng(seed).standard_normal((n_proj, dim))
    return th / np.linalg.norm(th, axis=1, keepdims=True)


def _quantiles(sorted_cols: np.ndarray, levels: np.ndarray) -> np.ndarray:
    # The empirical quantile function is a step function: level ℓ picks the ⌊ℓ·n⌋-th order statistic.
    n = sorted_cols.shape[0]
    return sorted_cols[np.minimum((levels * n).astype(np.int64), n - 1)]


def rmse(a, b) -> float:
    """Per-sample RMS over all of a sample's elements, averaged over samples: mean_i √(mean_j (a_ij − b_ij)²)."""
    a, b = _np64(a, "a"), _np64(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"rmse: shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 0 or a.shape[0] == 0:
        raise ValueError("rmse: expected a batch [N, ...] with N ≥ 1")
    d = (a - b).reshape(a.shape[0], -1)
    return float(np.sqrt((d**2).mean(1)).mean())
