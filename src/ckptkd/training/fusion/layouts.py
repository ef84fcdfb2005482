"""The two layouts that hold a member tensor for all N members, and the helpers the fused forward calls on them.

Every tensor of one member (an activation, or a parameter read directly in forward) is held for all N members in one
of two layouts:

- member-first, "F": ``[N, *shape]``, the member's tensor with the member index in front. Any op that accepts extra
  leading dims runs on it with its dim arguments shifted by one: ``Linear`` (a batched matmul, `torch.baddbmm`),
  `flatten`, `view`, `cat`, indexing, `softmax`, ...
- channel-stacked, "C": ``[B, N*C, *spatial]``, member 0's channels, then member 1's, ... Conv layers become one
  conv with ``groups * N`` groups, BatchNorm one BatchNorm over ``N * C`` channels (so each member's statistics are
  its own), pooling runs per channel as it is. A reduction over spatial dims (``x.mean((2, 3))``), `flatten(1)` (it
  keeps each member's block contiguous) and element-wise ops (ReLU, residual adds) also stay in this layout.

Converting C -> F is a free view, F -> C one copy; the rewrite only converts where an op needs the other layout (for
the built-in models: the input, and around ShuffleNet's channel split/shuffle).

With `channels_last=True` the C-layout images are channels-last, which is what makes fusion pay on a CPU: max
pooling, BatchNorm and grouped convolutions vectorise over the N*C channels (bare steps of the 13k-parameter Fashion
student, N = 8, 2 threads: 1.6-2.2x one after another channels-last, 0.7-0.8x channels-first). Channels-last max
pooling breaks ties between equal values in another order than the channels-first kernel, so where a pooling window
holds ties a member's gradient may route differently from the same model trained alone.

The conversions and the ops on F layout below are module-level functions, called from the generated forward
(`FusedModel.code`) so that it reads plainly; `shift_dim` and `beyond_channels` tell the rewrite how an op's dim
arguments read on each layout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .ops import Unsupported

MEMBER_FIRST, CHANNEL_STACKED = "F", "C"
# Not a tensor of any member: python numbers, shapes, dtypes, or a constant tensor that is the same for all members.
VALUE, CONSTANT = "V", "K"


def shift_dim(dim):
    """A dim of the original tensor on F layout (the member dim in front): counting from the end is unchanged."""
    if isinstance(dim, (tuple, list)):
        return type(dim)(shift_dim(d) for d in dim)
    if not isinstance(dim, int):
        raise Unsupported(f"a dim given as {type(dim).__name__}, not a number known when tracing")
    return dim + 1 if dim >= 0 else dim


def beyond_channels(dim) -> bool:
    """Whether an op over `dim` leaves dims 0 (batch) and 1 (channels) alone, so it runs unchanged on C layout."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return all(isinstance(d, int) and d >= 2 for d in dims)


def to_member_first(x: torch.Tensor, n: int) -> torch.Tensor:
    """C -> F: [B, N*C, ...] -> [N, B, C, ...]. A view, no copy."""
    return x.unflatten(1, (n, -1)).transpose(0, 1)


def to_channel_stacked(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """F -> C: [N, B, C, ...] -> [B, N*C, ...]. One copy (the member dim moves inside the batch dim); images
    ([B, N*C, H, W]) come out channels-last when asked."""
    x = x.transpose(0, 1).flatten(1, 2)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def cat_channels(tensors: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """`torch.cat(members' tensors, dim=1)` for C-layout inputs, output in C layout: each member's channels are
    concatenated within that member's block ([a_0, b_0, a_1, b_1, ...]), one copy like a plain cat."""
    return torch.cat([t.unflatten(1, (n, -1)) for t in tensors], dim=2).flatten(1, 2)


def match_rank(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Broadcast an F-layout tensor like the original: a member tensor of lower rank gets its new leading dims
    after the member dim ([N, C, 1, 1] against [N, B, C, H, W] becomes [N, 1, C, 1, 1]), where the original
    [C, 1, 1] against [B, C, H, W] was aligned from the right."""
    rank = max(t.dim() for t in others)
    while x.dim() < rank:
        x = x.unsqueeze(1)
    return x


def getitem_member_first(x: torch.Tensor, index):
    """`x[index]` of the original, on F layout: the member dim is kept whole."""
    if not isinstance(index, tuple):
        index = (index,)
    return x[(slice(None), *index)]


def reshape_member_first(x: torch.Tensor, n: int, *sizes):
    """`x.reshape(*sizes)` / `x.view(*sizes)` of the original, on F layout. reshape, not view: an F tensor may be a
    transposed view of a C tensor, where view cannot work; the values are the same."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    return x.reshape(n, *sizes)


def check_members(x: torch.Tensor, n: int) -> torch.Tensor:
    """The fused forward's input as it is, once it is known to hold one batch per member ([N, B, ...])."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a FusedModel of {n} members takes x of shape [{n}, B, ...] (one batch per member), "
                         f"got {shape}")
    return x
