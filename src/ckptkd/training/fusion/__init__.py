"""Train N students of one architecture as one fused model (horizontal fusion, as in HFTA, Wang et al. MLSys 2021).

Small students are overhead-bound on a CPU: PyTorch's per-op dispatch costs more than their arithmetic. The single
model's forward is traced with torch.fx and rewritten into one that computes all N members in each op (grouped
convolutions, batched matmuls, BatchNorm over N*C channels), so the per-op cost is paid once for N. (`torch.func.vmap`
was measured slower than running the members one after another.)

Contract:

- `fuse(models, channels_last=False)` returns a `FusedModel` holding a copy of the models' current weights (the
  models are left as they are), or raises UserError naming what differs or cannot fuse. `fusable(model)` says
  beforehand: ``(True, "")`` or ``(False, reason)``, so that a caller can train the members one after another.
- forward: ``fused(x)``, x ``[N, B, *input_shape]`` (member i sees batch ``x[i]``), returns ``[N, B, num_classes]``
  equal, up to float rounding, to ``torch.stack([m(x[i]) for i, m in enumerate(models)])`` in train and eval mode;
  BatchNorm statistics are each member's own, dropout masks are drawn differently (same distribution).
- layouts: inside, each member tensor is member-first ``[N, *shape]`` or channel-stacked ``[B, N*C, *spatial]``;
  ``channels_last=True`` makes the channel-stacked images channels-last, which is what makes fusion pay on a CPU.
- gradients and optimizers: for a loss that is the SUM of the members' own losses, each parameter, stored as
  ``[N, *shape]``, holds at index i member i's own gradient, and an element-wise optimizer (SGD with momentum,
  Nesterov or weight decay, Adam, AdamW) gives each member exactly its own update. A mean over members divides each
  gradient by N.
- NOT per member: gradient-norm clipping (`clip_grad_norm_` takes one norm over all N members; ckptkd does not
  clip) and optimizers that take per-tensor norms (LARS, LAMB).
- state: `state_dicts()` / `member(i)` give each member's ordinary state dict (the original keys and shapes,
  bit-exact), `load_state_dicts` / `load_member` the reverse; the fused model's own `state_dict()` has the same keys
  with a leading N dim.

Where each part lives: `model` (FusedModel, fuse, fusable, and the semantics in detail), `tracing` (tracing a member
in both modes, comparing architectures), `rewrite` (the node-by-node graph rewrite), `ops` (the layers, functions
and methods the rewrite knows; the reason it refuses the rest), `layouts` (the two layouts, their conversions and the
helpers the generated forward calls), `modules` (FusedConv, FusedBatchNorm, FusedLinear).
"""

from .model import FusedModel, fusable, fuse
from .ops import SUPPORTED_MODULES

__all__ = ["FusedModel", "fuse", "fusable", "SUPPORTED_MODULES"]
