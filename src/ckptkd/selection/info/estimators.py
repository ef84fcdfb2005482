"""Estimates of I(X;F) and I(Y;F) for a teacher's penultimate features F, robust and never silently wrong.

What is measured, on which inputs, in which units (nats):

* F is preprocessed once per split seed, identically for both estimators (`whiten_features`): units that do not
  vary, or vary on fewer than max(3, 1 %) of the fit part's images (rarely-active ReLU units), are dropped; the rest
  are centred and whitened by principal components of the fit part, components whose eigenvalue is below 1e-6 of
  the largest are dropped (numerical noise), and whitened values are clipped to +-10. So no held-out image can be
  scaled to |z| ~ 10^4 by a unit that happened to fire on one fit image.
* X is the normalised input image, represented by its top `x_components` (default 32) principal components of the
  fit part, whitened (`input_components`). Every checkpoint of a run sees the same X components.
* I(Y;F), the Barber-Agakov bound H(Y) - CE(q(y|f)) as in InfoPro (Wang et al., ICLR 2021): q is a linear softmax
  probe with bias on the whitened F, trained by L-BFGS with an L2 penalty chosen on an inner split from a grid that
  also holds the label prior (the constant predictor). It lies in [0, H(Y)], H(Y) of the held-out labels.
* I(X;F), the same bound for a factorised Gaussian decoder of X's components: for each component k, a ridge decoder
  from F (strength chosen on an inner split, the constant decoder included) against the component's held-out mean:
  I(X;F) ~= sum_k 1/2 log(var_k / mse_k). Exact when the components are Gaussian given F with a mean linear in F;
  otherwise what a linear-Gaussian decoder of this capacity recovers. Unlike the former (P/2) log over all P pixels,
  a change in one badly decoded pixel can no longer swing the estimate by hundreds of nats.
* Both fit on a stratified 70 % of the samples and are scored on the held-out 30 %, so an over-fitted probe cannot
  inflate them. Both are lower bounds only as good as their (linear) family.

Every estimate carries a status: "ok"; "clipped" when the raw value is slightly below its valid range (a probe a
little worse than the prior on held-out data, by chance) and is reported as 0; "failed" when it is far outside
(I(Y;F) below -0.1 H(Y), I(X;F) below -0.05 nats per component, or not finite): a failed estimate is never
reported as a number. The kNN cross-check (`ckptkd.info.knn`) reads the same preprocessed F and the same X
components, truncated to their top 8 (kNN estimators are biased beyond ~10 dimensions), so it differs from the
variational estimates in what it can see, which is why only rankings across checkpoints are compared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as nnf

from ...errors import UserError

PROBE_EPOCHS = 100
# Strong to weak, so each fit warm-starts from the previous one along the regularisation path.
PROBE_DECAYS = (1.0, 0.1, 0.01, 1e-3, 1e-4)
# Per-sample ridge strengths (multiplied by the number of rows), strong to weak.
DECODER_RIDGES = (100.0, 10.0, 1.0, 0.1, 0.01, 1e-3, 1e-4)
INNER_HOLDOUT = 0.25
HOLDOUT = 0.3           # the share of a split seed's images its estimates are scored on
X_COMPONENTS = 32
EIGEN_FLOOR = 1e-6      # components below this fraction of the largest eigenvalue are dropped
Z_MAX = 10.0            # whitened values are clipped to +-Z_MAX (fit-part standard deviations)
MIN_ACTIVE = 0.01       # a unit must vary on at least this fraction (and 3) of the fit part's samples
FAIL_I_YF = 0.1         # raw I(Y;F) < -FAIL_I_YF * H(Y): failed
FAIL_I_XF = 0.05        # raw I(X;F) < -FAIL_I_XF nats per component: failed

# The random streams of one split seed, one per purpose (`generator(seed, stream)`).
STREAM_SPLIT, STREAM_PROBE_SPLIT, STREAM_DECODER_SPLIT, STREAM_KNN_NOISE, STREAM_KNN_PCA = range(5)


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


def inputs_matrix(inputs, n: int) -> torch.Tensor:
    """X as float64 [n, P], checked to have one row per feature row."""
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


def judged(name: str, raw: float, fail_below: float) -> dict:
    """The reported value with its raw value and status: ok, clipped (slightly negative: reported as 0) or failed
    (far outside the valid range, or not finite: reported as None, never as a number)."""
    if not math.isfinite(raw) or raw < fail_below:
        status, value = "failed", None
    elif raw < 0.0:
        status, value = "clipped", 0.0
    else:
        status, value = "ok", raw
    return {name: value, f"{name}_raw": raw if math.isfinite(raw) else None, f"{name}_status": status,
            f"{name}_clipped": status == "clipped"}


def _split(idx: torch.Tensor, groups: torch.Tensor | None, fraction: float, gen: torch.Generator):
    """Randomly hold out `fraction` of idx, in proportion to group sizes when groups are given.

    Group shares are rounded by largest remainder, so the total held out is round(fraction * len(idx)) even with
    many small classes. Every group keeps at least one member on the fit side, so the held-out part never contains
    a class the fitted model has not seen.
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


