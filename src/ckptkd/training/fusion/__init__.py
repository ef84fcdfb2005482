"""Train N students of one architecture as one fused model (horizontal fusion, as in HFTA, Wang et al. MLSys 2021).

Small students are overhead-bound on a CPU: a Fashion-MNIST CNN spends more time in PyTorch's per-op dispatch than in
arithmetic. `fuse(models)` returns one `FusedModel` that computes all N members in each op, so the per-op cost is paid
once for N. `torch.func.vmap` was measured slower than running the members one after another (its batching rules
add their own overhead); grouped convolutions and batched matmuls are faster, so this module rewrites the model's
graph into those.

How: the single model's forward is traced with `torch.fx.symbolic_trace` and rewritten node by node. Every tensor
of one member (an activation, or a parameter read directly in forward) is held for all N members in one of two
layouts:

- member-first, "F": ``[N, *shape]``, the member's tensor with the member index in front. Any op that accepts extra
  leading dims runs on it with its dim arguments shifted by one: ``Linear`` (a batched matmul, `torch.baddbmm`),
  `flatten`, `view`, `cat`, indexing, `softmax`, ...
- channel-stacked, "C": ``[B, N*C, *spatial]``, member 0's channels, then member 1's, ... Conv layers become one
  conv with ``groups * N`` groups, BatchNorm one BatchNorm over ``N * C`` channels (so each member's statistics are
  its own), pooling runs per channel as it is. A reduction over spatial dims (``x.mean((2, 3))``), `flatten(1)` (it
  keeps each member's block contiguous) and element-wise ops (ReLU, residual adds) also stay in this layout.

Converting C -> F is a free view, F -> C one copy; the rewrite only converts where an op needs the other layout (for
the built-in models: the input, and around ShuffleNet's channel split/shuffle). Which ops and layers are supported
is listed in `SUPPORTED_MODULES`, `ELEMENTWISE_FUNCTIONS`, `ELEMENTWISE_METHODS`, `CHANNELWISE_FUNCTIONS` and the
handlers of `_Rewriter`; anything else makes `fusable(model)` return ``(False, reason)`` so that a caller can train
the members one after another instead.

Semantics, member by member:

- forward: ``fused(x)`` with ``x`` of shape ``[N, B, *input_shape]`` (member i sees batch ``x[i]``) returns
  ``[N, B, num_classes]`` equal, up to float rounding, to ``torch.stack([m(x[i]) for i, m in enumerate(models)])``,
  in train and eval mode. BatchNorm uses each member's own batch statistics and updates each member's own running
  statistics with the layer's momentum and eps; `num_batches_tracked` is counted per member. Dropout draws other
  random masks than N separate models would (same distribution). `self.training` used in forward is supported where
  it is the ``training=`` argument of a functional dropout; a forward that branches on it is refused.
- gradients: for a loss that is the SUM over members of each member's own loss, e.g.
  ``N * kd_loss(out.flatten(0, 1), ...)`` for a batch-mean loss (a mean over N*B samples is 1/N of the sum of the N
  member means), the gradient of every fused parameter, sliced at member i, equals member i's separate gradient.
  A fused parameter is stored as ``[N, *shape]``, so an element-wise optimizer over `FusedModel.parameters()` (SGD
  with momentum / Nesterov / weight decay, Adam, AdamW) gives each member exactly the update of its own optimizer.
  NOT per member: gradient-norm clipping (`clip_grad_norm_` would take one norm over all N members), and optimizers
  that take per-tensor norms (LARS, LAMB). We do not clip. A mean over members instead of the sum divides each
  member's gradient by N.
- state: `FusedModel.state_dicts()` gives each member's ordinary state dict (the original model's keys and shapes,
  values bit-exact), `load_state_dicts` the reverse; `fuse` copies the models' current weights exactly. The fused
  model's own `state_dict()` has the same keys with an extra leading N dim.

Layout: with `channels_last=True` the C-layout images are channels-last, which is what makes fusion pay on a CPU: max
pooling, BatchNorm and grouped convolutions vectorise over the N*C channels (bare steps of the 13k-parameter Fashion
student, N = 8, 2 threads: 1.6-2.2x one after another channels-last, 0.7-0.8x channels-first). Channels-last max
pooling breaks ties between equal values in another order than the channels-first kernel, so where a pooling window
holds ties a member's gradient may route differently from the same model trained alone.

Speed (`ckptkd bench --workload fused`, benchmarks/README.md): small models fused train several times faster than one
after another; on a CPU wide convolutions (resnet20 on 3x32x32: 0.76x) are faster apart, which `ckptkd.group`
decides per model.
"""

from __future__ import annotations

import builtins
import copy
import inspect
import operator
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...errors import UserError

__all__ = ["FusedModel", "fuse", "fusable", "SUPPORTED_MODULES"]

MEMBER_FIRST, CHANNEL_STACKED = "F", "C"
# Not a tensor of any member: python numbers, shapes, dtypes, or a constant tensor that is the same for all members.
VALUE, CONSTANT = "V", "K"


class _Unsupported(Exception):
    """Raised while planning the rewrite; its message is the reason `fusable` gives."""


# ---------------------------------------------------------------------------------------------------------------
# Runtime helpers called from the generated forward. Module-level functions, so the generated code reads plainly.


def _to_member_first(x: torch.Tensor, n: int) -> torch.Tensor:
    """C -> F: [B, N*C, ...] -> [N, B, C, ...]. A view, no copy."""
    return x.unflatten(1, (n, -1)).transpose(0, 1)


