"""k-nearest-neighbour estimates of I(X;F) and I(Y;F) on low-dimensional whitened projections.

This is the independent check on the variational estimators in `estimators.py`: no model is fitted
to the dependence between the variables, only an unsupervised PCA to each variable on its own, so
nothing can over-fit the dependence and all of the data is used at once (no held-out split).
All distances are max-norm (Chebyshev), as in both estimators' derivations.
"""

import math

import torch

from ..errors import UserError

from .estimators import _KNN_NOISE, _KNN_PCA, _inputs, as_matrix, clipped, generator, label_codes

# Rows of the distance matrix computed at once: 512 x 5000 float64 is 20 MB per matrix.
_CHUNK = 512
# Extra random directions and power iterations of the randomised range finder used for PCA.
_OVERSAMPLE, _POWER_ITERATIONS = 10, 4
# Components whose singular value is below this fraction of the largest are numerical noise;
# whitening them would blow that noise up to unit variance.
_RANK_TOL = 1e-6


def _whitened_pca(m: torch.Tensor, dim: int, seed: int) -> tuple[torch.Tensor, int]:
    """Scores on the top `dim` principal components of m (at most its rank), scaled to unit variance.

    Returns the scores and their number of components. A variable that does not vary (rank 0)
    becomes one all-zero column: after the tie-breaking noise it carries no information, which is
    the right answer for, e.g., the constant features of a collapsed checkpoint.

    The range of the centred matrix is found by a seeded randomised range finder (Halko et al. 2011)
    so that a [5000, 3072] input costs a few thin matrix products instead of a full SVD; the
    components then come from torch.linalg.svd of the small projected matrix. With no more than
    dim + 10 columns the range is the whole column space and the result is exact PCA; otherwise it
    is accurate when the spectrum decays, as it does for images and trained features. Where the
    spectrum is flat the top components are arbitrary for any PCA. The generator is created here,
    so equal matrices always get equal projections.
    """
    centred = m - m.mean(0)
    width = min(dim + _OVERSAMPLE, *centred.shape)
    sketch = torch.randn(centred.shape[1], width, generator=generator(seed, _KNN_PCA), dtype=m.dtype)
    basis = torch.linalg.qr(centred @ sketch)[0]
    for _ in range(_POWER_ITERATIONS):
        basis = torch.linalg.qr(centred @ (centred.T @ basis))[0]
    left, singular, _ = torch.linalg.svd(basis.T @ centred, full_matrices=False)
    rank = min(dim, int((singular > _RANK_TOL * singular[0]).sum())) if singular[0] > 0 else 0
    if rank == 0:
        return torch.zeros(len(m), 1, dtype=m.dtype), 0
    return (basis @ left[:, :rank]) * math.sqrt(len(m) - 1), rank


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
    from scipy.special import digamma  # imported when used: scipy costs every CLI start a second

    n = len(a)
    n_a, n_b = torch.empty(n), torch.empty(n)
    for (rows, dist_a), (_, dist_b) in zip(_chebyshev_rows(a), _chebyshev_rows(b)):
        eps = torch.maximum(dist_a, dist_b).topk(k, dim=1, largest=False).values[:, -1:]
        n_a[rows] = (dist_a < eps).sum(1).to(n_a.dtype)
        n_b[rows] = (dist_b < eps).sum(1).to(n_b.dtype)
    return float(digamma(k) + digamma(n) - (digamma(n_a.numpy() + 1) + digamma(n_b.numpy() + 1)).mean())


def _ross(points: torch.Tensor, codes: torch.Tensor, k: int) -> float:
    """Ross (2014): psi(N) - <psi(N_y)> + <psi(k_i)> - <psi(m_i)>.

    d_i is the distance to the k_i-th neighbour with the same label (k_i = k, or fewer for a class
    with at most k members); m_i counts all points within d_i. Points whose label occurs once have
    no neighbour of their class and are left out, as in scikit-learn's implementation.
    """
    from scipy.special import digamma

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
        digamma(len(points))
        - digamma(class_size.numpy()).mean()
        + digamma(k_i.numpy()).mean()
        - digamma(m_i.numpy()).mean()
    )


def knn_mi(features, inputs, labels, *, seed: int = 0, dim: int = 8, k: int = 3) -> dict:
    """kNN estimates of I(X;F) (KSG estimator 1) and I(Y;F) (Ross 2014) in nats.

    features: float [N, D]; inputs: float [N, C, H, W] or [N, P]; labels: integer [N].
    F and X are each projected onto their top `dim` principal components and whitened; the
    estimates are of the information between these projections. Seeded noise of 1e-10 (relative to
    unit-variance components) breaks distance ties, e.g. from repeated inputs.

    Returns i_xf and i_yf (>= 0), the raw values (kNN estimates scatter around 0 for independent
    variables) with _raw/_clipped keys, and dim_f, dim_x: the number of components actually used
    (less than `dim` when a variable has lower rank).
    """
    if k < 1 or dim < 1:
        raise ValueError(f"k and dim must be positive, got k={k}, dim={dim}")
    f = as_matrix(features, "features")
    x = _inputs(inputs, len(f))
    codes = label_codes(labels, len(f))
    if int((torch.bincount(codes)[codes] > 1).sum()) <= k:
        raise UserError(f"need more than k={k} samples whose label occurs at least twice, got {len(f)} samples")

    projected_f, dim_f = _whitened_pca(f, dim, seed)
    projected_x, dim_x = _whitened_pca(x, dim, seed)
    noise_gen = generator(seed, _KNN_NOISE)
    projected_f = projected_f + 1e-10 * torch.randn(projected_f.shape, generator=noise_gen, dtype=f.dtype)
    projected_x = projected_x + 1e-10 * torch.randn(projected_x.shape, generator=noise_gen, dtype=x.dtype)
    return {
        **clipped("i_xf", _ksg(projected_f, projected_x, k)),
        **clipped("i_yf", _ross(projected_f, codes, k)),
        "dim_f": dim_f,
        "dim_x": dim_x,
    }