def outer_split(n: int, labels: torch.Tensor | None, holdout: float, seed: int):
    if not 0.0 < holdout < 1.0:
        raise UserError(f"holdout must be between 0 and 1 (exclusive), got {holdout}")
    return _split(torch.arange(n), labels, holdout, generator(seed, STREAM_SPLIT))


@dataclass
class Whitened:
    z: torch.Tensor          # [N, d] whitened components of the kept units, every sample
    units: int               # units in F
    dropped_constant: int
    dropped_rare: int
    clipped_values: int      # whitened values beyond +-Z_MAX, clipped

    def describe(self) -> dict:
        return {"units": self.units, "kept_components": int(self.z.shape[1]),
                "dropped_constant": self.dropped_constant, "dropped_rare": self.dropped_rare,
                "clipped_values": self.clipped_values}


def whiten_features(f: torch.Tensor, fit: torch.Tensor) -> Whitened:
    """Drop constant and rarely-active units, then whiten by the fit part's principal components (eigenvalue floor,
    clipped values): see the module docstring."""
    part = f[fit]
    std = part.std(0, unbiased=False)
    constant = std <= 1e-12 * max(float(std.max()) if std.numel() else 0.0, 1e-300)
    median = part.median(0).values
    varies = (part - median).abs() > 1e-6 * (median.abs() + std) + 1e-300
    rare = ~constant & (varies.sum(0) < max(3, math.ceil(MIN_ACTIVE * len(fit))))
    kept = f[:, ~constant & ~rare]
    z = torch.zeros(len(f), 0, dtype=f.dtype)
    clipped_values = 0
    if kept.shape[1]:
        centred = kept - kept[fit].mean(0)
        _, singular, vh = torch.linalg.svd(centred[fit], full_matrices=False)
        eigen = singular.square() / len(fit)
        use = (eigen > 0) & (eigen >= EIGEN_FLOOR * eigen[0])
        z = centred @ vh[use].T / eigen[use].sqrt()
        clipped_values = int((z.abs() > Z_MAX).sum())
        z = z.clamp(-Z_MAX, Z_MAX)
    return Whitened(z, f.shape[1], int(constant.sum()), int(rare.sum()), clipped_values)