def _to_channel_stacked(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """F -> C: [N, B, C, ...] -> [B, N*C, ...]. One copy (the member dim moves inside the batch dim); images
    ([B, N*C, H, W]) come out channels-last when asked."""
    x = x.transpose(0, 1).flatten(1, 2)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _cat_channels(tensors: Sequence[torch.Tensor], n: int) -> torch.Tensor:
    """`torch.cat(members' tensors, dim=1)` for C-layout inputs, output in C layout: each member's channels are
    concatenated within that member's block ([a_0, b_0, a_1, b_1, ...]), one copy like a plain cat."""
    return torch.cat([t.unflatten(1, (n, -1)) for t in tensors], dim=2).flatten(1, 2)


def _match_rank(x: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
    """Broadcast an F-layout tensor like the original: a member tensor of lower rank gets its new leading dims
    after the member dim ([N, C, 1, 1] against [N, B, C, H, W] becomes [N, 1, C, 1, 1]), where the original
    [C, 1, 1] against [B, C, H, W] was aligned from the right."""
    rank = max(t.dim() for t in others)
    while x.dim() < rank:
        x = x.unsqueeze(1)
    return x


def _getitem_member_first(x: torch.Tensor, index):
    """`x[index]` of the original, on F layout: the member dim is kept whole."""
    if not isinstance(index, tuple):
        index = (index,)
    return x[(slice(None), *index)]


def _reshape_member_first(x: torch.Tensor, n: int, *sizes):
    """`x.reshape(*sizes)` / `x.view(*sizes)` of the original, on F layout. reshape, not view: an F tensor may be a
    transposed view of a C tensor, where view cannot work; the values are the same."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        sizes = tuple(sizes[0])
    return x.reshape(n, *sizes)


def _linear_member_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """N linear layers at once: x [N, ..., in], weight [N, out, in], bias [N, out] or None -> [N, ..., out]."""
    n, in_features = x.shape[0], x.shape[-1]
    flat = x.reshape(n, -1, in_features)
    if bias is None:
        out = torch.bmm(flat, weight.transpose(1, 2))
    else:
        out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.reshape(*x.shape[:-1], weight.shape[1])


def _check_members(x: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] != n:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"a FusedModel of {n} members takes x of shape [{n}, B, ...] (one batch per member), "
                         f"got {shape}")
    return x


# ---------------------------------------------------------------------------------------------------------------
# Fused layers. Each stores every tensor of the original layer under the same name with a leading member dim.


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
        self._reversed_padding_repeated_twice = first._reversed_padding_repeated_twice
        self.weight = _stacked_parameter([c.weight for c in convs])
        self.bias = None if first.bias is None else _stacked_parameter([c.bias for c in convs])

    def forward(self, x):
        weight = self.weight.flatten(0, 1)  # [N*C_out, C_in/groups, *k]: group j of member i is group i*groups + j
        bias = None if self.bias is None else self.bias.flatten()
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        groups = self.groups * self.num_members
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward: pad first (per channel, so per member)
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, bias, self.stride, 0, self.dilation, groups)
        return conv(x, weight, bias, self.stride, self.padding, self.dilation, groups)

    def extra_repr(self):
        return (f"members={self.num_members}, {self.in_channels}, {self.out_channels}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}")


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
        self.weight = _stacked_parameter([b.weight for b in norms]) if first.affine else None
        self.bias = _stacked_parameter([b.bias for b in norms]) if first.affine else None
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


class FusedLinear(nn.Module):
    """N Linear layers as one batched matmul on F layout ([N, B, in] -> [N, B, out])."""

    def __init__(self, linears: Sequence[nn.Linear]):
        super().__init__()
        self.num_members = len(linears)
        self.in_features, self.out_features = linears[0].in_features, linears[0].out_features
        self.weight = _stacked_parameter([m.weight for m in linears])
        self.bias = None if linears[0].bias is None else _stacked_parameter([m.bias for m in linears])

    def forward(self, x):
        return _linear_member_first(x, self.weight, self.bias)

    def extra_repr(self):
        return f"members={self.num_members}, in_features={self.in_features}, out_features={self.out_features}"


def _stacked_parameter(tensors: Sequence[torch.Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]), requires_grad=tensors[0].requires_grad)


# ---------------------------------------------------------------------------------------------------------------
# What the rewrite knows. Everything else is refused with a reason.

# Layers with weights, rewritten into the fused layers above (exact types: a subclass may change forward).
_FUSED_LAYERS = {nn.Conv1d: FusedConv, nn.Conv2d: FusedConv, nn.Conv3d: FusedConv, nn.BatchNorm1d: FusedBatchNorm,
                 nn.BatchNorm2d: FusedBatchNorm, nn.BatchNorm3d: FusedBatchNorm, nn.Linear: FusedLinear}
# Stateless layers that act on each element alone: run as they are, on either layout.
_ELEMENTWISE_MODULES = {nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                        nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.LogSigmoid,
                        nn.Identity, nn.Dropout, nn.AlphaDropout}
# Stateless layers that treat each channel of [B, C, *spatial] alone: run as they are, on C layout.
_CHANNELWISE_MODULES = {nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                        nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                        nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d}
# Layers rewritten into the functional op they are (dims shifted): Flatten, Softmax, LogSoftmax.
_DIM_MODULES = {nn.Flatten, nn.Softmax, nn.LogSoftmax}
SUPPORTED_MODULES = frozenset(_FUSED_LAYERS) | _ELEMENTWISE_MODULES | _CHANNELWISE_MODULES | _DIM_MODULES

ELEMENTWISE_FUNCTIONS = frozenset({
    F.relu, F.relu_, F.relu6, F.elu, F.selu, F.celu, F.leaky_relu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.softplus, F.logsigmoid, F.sigmoid, F.tanh, F.dropout, F.alpha_dropout,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs, torch.neg, torch.sqrt,
    torch.rsqrt, torch.square, torch.clamp, torch.clip, torch.add, torch.sub, torch.mul, torch.div, torch.pow,
    torch.maximum, torch.minimum, operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
    operator.pow,
})
ELEMENTWISE_METHODS = frozenset({
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt", "rsqrt", "square",
    "clamp", "clamp_", "clip", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum",
    "minimum", "contiguous", "clone", "float", "double", "half", "bfloat16", "to", "type_as", "detach",
})
# Functions that treat each channel of [B, C, *spatial] alone, run on C layout.
CHANNELWISE_FUNCTIONS = frozenset({
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d, F.dropout1d, F.dropout2d, F.dropout3d, F.interpolate,
})
# Dropout functions whose `training=` argument may be `self.training` (then it follows FusedModel.train()/eval()).
_TRAINING_ARGUMENT = {F.dropout, F.alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.feature_alpha_dropout}
# Reductions and other ops with one `dim` argument right after the input.
_DIM_METHODS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax", "logsumexp", "unsqueeze", "squeeze"}
_DIM_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                  torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
                  F.log_softmax: "log_softmax", torch.logsumexp: "logsumexp", torch.unsqueeze: "unsqueeze",
                  torch.squeeze: "squeeze"}
_IN_PLACE_FUNCTIONS = {F.relu_, torch.relu_}
_RETURN_INDICES_POSITION = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, F.adaptive_max_pool1d: 2,
                            F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2}


def _shift(dim):
    """A dim of the original tensor on F layout (the member dim in front): counting from the end is unchanged."""
    if isinstance(dim, (tuple, list)):
        return type(dim)(_shift(d) for d in dim)
    if not isinstance(dim, int):
        raise _Unsupported(f"a dim given as {type(dim).__name__}, not a number known when tracing")
    return dim + 1 if dim >= 0 else dim


def _beyond_channels(dim) -> bool:
    """Whether an op over `dim` leaves dims 0 (batch) and 1 (channels) alone, so it runs unchanged on C layout."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    return all(isinstance(d, int) and d >= 2 for d in dims)


def _where(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    if isinstance(path, tuple):
        path = path[0]
    return f" in '{path}'" if path else ""


def _name(target) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


# ---------------------------------------------------------------------------------------------------------------
# The rewrite.


class _Rewriter:
    """Builds the fused graph from a traced member, node by node.

    `env` maps each node of the traced graph to (its value in the new graph, layout). Each handler maps one node
    and decides the layout of its result; `_as` converts member tensors between layouts where an op needs it."""

    def __init__(self, traced: torch.fx.GraphModule, n: int, training_nodes: set[str], channels_last: bool):
        self.traced, self.n, self.channels_last = traced, n, channels_last
        self.modules = dict(traced.named_modules())
        self.member_tensors = {name for name, _ in traced.named_parameters()} | {
            name for name, _ in traced.named_buffers()}
        self.training_nodes = training_nodes  # dropout calls whose training= argument is self.training
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, tuple] = {}
        self.module_kinds: dict[str, str] = {}  # call_module target -> "fused" | "stateless"
        self.constants: set[str] = set()  # get_attr targets that are not a member's parameter or buffer
        self._views: dict[tuple, torch.fx.Node] = {}  # C -> F views: alias their source, so always reusable
        self._copies: dict[tuple, torch.fx.Node] = {}  # F -> C copies: reusable until an in-place op runs
        self._training_flag = None
        self._first_input = True

    # -- layouts ------------------------------------------------------------------------------------------------

    def _as(self, node: torch.fx.Node, layout: str) -> torch.fx.Node:
        new, have = self.env[node]
        if have == layout:
            return new
        if have not in (MEMBER_FIRST, CHANNEL_STACKED):
            raise _Unsupported(f"'{node.name}' is not a tensor of each member where one is needed{_where(node)}")
        if layout == MEMBER_FIRST:
            key = (node, layout)
            if key not in self._views:
                self._views[key] = self.graph.call_function(_to_member_first, (new, self.n))
            return self._views[key]
        key = (node, layout)
        if key not in self._copies:
            self._copies[key] = self.graph.call_function(_to_channel_stacked, (new, self.channels_last))
        return self._copies[key]

    def _value(self, arg):
        """Map a non-member argument (numbers, shapes, dtypes, nested lists of them) into the new graph."""
        def convert(node):
            new, layout = self.env[node]
            if layout in (MEMBER_FIRST, CHANNEL_STACKED):
                raise _Unsupported(f"a member tensor ('{node.name}') passed where the rewrite expects a constant "
                                   f"(an argument it does not know how to fuse){_where(node)}")
            return new
        return torch.fx.node.map_arg(arg, convert)

    def _layout(self, arg) -> str:
        return self.env[arg][1] if isinstance(arg, torch.fx.Node) else VALUE

    def _is_member(self, arg) -> bool:
        return self._layout(arg) in (MEMBER_FIRST, CHANNEL_STACKED)

    def _emit(self, op, target, args, kwargs, layout):
        if op == "call_function":
            new = self.graph.call_function(target, tuple(args), dict(kwargs))
        elif op == "call_method":
            new = self.graph.call_method(target, tuple(args), dict(kwargs))
        else:
            new = self.graph.call_module(target, tuple(args), dict(kwargs))
        return new, layout

    # -- driver -------------------------------------------------------------------------------------------------

    def run(self) -> torch.fx.Graph:
        for node in self.traced.graph.nodes:
            handler = getattr(self, f"_{node.op}")
            self.env[node] = handler(node)
        return self.graph

    def _placeholder(self, node):
        default = node.args[0] if node.args else inspect.Signature.empty
        new = self.graph.placeholder(node.name, default_value=default)
        if self._first_input:  # x: [N, B, ...], each member's batch
            self._first_input = False
            return self.graph.call_function(_check_members, (new, self.n)), MEMBER_FIRST
        return new, VALUE  # further inputs are passed through, the same for all members

    def _get_attr(self, node):
        new = self.graph.get_attr(node.target)
        if node.target in self.member_tensors:
            return new, MEMBER_FIRST  # a parameter or buffer read in forward: stored [N, *shape]
        value = _get_path(self.traced, node.target)
        self.constants.add(node.target)
        return new, CONSTANT if isinstance(value, torch.Tensor) else VALUE

    def _output(self, node):
        def convert(arg):
            return self._as(arg, MEMBER_FIRST) if self._is_member(arg) else self.env[arg][0]
        self.graph.output(torch.fx.node.map_arg(node.args[0], convert))
        return None, VALUE

    # -- modules ------------------------------------------------------------------------------------------------

    def _call_module(self, node):
        module = self.modules[node.target]
        kind = type(module)
        where = f"'{node.target}' ({kind.__name__})"
        x = node.args[0] if node.args else None
        if len(node.args) != 1 or node.kwargs or not self._is_member(x):
            raise _Unsupported(f"{where} is called with other than one member tensor")
        if kind in _FUSED_LAYERS:
            self._check_layer(module, where)
            self.module_kinds[node.target] = "fused"
            layout = MEMBER_FIRST if kind is nn.Linear else CHANNEL_STACKED
            return self._emit("call_module", node.target, [self._as(x, layout)], {}, layout)
        if kind in _ELEMENTWISE_MODULES:
            self.module_kinds[node.target] = "stateless"
            if getattr(module, "inplace", False):
                self._copies.clear()
            return self._emit("call_module", node.target, [self.env[x][0]], {}, self.env[x][1])
        if kind in _CHANNELWISE_MODULES:
            if getattr(module, "return_indices", False):
                raise _Unsupported(f"{where} returns indices")
            self.module_kinds[node.target] = "stateless"
            return self._emit("call_module", node.target, [self._as(x, CHANNEL_STACKED)], {}, CHANNEL_STACKED)
        if kind is nn.Flatten:
            return self._flatten(x, module.start_dim, module.end_dim)
        if kind in (nn.Softmax, nn.LogSoftmax):
            if module.dim is None:
                raise _Unsupported(f"{where} has no dim")
            name = "softmax" if kind is nn.Softmax else "log_softmax"
            return self._dim_op(node, name, x, module.dim, [], {})
        raise _Unsupported(f"{where}: no fused form of this layer (supported: "
                           f"{', '.join(sorted(m.__name__ for m in SUPPORTED_MODULES))})")

    @staticmethod
    def _check_layer(module, where):
        if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
            raise _Unsupported(f"{where}: transposed convolutions are not supported")
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats \
                and module.running_mean is not None:
            raise _Unsupported(f"{where}: BatchNorm with running stats but track_running_stats=False")

    # -- functions and methods ----------------------------------------------------------------------------------

    def _call_function(self, node):
        target = node.target
        args, kwargs = node.args, node.kwargs
        if target is operator.getitem:
            return self._getitem(node)
        if target is builtins.getattr:
            return self._getattr(node, args[0], args[1])
        if not any(self._is_member(a) for a in _flat_nodes((args, kwargs))):
            # No member tensor in: shape arithmetic and python math stay values; anything else (torch.zeros(...),
            # a constant tensor op) is a constant tensor, the same for every member.
            if any(self._layout(a) == CONSTANT for a in _flat_nodes((args, kwargs))) and target not in (
                    operator.getitem, builtins.getattr):
                raise _Unsupported(f"{_name(target)} of constant tensors{_where(node)}")
            python = getattr(target, "__module__", None) in ("_operator", "operator", "builtins", "math")
            return self._emit("call_function", target, self._value(args), self._value(kwargs),
                              VALUE if python else CONSTANT)
        if target in _TRAINING_ARGUMENT and node.name in self.training_nodes:
            # `training=self.training` was traced as a constant: read the FusedModel's flag at each call instead.
            bound, flag = _bind(node), self._training()  # the flag's node first: the call reads it
            new, layout = self._call_function_plain(node, target, (bound.pop("input"),), bound)
            new.update_kwarg("training", flag)
            return new, layout
        return self._call_function_plain(node, target, args, kwargs)

    def _call_function_plain(self, node, target, args, kwargs):
        if target in ELEMENTWISE_FUNCTIONS:
            in_place = target in _IN_PLACE_FUNCTIONS or kwargs.get("inplace") is True
            return self._elementwise(node, "call_function", target, args, kwargs, in_place)
        if target in CHANNELWISE_FUNCTIONS:
            position = _RETURN_INDICES_POSITION.get(target)
            if kwargs.get("return_indices") or (position is not None and len(args) > position and args[position]):
                raise _Unsupported(f"{_name(target)} with return_indices{_where(node)}")
            x = self._as(args[0], CHANNEL_STACKED)
            return self._emit("call_function", target, [x, *self._value(args[1:])], self._value(kwargs),
                              CHANNEL_STACKED)
        if target in _DIM_FUNCTIONS:
            return self._dim_call(node, _DIM_FUNCTIONS[target], args, kwargs)
        if target is torch.flatten:
            return self._flatten(args[0], *_params(args[1:], kwargs, ("start_dim", 0), ("end_dim", -1)))
        if target in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            return self._cat(node, target, args, kwargs)
        if target in (torch.transpose, torch.swapaxes):
            return self._transpose(args[0], *_params(args[1:], kwargs, ("dim0", _REQUIRED), ("dim1", _REQUIRED)))
        if target is torch.permute:
            return self._permute(args[0], args[1] if len(args) > 1 else kwargs["dims"])
        if target is torch.reshape:
            return self._reshape(args[0], args[1:] or (kwargs["shape"],))
        if target is F.linear:
            return self._functional_linear(node)
        raise _Unsupported(f"{_name(target)}{_where(node)}: not an op the fused rewrite knows")

    def _call_method(self, node):
        name, (x, *rest), kwargs = node.target, node.args, node.kwargs
        if not self._is_member(x):
            if self._layout(x) == CONSTANT or any(self._is_member(a) for a in _flat_nodes((rest, kwargs))):
                raise _Unsupported(f"Tensor.{name} of a constant tensor{_where(node)}")
            return self._emit("call_method", name, self._value(node.args), self._value(kwargs), VALUE)
        if name in ELEMENTWISE_METHODS:
            return self._elementwise(node, "call_method", name, node.args, kwargs, in_place=name.endswith("_"))
        if name in _DIM_METHODS:
            return self._dim_call(node, name, node.args, kwargs)
        if name == "flatten":
            return self._flatten(x, *_params(rest, kwargs, ("start_dim", 0), ("end_dim", -1)))
        if name == "unflatten":
            dim, sizes = _params(rest, kwargs, ("dim", _REQUIRED), ("sizes", _REQUIRED))
            if self._layout(x) == CHANNEL_STACKED and _beyond_channels(dim):
                return self._emit("call_method", name, [self.env[x][0], dim, self._value(sizes)], {},
                                  CHANNEL_STACKED)
            return self._emit("call_method", name, [self._as(x, MEMBER_FIRST), _shift(dim), self._value(sizes)],
                              {}, MEMBER_FIRST)
        if name in ("transpose", "swapaxes"):
            return self._transpose(x, *_params(rest, kwargs, ("dim0", _REQUIRED), ("dim1", _REQUIRED)))
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs["dims"]
            return self._permute(x, dims)
        if name in ("view", "reshape"):
            return self._reshape(x, rest or (kwargs.get("size", kwargs.get("shape")),))
        if name == "size":
            x_f = self._as(x, MEMBER_FIRST)
            if rest or kwargs:
                (dim,) = _params(rest, kwargs, ("dim", _REQUIRED))
                return self._emit("call_method", "size", [x_f, _shift(dim)], {}, VALUE)
            size = self.graph.call_method("size", (x_f,))
            return self._emit("call_function", operator.getitem, [size, slice(1, None)], {}, VALUE)
        if name in ("dim", "ndimension"):
            rank = self.graph.call_method("dim", (self._as(x, MEMBER_FIRST),))
            return self._emit("call_function", operator.sub, [rank, 1], {}, VALUE)
        raise _Unsupported(f"Tensor.{name}{_where(node)}: not an op the fused rewrite knows")

    # -- handlers -----------------------------------------------------------------------------------------------

    def _training(self):
        if self._training_flag is None:  # `self.training` of the FusedModel, read at each call
            self._training_flag = self.graph.get_attr("training")
        return self._training_flag

    def _elementwise(self, node, op, target, args, kwargs, in_place):
        members = [a for a in _flat_nodes((args, kwargs)) if self._is_member(a)]
        has_constant = any(self._layout(a) == CONSTANT for a in _flat_nodes((args, kwargs)))
        if in_place:
            # The result aliases the first operand, so it keeps that layout; F -> C copies made earlier would no
            # longer hold its values.
            layout = self._layout(args[0])
            if layout not in (MEMBER_FIRST, CHANNEL_STACKED):
                raise _Unsupported(f"in-place {_name(target)} on a non-member tensor{_where(node)}")
            self._copies.clear()
        elif all(self._layout(m) == CHANNEL_STACKED for m in members) and not has_constant:
            layout = CHANNEL_STACKED  # same-shaped members, e.g. a residual add: runs as it is
        else:
            layout = MEMBER_FIRST  # constants and mixed ranks broadcast correctly only with the member dim in front
        converted = {m: self._as(m, layout) for m in members}
        if layout == MEMBER_FIRST and len(members) > 1:
            for m in members:
                if m is not args[0] or not in_place:
                    others = [converted[o] for o in members if o is not m]
                    converted[m] = self.graph.call_function(_match_rank, (converted[m], *others))

        def convert(a):
            return converted[a] if a in converted else self._value(a) if self._layout(a) != CONSTANT \
                else self.env[a][0]
        return self._emit(op, target, torch.fx.node.map_arg(args, convert), torch.fx.node.map_arg(kwargs, convert),
                          layout)

    def _dim_call(self, node, name, args, kwargs):
        x, rest = args[0], list(args[1:])
        if rest:
            dim, rest = rest[0], rest[1:]
        elif "dim" in kwargs:
            dim, kwargs = kwargs["dim"], {k: v for k, v in kwargs.items() if k != "dim"}
        else:
            raise _Unsupported(f"{name} without a dim (over all elements, so over the batch){_where(node)}")
        return self._dim_op(node, name, x, dim, rest, kwargs)

    def _dim_op(self, node, name, x, dim, rest, kwargs):
        if isinstance(dim, torch.fx.Node):
            raise _Unsupported(f"{name} over a dim computed at run time{_where(node)}")
        if self._layout(x) == CHANNEL_STACKED and _beyond_channels(dim):
            return self._emit("call_method", name, [self.env[x][0], dim, *self._value(rest)], self._value(kwargs),
                              CHANNEL_STACKED)
        return self._emit("call_method", name, [self._as(x, MEMBER_FIRST), _shift(dim), *self._value(rest)],
                          self._value(kwargs), MEMBER_FIRST)

    def _flatten(self, x, start_dim, end_dim):
        if self._layout(x) == CHANNEL_STACKED and isinstance(start_dim, int) and start_dim >= 1:
            # [B, N*C, H, W] flattened from dim 1 is [B, N*C*H*W] with member i's values in block i: C layout of
            # the flattened tensor, no copy beyond the original's.
            return self._emit("call_method", "flatten", [self.env[x][0], start_dim, end_dim], {}, CHANNEL_STACKED)
        return self._emit("call_method", "flatten", [self._as(x, MEMBER_FIRST), _shift(start_dim), _shift(end_dim)],
                          {}, MEMBER_FIRST)

    def _transpose(self, x, dim0, dim1):
        if self._layout(x) == CHANNEL_STACKED and _beyond_channels((dim0, dim1)):
            return self._emit("call_method", "transpose", [self.env[x][0], dim0, dim1], {}, CHANNEL_STACKED)
        return self._emit("call_method", "transpose", [self._as(x, MEMBER_FIRST), _shift(dim0), _shift(dim1)], {},
                          MEMBER_FIRST)

    def _permute(self, x, dims):
        return self._emit("call_method", "permute", [self._as(x, MEMBER_FIRST), [0, *_shift(list(dims))]], {},
                          MEMBER_FIRST)

    def _reshape(self, x, sizes):
        return self._emit("call_function", _reshape_member_first,
                          [self._as(x, MEMBER_FIRST), self.n, *self._value(list(sizes))], {}, MEMBER_FIRST)

    def _cat(self, node, target, args, kwargs):
        tensors, dim = _params(args, kwargs, ("tensors", _REQUIRED), ("dim", 0))
        if not isinstance(tensors, (list, tuple)) or not all(self._is_member(t) for t in tensors):
            raise _Unsupported(f"{_name(target)} of other than member tensors{_where(node)}")
        if isinstance(dim, torch.fx.Node):
            raise _Unsupported(f"{_name(target)} over a dim computed at run time{_where(node)}")
        if target is not torch.stack and all(self._layout(t) == CHANNEL_STACKED for t in tensors):
            if dim == 1:  # channel concatenation (ShuffleNet, DenseNet-like): stays C
                return self._emit("call_function", _cat_channels, [[self.env[t][0] for t in tensors], self.n], {},
                                  CHANNEL_STACKED)
            if _beyond_channels(dim):
                return self._emit("call_function", torch.cat, [[self.env[t][0] for t in tensors], dim], {},
                                  CHANNEL_STACKED)
        return self._emit("call_function", target, [[self._as(t, MEMBER_FIRST) for t in tensors], _shift(dim)], {},
                          MEMBER_FIRST)

    def _getitem(self, node):
        x, index = node.args
        if not self._is_member(x):
            return self._emit("call_function", operator.getitem, [self.env[x][0], self._value(index)], {},
                              self._layout(x))
        return self._emit("call_function", _getitem_member_first, [self._as(x, MEMBER_FIRST), self._value(index)],
                          {}, MEMBER_FIRST)

    def _getattr(self, node, x, attr):
        if not self._is_member(x):
            return self._emit("call_function", builtins.getattr, [self._value(x), attr], {}, VALUE)
        if attr == "shape":
            shape = self.graph.call_function(builtins.getattr, (self._as(x, MEMBER_FIRST), "shape"))
            return self._emit("call_function", operator.getitem, [shape, slice(1, None)], {}, VALUE)
        if attr == "ndim":
            rank = self.graph.call_function(builtins.getattr, (self._as(x, MEMBER_FIRST), "ndim"))
            return self._emit("call_function", operator.sub, [rank, 1], {}, VALUE)
        if attr in ("dtype", "device", "is_cuda", "requires_grad"):
            return self._emit("call_function", builtins.getattr, [self.env[x][0], attr], {}, VALUE)
        raise _Unsupported(f"Tensor attribute '{attr}'{_where(node)}")

    def _functional_linear(self, node):
        x, weight, bias = _params(node.args, node.kwargs, ("input", _REQUIRED), ("weight", _REQUIRED), ("bias", None))
        for t in (weight, bias):
            if t is not None and not (isinstance(t, torch.fx.Node) and t.op == "get_attr"
                                      and t.target in self.member_tensors):
                raise _Unsupported(f"F.linear with a weight that is not a parameter of the model{_where(node)}")
        bias_new = None if bias is None else self.env[bias][0]
        return self._emit("call_function", _linear_member_first, [self._as(x, MEMBER_FIRST), self.env[weight][0],
                                                                  bias_new], {}, MEMBER_FIRST)


_REQUIRED = object()


def _params(args, kwargs, *spec):
    """Positional-or-keyword arguments by name: spec = (name, default), ...; a default of _REQUIRED must be given."""
    values = []
    for i, (name, default) in enumerate(spec):
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif default is _REQUIRED:
            raise _Unsupported(f"missing argument '{name}'")
        else:
            values.append(default)
    return values


def _flat_nodes(arg) -> list[torch.fx.Node]:
    found = []
    torch.fx.node.map_arg(arg, found.append)
    return found


def _get_path(root: nn.Module, target: str):
    *path, name = target.split(".")
    module = root.get_submodule(".".join(path)) if path else root
    return getattr(module, name)


# ---------------------------------------------------------------------------------------------------------------
# Tracing and checks.


def _trace(model: nn.Module) -> tuple[torch.fx.GraphModule, set[str]]:
    """The model traced in train mode, and the dropout calls whose `training=` came from `self.training`.

    Tracing records python control flow as it ran, `self.training` included, so the model is traced in both modes:
    the graphs may differ only in those dropout arguments (replaced by the FusedModel's own flag), or the forward
    branches on the mode and cannot be one graph."""
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        model.train()
        train = torch.fx.symbolic_trace(model)
        model.eval()
        evaluation = torch.fx.symbolic_trace(model)
    except Exception as error:  # noqa: BLE001 - any tracing failure means: not fusable, say why
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise _Unsupported(f"torch.fx cannot trace {type(model).__name__}.forward ({message})") from None
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]
    train_nodes, eval_nodes = list(train.graph.nodes), list(evaluation.graph.nodes)
    training_nodes = set()
    same = len(train_nodes) == len(eval_nodes)
    for a, b in zip(train_nodes, eval_nodes) if same else ():
        if (a.op, a.target, a.name) != (b.op, b.target, b.name):
            same = False
            break
        if _by_name((a.args, a.kwargs)) == _by_name((b.args, b.kwargs)):
            continue
        if a.op == "call_function" and a.target in _TRAINING_ARGUMENT:
            bound_a, bound_b = _bind(a), _bind(b)
            if bound_a is not None and bound_b is not None and bound_a.pop("training", None) is True \
                    and bound_b.pop("training", None) is False and _by_name(bound_a) == _by_name(bound_b):
                training_nodes.add(a.name)
                continue
        same = False
        break
    if not same:
        raise _Unsupported(f"{type(model).__name__}.forward branches on self.training (beyond the training= "
                           "argument of a functional dropout), so train and eval mode are not one graph")
    if any(node.op == "call_function" and node.target in _TRAINING_ARGUMENT and node.name not in training_nodes
           and _bind(node) is None for node in train_nodes):
        raise _Unsupported("a dropout call whose arguments the rewrite cannot read")
    return train, training_nodes


def _by_name(arg):
    """Arguments with each node replaced by its name, to compare two graphs' nodes."""
    return torch.fx.node.map_arg(arg, lambda node: ("node", node.name))


def _bind(node) -> dict | None:
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)
    except (TypeError, ValueError):
        return None


