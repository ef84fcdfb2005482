"""k-nearest-neighbour estimates of I(X;F) and I(Y;F): the independent check on the variational estimators.

No model of the dependence between the variables is fitted, so nothing can over-fit it. The estimators read the
same preprocessed features and the same input components as the variational ones (`estimators.whiten_features`,
`estimators.input_components`), truncated to their top `dim` (default 8) components, because kNN estimators are
close to unbiased in a few dimensions but degrade quickly beyond about ten. All distances are max-norm
(Chebyshev), as in both estimators' derivations.
"""

import math

import torch

from ...errors import UserError
from .estimators import (STREAM_KNN_NOISE, X_COMPONENTS, inputs_matrix, as_matrix, generator, input_components, judged,
                         label_codes, whiten_features)

# Rows of the distance matrix computed at once: 512 x 5000 float64 is 20 MB per matrix.
_CHUNK = 512


def _digamma(values) -> torch.Tensor:
    return torch.special.digamma(torch.as_tensor(values, dtype=torch.float64))


def _chebyshev_rows(points: torch.Tensor):
    """Yield (rows, distances from those rows to all points) with each row's self-distance set to inf."""
    for start in range(0, len(points), _CHUNK):
        rows = torch.arange(start, min(start + _CHUNK, len(points)))
        distances = torch.cdist(points[rows], points, p=math.inf)
        distances[torch.arange(len(rows)), rows] = math.inf
        yield rows, distances


def _ksg(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """KSG estimator 1: psi(k) + psi(N) - <psi(n_a + 1) + psi(n_b + 1)>.

    eps_i is the distance to the k-th neighbour in the joint space; n_a, n_b count the points
    strictly closer than eps_i in each marginal space.
    """
    n = len(a)
    n_a, n_b = torch.empty(n), torch.empty(n)
    for (rows, dist_a), (_, dist_b) in zip(_chebyshev_rows(a), _chebyshev_rows(b)):
        eps = torch.maximum(dist_a, dist_b).topk(k, dim=1, largest=False).values[:, -1:]
        n_a[rows] = (dist_a < eps).sum(1).to(n_a.dtype)
        n_b[rows] = (dist_b < eps).sum(1).to(n_b.dtype)
    return float(_digamma(k) + _digamma(n) - (_digamma(n_a + 1) + _digamma(n_b + 1)).mean())


def _ross(points: torch.Tensor, codes: torch.Tensor, k: int) -> float:
    """Ross (2014): psi(N) - <psi(N_y)> + <psi(k_i)> - <psi(m_i)>.

    d_i is the distance to the k_i-th neighbour with the same label (k_i = k, or fewer for a class
    with at most k members); m_i counts all points within d_i. Points whose label occurs once have
    no neighbour of their class and are left out, as in scikit-learn's implementation.
    """
    counts = torch.bincount(codes)
    keep = counts[codes] > 1
    points, codes = points[keep], codes[keep]
    class_size = counts[codes]
    k_i = torch.clamp(class_size - 1, max=k)
    m_i = torch.empty(len(points))
    for rows, distances in _chebyshev_rows(points):
        same = codes[rows].unsqueeze(1) == codes.unsqueeze(0)
        nearest = torch.where(same, distances, math.inf).topk(k, dim=1, largest=False).values
        radius = nearest.gather(1, (k_i[rows] - 1).unsqueeze(1))
        m_i[rows] = (distances <= radius).sum(1).to(m_i.dtype)
    return float(
        _digamma(len(points))
        - _digamma(class_size).mean()
        + _digamma(k_i).mean()
        - _digamma(m_i).mean()
    )


def knn_with(z: torch.Tensor, u: torch.Tensor | None, codes: torch.Tensor, *, seed: int = 0, dim: int = 8,
             k: int = 3) -> dict:
    """KSG I(X;F) (when `u` is given) and Ross I(Y;F) on the top `dim` columns of whitened features `z` and input
    components `u` (both ordered by variance), with seeded 1e-10 noise to break distance ties."""
    if k < 1 or dim < 1:
        raise ValueError(f"k and dim must be positive, got k={k}, dim={dim}")
    if int((torch.bincount(codes)[codes] > 1).sum()) <= k:
        raise UserError(f"need more than k={k} samples whose label occurs at least twice, got {len(codes)} samples")
    noise = generator(seed, STREAM_KNN_NOISE)
    f = z[:, :dim] if z.shape[1] else torch.zeros(len(z), 1, dtype=z.dtype)  # no usable unit: no information
    f = f + 1e-10 * torch.randn(f.shape, generator=noise, dtype=f.dtype)
    out = {**judged("i_yf", _ross(f, codes, k), -math.inf), "dim_f": min(dim, z.shape[1])}
    if u is not None:
        x = u[:, :dim] + 1e-10 * torch.randn(u[:, :dim].shape, generator=noise, dtype=u.dtype)
        out.update(judged("i_xf", _ksg(f, x, k), -math.inf), dim_x=x.shape[1])
    return out


def knn_mi(features, inputs, labels, *, seed: int = 0, dim: int = 8, k: int = 3) -> dict:
    """kNN estimates of I(X;F) (KSG estimator 1) and I(Y;F) (Ross 2014) in nats, on all N samples.

    features: float [N, D]; inputs: float [N, C, H, W] or [N, P]; labels: integer [N]. F is preprocessed as for the
    variational estimators and X represented by its principal components; the top `dim` of each are used. kNN
    estimates scatter around 0 for independent variables, so a negative raw value is clipped (and flagged).

    Returns i_xf and i_yf (>= 0) with _raw/_status/_clipped keys, and dim_f, dim_x: the components used.
    """
    f = as_matrix(features, "features")
    x = inputs_matrix(inputs, len(f))
    codes = label_codes(labels, len(f))
    every = torch.arange(len(f))
    return knn_with(whiten_features(f, every).z, input_components(x, every, max(dim, X_COMPONENTS), seed), codes,
                    seed=seed, dim=dim, k=k)