def input_components(x: torch.Tensor, fit: torch.Tensor, dim: int, seed: int = 0) -> torch.Tensor:
    """X's top `dim` principal components of the fit part (at most its rank), whitened on the fit part: [N, d]."""
    centred = x - x[fit].mean(0)
    part = centred[fit]
    if min(part.shape) <= 4 * dim:
        _, singular, vh = torch.linalg.svd(part, full_matrices=False)
    else:  # a randomised range finder: a [2000, 3072] input costs a few thin products instead of a full SVD
        sketch = torch.randn(part.shape[1], dim + 10, generator=generator(seed, STREAM_KNN_PCA), dtype=part.dtype)
        basis = torch.linalg.qr(part @ sketch)[0]
        for _ in range(4):
            basis = torch.linalg.qr(part @ (part.T @ basis))[0]
        _, singular, vh = torch.linalg.svd(basis.T @ part, full_matrices=False)
    eigen = singular.square() / len(fit)
    use = (eigen > 0) & (eigen >= EIGEN_FLOOR * (eigen[0] if len(eigen) else 0.0))
    use[dim:] = False
    if not bool(use.any()):
        raise UserError("inputs do not vary on the fit part: I(X;F) is undefined")
    return centred @ vh[use].T / eigen[use].sqrt()


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

    columns holds one sample per column ([D, n]). The objective is convex, so the result is the penalised optimum up
    to the iteration budget."""
    weight, bias = (t.clone().requires_grad_() for t in start)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=epochs, history_size=20, line_search_fn="strong_wolfe")
    targets = nnf.one_hot(codes, len(bias)).to(columns.dtype).T  # [K, n]
    n = columns.shape[1]

    def closure():
        # The gradient in closed form, (softmax - onehot) X^T / n + decay W: the probe's fits dominate the
        # analysis, and autograd's bookkeeping costs more than this arithmetic at these sizes.
        with torch.no_grad():
            logits = weight @ columns + bias[:, None]                   # [K, n]
            log_probs = logits.log_softmax(0)
            residual = (log_probs.exp() - targets) / n
            weight.grad = residual @ columns.T + decay * weight
            bias.grad = residual.sum(1)
            return -(log_probs * targets).sum() / n + 0.5 * decay * weight.square().sum()

    optimiser.step(closure)
    return weight.detach(), bias.detach()


def _logits(columns, probe):
    weight, bias = probe
    return (weight @ columns).T + bias


def _cross_entropy(columns, codes, probe) -> float:
    return float(nnf.cross_entropy(_logits(columns, probe), codes))


SEARCH = "search"  # `probe_decay` default: choose the probe's L2 strength on an inner split of the fit part


def choose_probe_decay(z, codes, fit, seed, probe_epochs) -> float | None:
    """The probe's L2 strength, chosen on an inner split of `fit` from PROBE_DECAYS, or None when the label prior
    beats every probe there (F shows no usable label information)."""
    decay, _ = _decay_search(z, codes, fit, seed, probe_epochs)
    return decay


def _decay_search(z, codes, fit, seed, probe_epochs):
    """(chosen decay or None, the probe fitted with it on the inner part, a warm start for the final fit)."""
    n_classes = int(codes.max()) + 1
    inner_fit, inner_val = _split(fit, codes[fit], INNER_HOLDOUT, generator(seed, STREAM_PROBE_SPLIT))
    columns = {name: z[idx].T.to(torch.float32).contiguous() for name, idx in
               [("inner_fit", inner_fit), ("inner_val", inner_val)]}
    probe = (torch.zeros(n_classes, z.shape[1]), _log_prior(codes[inner_fit], n_classes))
    best_decay, best_ce, best_probe = None, _cross_entropy(columns["inner_val"], codes[inner_val], probe), probe
    if z.shape[1]:
        for decay in PROBE_DECAYS:
            probe = _fit_softmax(columns["inner_fit"], codes[inner_fit], decay, probe_epochs, probe)
            ce = _cross_entropy(columns["inner_val"], codes[inner_val], probe)
            if ce < best_ce:
                best_decay, best_ce, best_probe = decay, ce, probe
    return best_decay, best_probe


def _i_yf(z, codes, fit, held, seed, probe_epochs, probe_decay=SEARCH) -> dict:
    n_classes = int(codes.max()) + 1
    # float32 and one sample per column: with only K outputs, MKL's kernels for [K, D] @ [D, n] are several times
    # faster than for [n, D] @ [D, K], and the probe's fits dominate the estimators' time.
    columns = {name: z[idx].T.to(torch.float32).contiguous() for name, idx in [("fit", fit), ("held", held)]}
    if probe_decay == SEARCH:
        best_decay, start = _decay_search(z, codes, fit, seed, probe_epochs)
    else:  # chosen by the caller (on images every split seed fits on: `analysis` shares it across seeds)
        best_decay, start = probe_decay, (torch.zeros(n_classes, z.shape[1]), _log_prior(codes[fit], n_classes))
    if best_decay is None:
        probe = (torch.zeros(n_classes, z.shape[1]), _log_prior(codes[fit], n_classes))
    else:
        probe = _fit_softmax(columns["fit"], codes[fit], best_decay, probe_epochs, start)
    probe_ce = _cross_entropy(columns["held"], codes[held], probe)
    h_y = _entropy(codes[held])
    return {**judged("i_yf", h_y - probe_ce, -FAIL_I_YF * h_y), "h_y": h_y, "probe_ce": probe_ce,
            "probe_decay": best_decay, "n_fit": len(fit), "n_eval": len(held)}


def _ridge_fits(z, x, ridges):
    """Yield (ridge, weight, bias) of ridge regression x ~ z @ weight + bias for each per-sample ridge.

    One eigendecomposition of the centred Gram matrix serves the whole grid."""
    z_mean, x_mean = z.mean(0), x.mean(0)
    zc = z - z_mean
    eigvals, eigvecs = torch.linalg.eigh(zc.T @ zc)
    rotated = eigvecs.T @ (zc.T @ (x - x_mean))
    for ridge in ridges:
        weight = eigvecs @ (rotated / (eigvals + ridge * len(z)).unsqueeze(1))
        yield ridge, weight, x_mean - z_mean @ weight


def _i_xf(z, u, fit, held, seed) -> dict:
    """sum_k 1/2 log(var_k / mse_k) over X's components, each decoded by the ridge (or the constant) that did best
    on an inner split."""
    inner_fit, inner_val = _split(fit, None, INNER_HOLDOUT, generator(seed, STREAM_DECODER_SPLIT))
    best_err = (u[inner_val] - u[inner_fit].mean(0)).square().mean(0)
    chosen: list[float | None] = [None] * u.shape[1]
    if z.shape[1]:
        for ridge, weight, bias in _ridge_fits(z[inner_fit], u[inner_fit], DECODER_RIDGES):
            err = (z[inner_val] @ weight + bias - u[inner_val]).square().mean(0)
            for k in torch.nonzero(err < best_err).flatten().tolist():
                chosen[k], best_err[k] = ridge, err[k]
    mean = u[fit].mean(0)
    prediction = mean.expand(len(held), -1).clone()
    for ridge in sorted({r for r in chosen if r is not None}):
        columns = [k for k, r in enumerate(chosen) if r == ridge]
        _, weight, bias = next(_ridge_fits(z[fit], u[fit][:, columns], [ridge]))
        prediction[:, columns] = z[held] @ weight + bias
    mse = (prediction - u[held]).square().mean(0)
    variance = (mean - u[held]).square().mean(0)
    if not bool((variance > 0).all()):
        raise UserError("inputs do not vary on the evaluation split: I(X;F) is undefined")
    # Only an exact reconstruction reaches 0, which the ridge prevents; the floor keeps the log finite.
    raw = float(0.5 * torch.log(variance / mse.clamp_min(1e-300)).sum())
    d = u.shape[1]
    return {**judged("i_xf", raw, -FAIL_I_XF * d), "recon_mse_const": float(variance.mean()),
            "recon_mse": float(mse.mean()), "decoded_components": sum(r is not None for r in chosen),
            "x_components": d, "n_fit": len(fit), "n_eval": len(held)}


@dataclass
class SplitPlan:
    """What is the same for every checkpoint of one split seed: which samples fit and which are held out, the
    labels' codes and X's whitened components."""
    seed: int
    fit: torch.Tensor
    held: torch.Tensor
    codes: torch.Tensor
    u: torch.Tensor | None   # None when only I(Y;F) is wanted
    input_dim: int | None


def plan_split(inputs, labels, *, n: int | None = None, seed: int = 0, holdout: float = HOLDOUT,
               x_components: int = X_COMPONENTS) -> SplitPlan:
    """The split of one seed (stratified by label) and, when `inputs` is given, X's components on it."""
    n = len(labels) if n is None else n
    codes = label_codes(labels, n)
    fit, held = outer_split(n, codes, holdout, seed)
    if inputs is None:
        return SplitPlan(seed, fit, held, codes, None, None)
    x = inputs_matrix(inputs, n)
    return SplitPlan(seed, fit, held, codes, input_components(x, fit, x_components, seed), x.shape[1])