def _plan(model: nn.Module, n: int, channels_last: bool = False):
    """Trace and rewrite (without touching weights): what fusable() checks and fuse() builds from."""
    if not isinstance(model, nn.Module):
        raise _Unsupported(f"not a torch.nn.Module ({type(model).__name__})")
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if len(names) != len(set(id(p) for p in model.parameters())):
        raise _Unsupported("the model shares (ties) a parameter between layers; stacking would untie it")
    top_level = {key.split(".")[0] for key in model.state_dict()} | set(dict(model.named_children()))
    taken = sorted(name for name in top_level if name in _RESERVED or hasattr(FusedModel, name))
    if taken:
        raise _Unsupported(f"the model has a top-level attribute '{taken[0]}', a name FusedModel uses itself")
    traced, training_nodes = _trace(model)
    rewriter = _Rewriter(traced, n, training_nodes, channels_last)
    graph = rewriter.run()
    return traced, rewriter, graph


def fusable(model: nn.Module) -> tuple[bool, str]:
    """Whether `fuse` can rewrite this architecture: (True, "") or (False, a one-line reason).

    Only the architecture is checked (tracing and the op rewrite); `fuse` also checks that its models agree."""
    try:
        _plan(model, 2)
    except _Unsupported as error:
        return False, str(error)
    return True, ""


