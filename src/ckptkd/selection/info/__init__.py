"""Information-theoretic analysis of teacher features: I(X;F) and I(Y;F) for selecting T*.

`estimate_mi` (held-out variational estimates) is the measurement; `knn_mi` is an independent estimator whose
checkpoint ranking should agree with it (`spearman`). Both read the same preprocessed features
(`whiten_features`) and input components; `plan_split` + `estimate_with` / `knn_with` reuse one split's inputs
across the checkpoints of a run. See `estimators` for what each estimate assumes and bounds.
"""

from .estimators import (SplitPlan, choose_probe_decay, estimate_i_xf, estimate_i_yf, estimate_mi, estimate_with,
                         plan_split, spearman, whiten_features)
from .knn import knn_mi, knn_with

__all__ = ["estimate_mi", "estimate_i_yf", "estimate_i_xf", "estimate_with", "plan_split", "SplitPlan",
           "choose_probe_decay",
           "whiten_features", "knn_mi", "knn_with", "spearman"]
