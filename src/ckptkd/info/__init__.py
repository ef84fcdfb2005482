"""Information-theoretic analysis of teacher features: I(X;F) and I(Y;F) for selecting T*.

`estimate_mi` (held-out variational estimates) is the measurement; `knn_mi` is an independent
estimator whose checkpoint ranking should agree with it (`spearman`). See `estimators` for what
each estimate assumes and bounds.
"""

from .estimators import estimate_i_xf, estimate_i_yf, estimate_mi, spearman
from .knn import knn_mi

__all__ = ["estimate_mi", "estimate_i_yf", "estimate_i_xf", "knn_mi", "spearman"]
