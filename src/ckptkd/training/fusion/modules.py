"""The fused layers: N layers with weights as one. Each stores every tensor of the original layer under the same name
with a leading member dim ([N, *shape]), so a fused model's parameters keep the original names. `FUSED_LAYERS` says
which layer becomes which; `linear_member_first` is also what the rewrite makes of a functional `F.linear`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedConv(nn.Module):
    """N ConvNd layers as one grouped conv on C layout: member i's output channels are block i of the output."""

    def __init__(self, convs: Sequence[nn.Module]):
        super().__init__()
        first = convs[0]
        self.num_members = len(convs)
        self.dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(first)]
        self.in_channels, self.out_channels = first.in_channels, first.out_channels
        self.stride, self.padding, self.dilation = first.stride, first.padding, first.dilation
        self.groups, self.padding_mode = first.groups, first.padding_mode
        self.explicit_padding = explicit_padding(first)
        self.weight = stacked_parameter([c.weight for c in convs])
        self.bias = None if first.bias is None else stacked_parameter([c.bias for c in convs])

    def forward(self, x):
        weight = self.weight.flatten(0, 1)  # [N*C_out, C_in/groups, *k]: group j of member i is group i*groups + j
        bias = None if self.bias is None else self.bias.flatten()
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        groups = self.groups * self.num_members
        if self.padding_mode != "zeros":  # as nn.Conv2d's forward: pad first (per channel, so per member)
            x = F.pad(x, self.explicit_padding, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self):
        return (f"members={self.num_members}, {self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


def explicit_padding(conv: nn.Module) -> tuple[int, ...]:
    """The `F.pad` argument that pads as `conv` does: (before, after) for each spatial dim, the last dim first.

    A conv whose padding_mode is not "zeros" pads the input itself and then convolves without padding; nn.ConvNd
    keeps this tuple only in a private attribute, so it is computed here the same way from the public ones."""
    if conv.padding == "valid":
        return (0, 0) * len(conv.kernel_size)
    if conv.padding == "same":  # as nn.ConvNd computes it: where the total is odd, the extra element goes after
        pads = []
        for dilation, kernel in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = dilation * (kernel - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)
    return tuple(p for p in reversed(conv.padding) for _ in range(2))


class FusedBatchNorm(nn.Module):
    """N BatchNormNd layers as one over N*C channels on C layout (per-channel statistics are per member).

    The forward is nn.modules.batchnorm._BatchNorm.forward with the member dim folded into the channels, so momentum,
    eps and the running-statistics update are the originals'. `num_batches_tracked` is one counter per member."""

    def __init__(self, norms: Sequence[nn.Module]):
        super().__init__()
        first = norms[0]
        self.num_members = len(norms)
        self.num_features, self.eps, self.momentum = first.num_features, first.eps, first.momentum
        self.affine, self.track_running_stats = first.affine, first.track_running_stats
        self.weight = stacked_parameter([b.weight for b in norms]) if first.affine else None
        self.bias = stacked_parameter([b.bias for b in norms]) if first.affine else None
        if first.track_running_stats:
            self.register_buffer("running_mean", torch.stack([b.running_mean for b in norms]))
            self.register_buffer("running_var", torch.stack([b.running_var for b in norms]))
            self.register_buffer("num_batches_tracked", torch.stack([b.num_batches_tracked for b in norms]))
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # a cumulative average; fuse() made sure all members' counters are equal
                factor = 1.0 / float(self.num_batches_tracked[0])
        use_batch_stats = self.training or self.running_mean is None
        track = not self.training or self.track_running_stats
        # Flat views of the [N, C] buffers: batch_norm updates them in place, so the buffers themselves change.
        running_mean = self.running_mean.view(-1) if track and self.running_mean is not None else None
        running_var = self.running_var.view(-1) if track and self.running_var is not None else None
        weight = None if self.weight is None else self.weight.view(-1)
        bias = None if self.bias is None else self.bias.view(-1)
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, factor, self.eps)

    def extra_repr(self):
        return f"members={self.num_members}, {self.num_features}, eps={self.eps}, momentum={self.momentum}"


def linear_member_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """N linear layers at once: x [N, ..., in], weight [N, out, in], bias [N, out] or None -> [N, ..., out]."""
    n, in_features = x.shape[0], x.shape[-1]
    flat = x.reshape(n, -1, in_features)
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


class FusedLinear(nn.Module):
    """N Linear layers as one batched matmul on F layout ([N, B, in] -> [N, B, out])."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.num_members = len(linears)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = stacked_parameter([m.weight for m in linears])
        self.bias = None if linears[0].bias is None else stacked_parameter([m.bias for m in linears])

    def forward(self, x):
        return linear_member_first(x, self.weight, self.bias)

    def extra_repr(self):
        return f"members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


def stacked_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    """One parameter [N, *shape] holding the members' tensors, a copy detached from them."""
    return nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)


# Layers with weights and the fused layer each becomes. Exact types: a subclass may change forward.
FUSED_LAYERS = {nn.Conv1d: FusedConv, nn.Conv2d: FusedConv, nn.Conv3d: FusedConv, nn.BatchNorm1d: FusedBatchNorm,
                nn.BatchNorm2d: FusedBatchNorm, nn.BatchNorm3d: FusedBatchNorm, nn.Linear: FusedLinear}
