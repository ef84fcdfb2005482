"""Estimates of I(X;F) and I(Y;F) for a teacher's penultimate features F.

Both main estimators are *held-out variational* estimates: they fit a model on one part of the
data they are given and score it on the rest, so a model that memorises its training part cannot
inflate the number. They measure usable information in the sense of Xu et al. (ICLR 2020, "A Theory
of Usable Information under Computational Constraints"): the drop in held-out cross-entropy that a
given family of predictors achieves by seeing F. That is a lower bound on the true mutual information
only as good as the family and its training: a richer family, well trained, can only raise it.
For features that are a deterministic function of continuous images the true I(X;F) is not even
finite, which is why a capacity-limited, held-out quantity is the meaningful one to compare.

I(Y;F) is the Barber-Agakov bound H(Y) - CE(q(y|f)) used by InfoPro (Wang et al., ICLR 2021).
q is a linear softmax classifier with bias on features standardised with the fit part's mean and
standard deviation, trained full-batch by L-BFGS with an L2 penalty on its weights. The penalty is
chosen on an inner validation split of the fit part from a fixed grid that also contains the constant
predictor (the label prior), so the selected probe is never worse than "ignore F" on data it was not
trained on; on the evaluation part it can still be slightly worse by chance, which shows up as a
small negative raw value for uninformative F. H(Y) is the entropy of the evaluation part's label
frequencies, so the estimate lies in [0, H(Y)]. A linear probe only sees linearly decodable label
information: features that separate classes non-linearly are under-rated.

I(X;F) compares two Gaussian models of the flattened input X (P values per sample) that share one
variance per model: one whose mean is the fit part's mean image (it sees no F), one whose mean is a
linear decoder of F. With the variance set to each model's own mean squared error, their held-out
negative log-likelihoods are (P/2) log(2 pi e mse), and the difference is

    I(X;F) ~= (P/2) * log(mse_const / mse_decoder)   [nats].

This is the Gaussian-channel form of the Barber-Agakov bound with H(X) replaced by the cross-entropy
of the best F-blind model of the same family. It is exact when X is an isotropic Gaussian and X given
F is too, with a mean linear in F; otherwise it measures what a Gaussian decoder of this capacity
recovers. The decoder is ridge regression solved in closed form (the exact optimum, so there is no
optimiser budget to tune), with the ridge strength chosen on an inner validation split from a grid
that includes the constant decoder, then refitted on the whole fit part. Its limits: MSE is
unimodal, so information that only a multi-modal decoder could use (sign ambiguities, textures at
unknown positions) is not counted; a linear decoder under-rates non-linearly encoded detail; and
because every pixel of X is one of the P dimensions, pixels that never vary still count in P,
which scales every checkpoint's value by the same factor.

The second, independent estimator (`ckptkd.info.knn`) makes no parametric model at all: it projects
F and X each onto their top `dim` principal components, whitens them, and applies the k-nearest-
neighbour estimators of Kraskov, Stoegbauer and Grassberger (2004, estimator 1) for I(X;F) and of
Ross (2014) for I(Y;F). kNN estimators are close to unbiased in a few dimensions but degrade quickly
beyond about ten, which is why they run on a projection; they therefore measure the information
between the *projected* variables, which differs in absolute value from the variational estimates.
Only the rankings of checkpoints are comparable across estimators (`spearman`), and agreement
between two estimators built on different assumptions is the check that a ranking is not an artefact
of one of them.
"""

import math

import numpy as np
import torch
import torch.nn.functional as nnf

from ..errors import UserError

PROBE_EPOCHS = 100
# Strong to weak, so each fit warm-starts from the previous one along the regularisation path.
PROBE_DECAYS = (1.0, 0.1, 0.01, 1e-3, 1e-4)
# Per-sample ridge strengths (multiplied by the number of rows), strong to weak.
DECODER_RIDGES = (100.0, 10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4)
INNER_HOLDOUT = 0.25

_SPLIT, _PROBE_SPLIT, _DECODER_SPLIT, _KNN_NOISE, _KNN_PCA = range(5)


