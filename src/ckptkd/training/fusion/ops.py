"""What the rewrite knows: the layers, functions and tensor methods it fuses, how it reads their arguments, and the
error that refuses everything else (`called_in` and `op_name` word its reasons).

Besides the tables below, `rewrite.Rewriter` handles some ops by name (flatten, unflatten, cat/stack, transpose,
permute, view/reshape, size, dim, indexing, tensor attributes, F.linear). Anything else raises `Unsupported`, whose
message is the reason `fusable(model)` gives, so that a caller can train the members one after another instead."""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .modules import FUSED_LAYERS


class Unsupported(Exception):
    """Raised while planning the rewrite; its message is the reason `fusable` gives."""


def called_in(node: torch.fx.Node) -> str:
    """Where in the model a node was called (" in 'layer1.0.conv'"), for a reason to name; "" where unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    path = next(reversed(stack.values()), None) if stack else None
    if isinstance(path, tuple):
        path = path[0]
    return f" in '{path}'" if path else ""


def op_name(target) -> str:
    """A call's target by name: "torch.cumsum" for a function, "Tensor.cumsum" for a method."""
    if isinstance(target, str):
        return f"Tensor.{target}"
    module = getattr(target, "__module__", None) or ""
    return f"{module}.{getattr(target, '__name__', repr(target))}".lstrip(".")


# Stateless layers that act on each element alone: run as they are, on either layout.
ELEMENTWISE_MODULES = {nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                       nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Softplus, nn.LogSigmoid,
                       nn.Identity, nn.Dropout, nn.AlphaDropout}
# Stateless layers that treat each channel of [B, C, *spatial] alone: run as they are, on C layout.
CHANNELWISE_MODULES = {nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                       nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                       nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d}
# Layers rewritten into the functional op they are (dims shifted).
DIM_MODULES = {nn.Flatten, nn.Softmax, nn.LogSoftmax}
# Layers with weights (`FUSED_LAYERS`, exact types) and the stateless ones above.
SUPPORTED_MODULES = frozenset(FUSED_LAYERS) | ELEMENTWISE_MODULES | CHANNELWISE_MODULES | DIM_MODULES
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

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
TRAINING_ARGUMENT = {F.dropout, F.alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.feature_alpha_dropout}
# Reductions and other ops with one `dim` argument right after the input.
DIM_METHODS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax", "logsumexp", "unsqueeze", "squeeze"}
DIM_FUNCTIONS = {torch.mean: "mean", torch.sum: "sum", torch.amax: "amax", torch.amin: "amin",
                 torch.softmax: "softmax", F.softmax: "softmax", torch.log_softmax: "log_softmax",
                 F.log_softmax: "log_softmax", torch.logsumexp: "logsumexp", torch.unsqueeze: "unsqueeze",
                 torch.squeeze: "squeeze"}
IN_PLACE_FUNCTIONS = {F.relu_, torch.relu_}
# Where `return_indices` sits among a pooling function's positional arguments.
RETURN_INDICES_POSITION = {F.max_pool1d: 6, F.max_pool2d: 6, F.max_pool3d: 6, F.adaptive_max_pool1d: 2,
                           F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 2}

# -- reading an op's arguments ----------------------------------------------------------------------------------------

REQUIRED = object()  # the default of an argument that `read_arguments` insists on


def read_arguments(args, kwargs, *spec) -> list:
    """Positional-or-keyword arguments by name: spec = (name, default), ...; a default of REQUIRED must be given."""
    values = []
    for i, (name, default) in enumerate(spec):
        if i < len(args):
            values.append(args[i])
        elif name in kwargs:
            values.append(kwargs[name])
        elif default is REQUIRED:
            raise Unsupported(f"missing argument '{name}'")
        else:
            values.append(default)
    return values


def bind_arguments(node: torch.fx.Node) -> dict | None:
    """A call node's arguments by parameter name, or None where its target's signature cannot be read or bound."""
    try:
        return dict(inspect.signature(node.target).bind(*node.args, **node.kwargs).arguments)
    except (TypeError, ValueError):
        return None


def nodes_in(arg) -> list[torch.fx.Node]:
    """The graph nodes in an argument, however nested in lists, tuples and dicts."""
    found = []
    torch.fx.node.map_arg(arg, found.append)
    return found