def _architecture_difference(first: nn.Module, other: nn.Module, first_code: str, other_code: str) -> str | None:
    if type(first) is not type(other):
        return f"class {type(other).__name__} vs {type(first).__name__}"
    a = _tensor_table(first)
    b = _tensor_table(other)
    if list(a) != list(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if missing or extra:
            return f"state-dict keys (missing {missing[:3]}, extra {extra[:3]})"
        return "order of state-dict keys"
    for key in a:
        if a[key] != b[key]:
            (shape_a, dtype_a, dev_a, grad_a, kind_a), (shape_b, dtype_b, dev_b, grad_b, kind_b) = a[key], b[key]
            return (f"'{key}': shape {list(shape_b)} vs {list(shape_a)}" if shape_a != shape_b else
                    f"'{key}': dtype {dtype_b} vs {dtype_a}" if dtype_a != dtype_b else
                    f"'{key}': device {dev_b} vs {dev_a}" if dev_a != dev_b else
                    f"'{key}': requires_grad {grad_b} vs {grad_a}" if grad_a != grad_b else
                    f"'{key}': {kind_b} vs {kind_a}")
    if repr(first) != repr(other):
        return "configuration (the modules' repr differs)"
    if first_code != other_code:
        return "forward code (a constructor argument that changes forward but no tensor shape)"
    return None


def _tensor_table(model: nn.Module) -> dict:
    table = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        table[name] = (tuple(p.shape), p.dtype, p.device, p.requires_grad, "parameter")
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        kind = "buffer" if name in persistent else "non-persistent buffer"
        table[name] = (tuple(b.shape), b.dtype, b.device, False, kind)
    return table


# ---------------------------------------------------------------------------------------------------------------
# The fused model.

_RESERVED = ("num_members", "_graph", "_forward", "_member_keys")  # besides FusedModel's methods


class FusedModel(nn.Module):
    """N models of one architecture computed as one (see the module docstring). Build it with `fuse(models)`.

    forward(x): x is [N, B, *input_shape] (member i gets batch x[i]); returns [N, B, num_classes] (or, for a model
    that returns several tensors, each with the member dim in front). Submodules keep the original model's names and
    hold every tensor as [N, *original_shape], so `named_parameters()` names are the original ones."""

    def __init__(self, models: Sequence[nn.Module], channels_last: bool = False):
        super().__init__()
        models = list(models)
        if not models:
            raise UserError("fuse() needs at least one model")
        if not all(isinstance(m, nn.Module) for m in models):
            raise UserError("fuse() takes torch.nn.Module models")
        try:
            traced, rewriter, graph = _plan(models[0], len(models), channels_last)
        except _Unsupported as error:
            raise UserError(f"cannot fuse {type(models[0]).__name__}: {error}") from None
        first_code = traced.code
        for i, model in enumerate(models[1:], start=1):
            try:
                other_code = _trace(model)[0].code if type(model) is type(models[0]) else ""
            except _Unsupported as error:
                raise UserError(f"cannot fuse: model {i}: {error}") from None
            difference = _architecture_difference(models[0], model, first_code, other_code)
            if difference is not None:
                raise UserError(f"cannot fuse models of different architectures: model {i} differs from model 0 "
                                f"in {difference}")
        self.num_members = len(models)
        self._member_keys = list(models[0].state_dict().keys())
        self._build_modules(models, traced, rewriter)
        self._check_counters()
        self._graph = graph
        self._compile()
        self.train(models[0].training)

    # -- building ----------------------------------------------------------------------------------------------

    def _build_modules(self, models, traced, rewriter):
        # Fused and stateless layers where the graph calls them ...
        for target, kind in rewriter.module_kinds.items():
            if kind == "fused":
                layers = [m.get_submodule(target) for m in models]
                module = _FUSED_LAYERS[type(layers[0])](layers)
            else:
                module = copy.deepcopy(models[0].get_submodule(target))
            _set_module(self, target, module)
        # ... then every other tensor of the members (read directly in forward, or unused): stacked under its own
        # name, so state_dicts() has every key of the original.
        done = {name for name, _ in self.named_parameters()} | {name for name, _ in self.named_buffers()}
        persistent = set(models[0].state_dict(keep_vars=True))
        for name, _ in models[0].named_parameters():
            if name not in done:
                *path, attr = name.split(".")
                tensors = [m.get_parameter(name) for m in models]
                _container(self, path).register_parameter(attr, _stacked_parameter(tensors))
        for name, _ in models[0].named_buffers():
            if name not in done:
                *path, attr = name.split(".")
                stacked = torch.stack([m.get_buffer(name).detach() for m in models])
                _container(self, path).register_buffer(attr, stacked, persistent=name in persistent)
        # Constant tensors the trace lifted out of forward (the same in every member): plain attributes.
        for target in rewriter.constants:
            *path, attr = target.split(".")
            setattr(_container(self, path), attr, _get_path(traced, target))
        own = self.state_dict(keep_vars=True)
        for key in self._member_keys:  # the invariant state_dicts() relies on
            expected = (self.num_members, *models[0].state_dict()[key].shape)
            if key not in own or tuple(own[key].shape) != expected:
                raise RuntimeError(f"internal error in fuse(): '{key}' not stacked as {expected}")

    def _check_counters(self):
        for name, module in self.named_modules():
            if isinstance(module, FusedBatchNorm) and module.momentum is None and module.num_batches_tracked is not \
                    None and not bool((module.num_batches_tracked == module.num_batches_tracked[0]).all()):
                raise UserError(f"cannot fuse: BatchNorm '{name}' has momentum=None (a cumulative average) and the "
                                "members' num_batches_tracked differ")

    def _compile(self):
        # The fused graph becomes this module's forward as python source, as GraphModule does it. The generated
        # code reads submodules and tensors from `self` at each call, so .to(), load_state_dict() and train()/eval()
        # act on what forward uses.
        code = self._graph.python_code(root_module="self")
        namespace = dict(code.globals)
        exec(compile(code.src, f"<ckptkd.fused:{len(self._graph.nodes)} nodes>", "exec"), namespace)
        self.__dict__["_forward"] = namespace["forward"]

    @property
    def code(self) -> str:
        """The generated forward, for reading."""
        return self._graph.python_code(root_module="self").src

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_forward", None)  # generated code is not picklable; rebuilt from the graph
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._compile()

    def forward(self, x, *args, **kwargs):
        return self._forward(self, x, *args, **kwargs)

    # -- per-member state --------------------------------------------------------------------------------------

    def state_dicts(self) -> list[dict[str, torch.Tensor]]:
        """Each member's state dict: the original model's keys and shapes, values copied bit-exactly."""
        return [self.member(i) for i in range(self.num_members)]

    def member(self, i: int) -> dict[str, torch.Tensor]:
        """Member i's state dict (as state_dicts()[i], without copying the others)."""
        own = self.state_dict(keep_vars=True)
        return {key: own[key][i].detach().clone() for key in self._member_keys}

    def load_state_dicts(self, state_dicts: Sequence[dict[str, torch.Tensor]]) -> None:
        """Load one ordinary state dict per member (strict: exactly the original model's keys and shapes)."""
        state_dicts = list(state_dicts)
        if len(state_dicts) != self.num_members:
            raise UserError(f"load_state_dicts: {len(state_dicts)} state dicts for {self.num_members} members")
        for i, sd in enumerate(state_dicts):
            self._check_member_state(i, sd)
        for i, sd in enumerate(state_dicts):
            self.load_member(i, sd, checked=True)

    def load_member(self, i: int, state_dict: dict[str, torch.Tensor], *, checked: bool = False) -> None:
        """Load an ordinary state dict into member i alone (strict, as load_state_dicts)."""
        if not checked:
            self._check_member_state(i, state_dict)
        own = self.state_dict(keep_vars=True)
        with torch.no_grad():
            for key in self._member_keys:
                own[key][i].copy_(state_dict[key])
        self._check_counters()

    def _check_member_state(self, i: int, sd: dict[str, torch.Tensor]) -> None:
        own = self.state_dict(keep_vars=True)
        missing, extra = set(self._member_keys) - set(sd), set(sd) - set(self._member_keys)
        if missing or extra:
            raise UserError(f"load_state_dicts: member {i}: missing keys {sorted(missing)[:3]}, unexpected "
                            f"keys {sorted(extra)[:3]}")
        for key in self._member_keys:
            if tuple(sd[key].shape) != tuple(own[key].shape[1:]):
                raise UserError(f"load_state_dicts: member {i}: '{key}' has shape {list(sd[key].shape)}, the "
                                f"model's is {list(own[key].shape[1:])}")


def fuse(models: Sequence[nn.Module], channels_last: bool = False) -> FusedModel:
    """One FusedModel computing `models` (same architecture), initialised with their current tensors.

    Raises UserError with a one-line message if the models differ in architecture or the architecture has an op
    the rewrite does not know (check first with `fusable`). The models themselves are not changed or kept."""
    return FusedModel(models, channels_last)


def _container(root: nn.Module, path: list[str]) -> nn.Module:
    module = root
    for name in path:
        child = module._modules.get(name)
        if child is None:
            child = nn.Module()
            module.add_module(name, child)
        module = child
    return module


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    *path, name = target.split(".")
    _container(root, path).add_module(name, module)