def generator(seed: int, stream: int) -> torch.Generator:
    """A private generator per (seed, purpose): results never depend on, or change, global RNG state."""
    state = np.random.SeedSequence([seed, stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def as_matrix(tensor, name: str) -> torch.Tensor:
    """[N, ...] -> float64 [N, P], rejecting non-finite values (e.g. features of a diverged checkpoint)."""
    matrix = torch.as_tensor(tensor).detach().cpu()
    if matrix.dim() < 2:
        raise ValueError(f"{name} must have shape [N, ...] with at least 2 dimensions, got {tuple(matrix.shape)}")
    matrix = matrix.reshape(len(matrix), -1).to(torch.float64)
    if not torch.isfinite(matrix).all():
        raise UserError(f"{name} contains NaN or infinite values")
    return matrix


def _inputs(inputs, n: int) -> torch.Tensor:
    x = as_matrix(inputs, "inputs")
    if len(x) != n:
        raise ValueError(f"inputs has {len(x)} samples but features has {n}")
    return x


def label_codes(labels, n: int) -> torch.Tensor:
    """Labels of any integer values -> codes 0..K-1 (classes that do not occur get no probe output)."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}], got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    return torch.unique(labels, return_inverse=True)[1]


def clipped(name: str, raw: float) -> dict:
    """Report max(0, raw) but keep the raw value and a flag, so clipping is visible, not silent."""
    return {name: max(0.0, raw), f"{name}_raw": raw, f"{name}_clipped": raw < 0.0}


def _split(idx: torch.Tensor, groups: torch.Tensor | None, fraction: float, gen: torch.Generator):
    """Randomly hold out `fraction` of idx, in proportion to group sizes when groups are given.

    Group shares are rounded by largest remainder, so the total held out is round(fraction * len(idx))
    even with many small classes. Every group keeps at least one member on the fit side, so the
    held-out part never contains a class the fitted model has not seen.
    """
    parts = [idx] if groups is None else [idx[groups == g] for g in torch.unique(groups)]
    sizes = torch.tensor([len(part) for part in parts])
    quotas = fraction * sizes.to(torch.float64)
    n_held = quotas.floor().long()
    shortfall = round(fraction * len(idx)) - int(n_held.sum())
    n_held[torch.argsort(quotas - n_held, descending=True, stable=True)[:shortfall]] += 1
    n_held = torch.minimum(n_held, sizes - 1)
    keep, held = [], []
    for part, n in zip(parts, n_held.tolist()):
        part = part[torch.randperm(len(part), generator=gen)]
        held.append(part[:n])
        keep.append(part[n:])
    keep, held = torch.cat(keep).sort().values, torch.cat(held).sort().values
    if len(held) == 0 or len(keep) < 2:
        raise UserError(f"too few samples ({len(idx)}) to hold out a fraction of {fraction}")
    return keep, held


def _outer_split(n: int, labels: torch.Tensor | None, holdout: float, seed: int):
    if not 0.0 < holdout < 1.0:
        raise UserError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    return _split(torch.arange(n), labels, holdout, generator(seed, _SPLIT))


def _standardise(features: torch.Tensor, fit: torch.Tensor) -> torch.Tensor:
    mean, std = features[fit].mean(0), features[fit].std(0, unbiased=False)
    return (features - mean) / torch.where(std > 0, std, torch.ones_like(std))


def _log_prior(codes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Laplace-smoothed log label frequencies: the constant predictor, finite for every class."""
    counts = torch.bincount(codes, minlength=n_classes).to(torch.float32)
    return torch.log((counts + 1.0) / (counts.sum() + n_classes))


def _entropy(codes: torch.Tensor) -> float:
    p = torch.bincount(codes).to(torch.float64)
    p = p[p > 0] / len(codes)
    return float(-(p * p.log()).sum())


def _fit_softmax(columns, codes, decay, epochs, start):
    """Multinomial logistic regression with an L2 penalty on the weights (not the bias), by L-BFGS.

    columns holds one sample per column ([D, n]). The objective is convex, so the result is the
    penalised optimum up to the iteration budget.
    """
    weight, bias = (t.clone().requires_grad_() for t in start)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = nnf.cross_entropy(_logits(columns, (weight, bias)), codes) + 0.5 * decay * weight.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def _logits(columns, probe):
    weight, bias = probe
    return (weight @ columns).T + bias


def _cross_entropy(columns, codes, probe) -> float:
    return float(nnf.cross_entropy(_logits(columns, probe), codes))


def _i_yf(z, codes, fit, held, seed, probe_epochs) -> dict:
    n_classes = int(codes.max()) + 1
    inner_fit, inner_val = _split(fit, codes[fit], INNER_HOLDOUT, generator(seed, _PROBE_SPLIT))
    # float32 and one sample per column: with only K outputs, MKL's kernels for [K, D] @ [D, n] are
    # several times faster than for [n, D] @ [D, K], and the probe's fits dominate estimate_mi's time.
    columns = {name: z[idx].T.to(torch.float32).contiguous() for name, idx in
               [("inner_fit", inner_fit), ("inner_val", inner_val), ("fit", fit), ("held", held)]}

    probe = (torch.zeros(n_classes, z.shape[1]), _log_prior(codes[inner_fit], n_classes))
    best_decay, best_ce, best_probe = None, _cross_entropy(columns["inner_val"], codes[inner_val], probe), probe
    for decay in PROBE_DECAYS:
        probe = _fit_softmax(columns["inner_fit"], codes[inner_fit], decay, probe_epochs, probe)
        ce = _cross_entropy(columns["inner_val"], codes[inner_val], probe)
        if ce < best_ce:
            best_decay, best_ce, best_probe = decay, ce, probe

    if best_decay is None:
        probe = (torch.zeros_like(best_probe[0]), _log_prior(codes[fit], n_classes))
    else:
        probe = _fit_softmax(columns["fit"], codes[fit], best_decay, probe_epochs, best_probe)
    probe_ce = _cross_entropy(columns["held"], codes[held], probe)
    h_y = _entropy(codes[held])
    return {
        **clipped("i_yf", h_y - probe_ce),
        "h_y": h_y,
        "probe_ce": probe_ce,
        "probe_decay": best_decay,
        "n_fit": len(fit),
        "n_eval": len(held),
    }


def _ridge_fits(z, x, ridges):
    """Yield (ridge, weight, bias) of ridge regression x ~ z @ weight + bias for each per-sample ridge.

    One eigendecomposition of the centred Gram matrix serves the whole grid.
    """
    z_mean, x_mean = z.mean(0), x.mean(0)
    zc = z - z_mean
    eigvals, eigvecs = torch.linalg.eigh(zc.T @ zc)
    rotated = eigvecs.T @ (zc.T @ (x - x_mean))
    for ridge in ridges:
        weight = eigvecs @ (rotated / (eigvals + ridge * len(z)).unsqueeze(1))
        yield ridge, weight, x_mean - z_mean @ weight


def _i_xf(z, x, fit, held, seed) -> dict:
    inner_fit, inner_val = _split(fit, None, INNER_HOLDOUT, generator(seed, _DECODER_SPLIT))

    best_ridge = None
    best_mse = float((x[inner_val] - x[inner_fit].mean(0)).square().mean())
    for ridge, weight, bias in _ridge_fits(z[inner_fit], x[inner_fit], DECODER_RIDGES):
        mse = float((z[inner_val] @ weight + bias - x[inner_val]).square().mean())
        if mse < best_mse:
            best_ridge, best_mse = ridge, mse

    mean_image = x[fit].mean(0)
    if best_ridge is None:
        reconstruction = mean_image.expand(len(held), -1)
    else:
        _, weight, bias = next(_ridge_fits(z[fit], x[fit], [best_ridge]))
        reconstruction = z[held] @ weight + bias
    recon_mse = float((reconstruction - x[held]).square().mean())
    recon_mse_const = float((mean_image - x[held]).square().mean())
    if recon_mse_const == 0.0:
        raise UserError("inputs do not vary on the evaluation split: I(X;F) is undefined")
    # Only an exact reconstruction reaches 0, which the ridge prevents; the floor keeps log finite.
    raw = 0.5 * x.shape[1] * math.log(recon_mse_const / max(recon_mse, math.ulp(0.0)))
    return {
        **clipped("i_xf", raw),
        "recon_mse_const": recon_mse_const,
        "recon_mse": recon_mse,
        "decoder_ridge": best_ridge,
        "input_dim": x.shape[1],
        "n_fit": len(fit),
        "n_eval": len(held),
    }


def estimate_i_yf(features, labels, *, seed: int = 0, holdout: float = 0.3, probe_epochs: int = PROBE_EPOCHS) -> dict:
    """Held-out Barber-Agakov lower bound on I(Y;F) in nats, with a linear softmax probe.

    features: float [N, D]; labels: integer [N]. A `holdout` fraction, stratified by label, is
    scored; the rest fits the probe (of which a quarter selects the weight decay).
    `probe_epochs` is the L-BFGS iteration budget of each probe fit.

    Returns i_yf (>= 0, <= h_y), i_yf_raw, i_yf_clipped, h_y (label entropy of the evaluation part),
    probe_ce (held-out cross-entropy), probe_decay (selected L2 strength; None when the constant
    predictor won the inner validation, i.e. F showed no usable label information), n_fit, n_eval.
    """
    f = as_matrix(features, "features")
    codes = label_codes(labels, len(f))
    fit, held = _outer_split(len(f), codes, holdout, seed)
    return _i_yf(_standardise(f, fit), codes, fit, held, seed, probe_epochs)


def estimate_i_xf(features, inputs, *, seed: int = 0, holdout: float = 0.3) -> dict:
    """Held-out Gaussian-decoder estimate of I(X;F) in nats: (P/2) log(mse_const / mse_decoder).

    features: float [N, D]; inputs: float [N, C, H, W] or [N, P]. A random `holdout` fraction is
    scored; the rest fits a ridge decoder (of which a quarter selects the ridge strength).

    Returns i_xf (>= 0), i_xf_raw, i_xf_clipped, recon_mse_const (held-out per-dimension MSE of the
    fit part's mean image), recon_mse (held-out per-dimension MSE of the decoder), decoder_ridge
    (selected per-sample ridge; None when the mean image won the inner validation), input_dim (P),
    n_fit, n_eval.
    """
    f = as_matrix(features, "features")
    x = _inputs(inputs, len(f))
    fit, held = _outer_split(len(f), None, holdout, seed)
    return _i_xf(_standardise(f, fit), x, fit, held, seed)


def estimate_mi(
    features, inputs, labels, *, seed: int = 0, holdout: float = 0.3, probe_epochs: int = PROBE_EPOCHS
) -> dict:
    """Both held-out estimates, I(X;F) and I(Y;F) in nats, on one label-stratified split.

    The keys are the union of `estimate_i_yf`'s and `estimate_i_xf`'s; i_yf equals
    `estimate_i_yf(features, labels, seed=seed, holdout=holdout)["i_yf"]`, while i_xf can differ
    slightly from `estimate_i_xf` because that function's split is not stratified.
    """
    f = as_matrix(features, "features")
    x = _inputs(inputs, len(f))
    codes = label_codes(labels, len(f))
    fit, held = _outer_split(len(f), codes, holdout, seed)
    z = _standardise(f, fit)
    return {**_i_yf(z, codes, fit, held, seed, probe_epochs), **_i_xf(z, x, fit, held, seed)}


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long sequences; ties get average ranks.

    nan when it is undefined: fewer than two values, a constant sequence, or a nan in either.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return math.nan
    import scipy.stats  # here, not at the top: it adds ~1 s to every CLI start, and only analysis needs it

    ra = scipy.stats.rankdata(a) - (len(a) + 1) / 2
    rb = scipy.stats.rankdata(b) - (len(b) + 1) / 2
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return math.nan if denominator == 0.0 else float(ra @ rb) / denominator