def estimate_with(features, plan: SplitPlan, *, probe_epochs: int = PROBE_EPOCHS,
                  whitened: Whitened | None = None, probe_decay: float | None | str = SEARCH) -> dict:
    """Both held-out estimates on a prepared split: i_xf (when the plan has X), i_yf, with raw values and statuses,
    and what the feature preprocessing kept and dropped (`features`). `whitened`: `whiten_features(features,
    plan.fit)` when the caller already has it. `probe_decay`: the probe's L2 strength (None: the label prior),
    chosen by the caller on images outside the plan's held-out part; by default it is chosen here, on an inner split
    of the fit part."""
    f = as_matrix(features, "features")
    whitened = whitened if whitened is not None else whiten_features(f, plan.fit)
    out = {**_i_yf(whitened.z, plan.codes, plan.fit, plan.held, plan.seed, probe_epochs, probe_decay),
           "features": whitened.describe()}
    if plan.u is not None:
        out.update(_i_xf(whitened.z, plan.u, plan.fit, plan.held, plan.seed), input_dim=plan.input_dim)
    return out


def estimate_i_yf(features, labels, *, seed: int = 0, holdout: float = 0.3, probe_epochs: int = PROBE_EPOCHS) -> dict:
    """Held-out Barber-Agakov lower bound on I(Y;F) in nats, with a linear softmax probe on whitened features.

    features: float [N, D]; labels: integer [N]. A `holdout` fraction, stratified by label, is scored; the rest fits
    the probe (of which a quarter selects the weight decay). `probe_epochs` is the L-BFGS budget of each probe fit.

    Returns i_yf (in [0, h_y], or None when failed), i_yf_raw, i_yf_status (ok, clipped, failed), i_yf_clipped,
    h_y (label entropy of the evaluation part), probe_ce (held-out cross-entropy), probe_decay (selected L2
    strength; None when the prior won the inner validation: F showed no usable label information), n_fit, n_eval,
    features (what the preprocessing kept and dropped).
    """
    f = as_matrix(features, "features")
    return estimate_with(f, plan_split(None, labels, n=len(f), seed=seed, holdout=holdout), probe_epochs=probe_epochs)


def estimate_i_xf(features, inputs, *, seed: int = 0, holdout: float = 0.3, x_components: int = X_COMPONENTS) -> dict:
    """Held-out factorised-Gaussian decoder estimate of I(X;F) in nats on X's top `x_components` components.

    features: float [N, D]; inputs: float [N, C, H, W] or [N, P]. A random `holdout` fraction is scored.

    Returns i_xf (>= 0, or None when failed), i_xf_raw, i_xf_status, i_xf_clipped, recon_mse_const and recon_mse
    (held-out mean squared error per whitened component of the mean and of the decoder), decoded_components (where
    a decoder beat the mean on the inner split), x_components, input_dim (P), n_fit, n_eval, features.
    """
    f = as_matrix(features, "features")
    x = inputs_matrix(inputs, len(f))
    fit, held = outer_split(len(f), None, holdout, seed)
    whitened = whiten_features(f, fit)
    u = input_components(x, fit, x_components, seed)
    return {**_i_xf(whitened.z, u, fit, held, seed), "input_dim": x.shape[1], "features": whitened.describe()}


def estimate_mi(features, inputs, labels, *, seed: int = 0, holdout: float = 0.3, probe_epochs: int = PROBE_EPOCHS,
                x_components: int = X_COMPONENTS) -> dict:
    """Both held-out estimates, I(X;F) and I(Y;F) in nats, on one label-stratified split (see `estimate_i_yf` and
    `estimate_i_xf` for the keys). i_yf equals `estimate_i_yf(features, labels, seed=seed, holdout=holdout)`."""
    f = as_matrix(features, "features")
    plan = plan_split(inputs, labels, n=len(f), seed=seed, holdout=holdout, x_components=x_components)
    return estimate_with(f, plan, probe_epochs=probe_epochs)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    start = 0
    for end in range(1, len(values) + 1):
        if end == len(values) or sorted_values[end] != sorted_values[start]:
            ranks[order[start:end]] = (start + end + 1) / 2
            start = end
    return ranks


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long sequences; ties get average ranks.

    nan when it is undefined: fewer than two values, a constant sequence, or a nan in either.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman needs two 1-D sequences of equal length, got {a.shape} and {b.shape}")
    if len(a) < 2 or np.isnan(a).any() or np.isnan(b).any():
        return math.nan
    ra = _ranks(a) - (len(a) + 1) / 2
    rb = _ranks(b) - (len(b) + 1) / 2
    denominator = math.sqrt(float(ra @ ra) * float(rb @ rb))
    return math.nan if denominator == 0.0 else float(ra @ rb) / denominator
