"""The graph rewrite: one member's traced forward, node by node, into a forward that computes all N members.

Each member tensor of the new graph is held in one of the two layouts of `layouts`; each handler maps one node of
the traced graph, choosing the layout of its result, and a tensor is converted only where an op needs the other
layout. What the handlers accept is listed in `ops`; anything else raises `Unsupported` with the reason, naming the
op and the layer it was called in."""

from __future__ import annotations

import builtins
import inspect
import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .layouts import (CHANNEL_STACKED, CONSTANT, MEMBER_FIRST, VALUE, beyond_channels, cat_channels, check_members,
                      getitem_member_first, match_rank, reshape_member_first, shift_dim, to_channel_stacked,
                      to_member_first)
from .modules import FUSED_LAYERS, linear_member_first
from .ops import (BATCH_NORMS, CHANNELWISE_FUNCTIONS, CHANNELWISE_MODULES, DIM_FUNCTIONS, DIM_METHODS,
                  ELEMENTWISE_FUNCTIONS, ELEMENTWISE_METHODS, ELEMENTWISE_MODULES, IN_PLACE_FUNCTIONS, REQUIRED,
                  RETURN_INDICES_POSITION, SUPPORTED_MODULES, TRAINING_ARGUMENT, Unsupported, bind_arguments, called_in,
                  nodes_in, op_name, read_arguments)


class Rewriter:
    """Builds the fused graph from a traced member, node by node (`run`).

    `env` maps each node of the traced graph to (its value in the new graph, layout). `handlers` holds the handler
    for each op a node can have; a handler maps one node and decides the layout of its result, and `_as` converts
    member tensors between layouts where an op needs it. After `run`, `module_kinds` and `constants` say which
    submodules and constants the fused model must hold for the new graph to run."""

    def __init__(self, traced: torch.fx.GraphModule, n: int, training_nodes: set[str], channels_last: bool):
        self.traced, self.n, self.channels_last = traced, n, channels_last
        self.modules = dict(traced.named_modules())
        self.member_tensors = {name for name, _ in traced.named_parameters()} | {
            name for name, _ in traced.named_buffers()}
        self.training_nodes = training_nodes  # dropout calls whose training= argument is self.training
        self.graph = torch.fx.Graph()
        self.env: dict[torch.fx.Node, tuple] = {}
        self.module_kinds: dict[str, str] = {}  # call_module target -> "fused" | "stateless"
        self.constants: dict[str, object] = {}  # get_attr targets that are not a member's tensor: their values
        self._views: dict[tuple, torch.fx.Node] = {}  # C -> F views: alias their source, so always reusable
        self._copies: dict[tuple, torch.fx.Node] = {}  # F -> C copies: reusable until an in-place op runs
        self._training_flag = None
        self._first_input = True
        # Every op a torch.fx node can have, and the handler that maps such a node (its value and its layout).
        self.handlers = {
            "placeholder": self._placeholder,
            "get_attr": self._get_attr,
            "call_module": self._call_module,
            "call_function": self._call_function,
            "call_method": self._call_method,
            "output": self._output,
        }

    # -- layouts ------------------------------------------------------------------------------------------------

    def _as(self, node: torch.fx.Node, layout: str) -> torch.fx.Node:
        new, have = self.env[node]
        if have == layout:
            return new
        if have not in (MEMBER_FIRST, CHANNEL_STACKED):
            raise Unsupported(f"'{node.name}' is not a tensor of each member where one is needed{called_in(node)}")
        if layout == MEMBER_FIRST:
            key = (node, layout)
            if key not in self._views:
                self._views[key] = self.graph.call_function(to_member_first, (new, self.n))
            return self._views[key]
        key = (node, layout)
        if key not in self._copies:
            self._copies[key] = self.graph.call_function(to_channel_stacked, (new, self.channels_last))
        return self._copies[key]

    def _value(self, arg):
        """Map a non-member argument (numbers, shapes, dtypes, nested lists of them) into the new graph."""
        def convert(node):
            new, layout = self.env[node]
            if layout in (MEMBER_FIRST, CHANNEL_STACKED):
                raise Unsupported(f"a member tensor ('{node.name}') passed where the rewrite expects a constant "
                                  f"(an argument it does not know how to fuse){called_in(node)}")
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
        """The fused graph; raises Unsupported, with the reason, at the first node it cannot map."""
        for node in self.traced.graph.nodes:
            handler = self.handlers.get(node.op)
            if handler is None:
                raise Unsupported(f"a graph node '{node.name}' of op '{node.op}', which the rewrite does not know"
                                  f"{called_in(node)}")
            self.env[node] = handler(node)
        return self.graph

    def _placeholder(self, node):
        default = node.args[0] if node.args else inspect.Signature.empty
        new = self.graph.placeholder(node.name, default_value=default)
        if self._first_input:  # x: [N, B, ...], each member's batch
            self._first_input = False
            return self.graph.call_function(check_members, (new, self.n)), MEMBER_FIRST
        return new, VALUE  # further inputs are passed through, the same for all members

    def _get_attr(self, node):
        new = self.graph.get_attr(node.target)
        if node.target in self.member_tensors:
            return new, MEMBER_FIRST  # a parameter or buffer read in forward: stored [N, *shape]
        module_path, _, name = node.target.rpartition(".")
        value = getattr(self.traced.get_submodule(module_path), name)
        self.constants[node.target] = value
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
            raise Unsupported(f"{where} is called with other than one member tensor")
        if kind in FUSED_LAYERS:
            self._check_layer(module, where)
            self.module_kinds[node.target] = "fused"
            layout = MEMBER_FIRST if kind is nn.Linear else CHANNEL_STACKED
            return self._emit("call_module", node.target, [self._as(x, layout)], {}, layout)
        if kind in ELEMENTWISE_MODULES:
            self.module_kinds[node.target] = "stateless"
            if getattr(module, "inplace", False):
                self._copies.clear()
            return self._emit("call_module", node.target, [self.env[x][0]], {}, self.env[x][1])
        if kind in CHANNELWISE_MODULES:
            if getattr(module, "return_indices", False):
                raise Unsupported(f"{where} returns indices")
            self.module_kinds[node.target] = "stateless"
            return self._emit("call_module", node.target, [self._as(x, CHANNEL_STACKED)], {}, CHANNEL_STACKED)
        if kind is nn.Flatten:
            return self._flatten(x, module.start_dim, module.end_dim)
        if kind in (nn.Softmax, nn.LogSoftmax):
            if module.dim is None:
                raise Unsupported(f"{where} has no dim")
            name = "softmax" if kind is nn.Softmax else "log_softmax"
            return self._dim_op(node, name, x, module.dim, [], {})
        raise Unsupported(f"{where}: no fused form of this layer (supported: "
                          f"{', '.join(sorted(m.__name__ for m in SUPPORTED_MODULES))})")

    @staticmethod
    def _check_layer(module, where):
        # FusedBatchNorm keeps running statistics only where track_running_stats says there are some.
        if isinstance(module, BATCH_NORMS) and not module.track_running_stats and module.running_mean is not None:
            raise Unsupported(f"{where}: BatchNorm with running stats but track_running_stats=False")

    # -- functions and methods ----------------------------------------------------------------------------------

    def _call_function(self, node):
        target = node.target
        args, kwargs = node.args, node.kwargs
        if target is operator.getitem:
            return self._getitem(node)
        if target is builtins.getattr:
            return self._getattr(node, args[0], args[1])
        if not any(self._is_member(a) for a in nodes_in((args, kwargs))):
            # No member tensor in: shape arithmetic and python math stay values; anything else (torch.zeros(...),
            # a constant tensor op) is a constant tensor, the same for every member.
            if any(self._layout(a) == CONSTANT for a in nodes_in((args, kwargs))):
                raise Unsupported(f"{op_name(target)} of constant tensors{called_in(node)}")
            python = getattr(target, "__module__", None) in ("_operator", "operator", "builtins", "math")
            return self._emit("call_function", target, self._value(args), self._value(kwargs),
                              VALUE if python else CONSTANT)
        if target in TRAINING_ARGUMENT and node.name in self.training_nodes:
            # `training=self.training` was traced as a constant: read the FusedModel's flag at each call instead.
            bound, flag = bind_arguments(node), self._training()  # the flag's node first: the call reads it
            new, layout = self._call_function_plain(node, target, (bound.pop("input"),), bound)
            new.update_kwarg("training", flag)
            return new, layout
        return self._call_function_plain(node, target, args, kwargs)

    def _call_function_plain(self, node, target, args, kwargs):
        if target in ELEMENTWISE_FUNCTIONS:
            in_place = target in IN_PLACE_FUNCTIONS or kwargs.get("inplace") is True
            return self._elementwise(node, "call_function", target, args, kwargs, in_place)
        if target in CHANNELWISE_FUNCTIONS:
            position = RETURN_INDICES_POSITION.get(target)
            if kwargs.get("return_indices") or (position is not None and len(args) > position and args[position]):
                raise Unsupported(f"{op_name(target)} with return_indices{called_in(node)}")
            x = self._as(args[0], CHANNEL_STACKED)
            return self._emit("call_function", target, [x, *self._value(args[1:])], self._value(kwargs),
                              CHANNEL_STACKED)
        if target in DIM_FUNCTIONS:
            return self._dim_call(node, DIM_FUNCTIONS[target], args, kwargs)
        if target is torch.flatten:
            return self._flatten(args[0], *read_arguments(args[1:], kwargs, ("start_dim", 0), ("end_dim", -1)))
        if target in (torch.cat, torch.concat, torch.concatenate, torch.stack):
            return self._cat(node, target, args, kwargs)
        if target in (torch.transpose, torch.swapaxes):
            return self._transpose(args[0], *read_arguments(args[1:], kwargs, ("dim0", REQUIRED), ("dim1", REQUIRED)))
        if target is torch.permute:
            return self._permute(args[0], args[1] if len(args) > 1 else kwargs["dims"])
        if target is torch.reshape:
            return self._reshape(args[0], args[1:] or (kwargs["shape"],))
        if target is F.linear:
            return self._functional_linear(node)
        raise Unsupported(f"{op_name(target)}{called_in(node)}: not an op the fused rewrite knows")

    def _call_method(self, node):
        name, (x, *rest), kwargs = node.target, node.args, node.kwargs
        if not self._is_member(x):
            if self._layout(x) == CONSTANT or any(self._is_member(a) for a in nodes_in((rest, kwargs))):
                raise Unsupported(f"Tensor.{name} of a constant tensor{called_in(node)}")
            return self._emit("call_method", name, self._value(node.args), self._value(kwargs), VALUE)
        if name in ELEMENTWISE_METHODS:
            return self._elementwise(node, "call_method", name, node.args, kwargs, in_place=name.endswith("_"))
        if name in DIM_METHODS:
            return self._dim_call(node, name, node.args, kwargs)
        if name == "flatten":
            return self._flatten(x, *read_arguments(rest, kwargs, ("start_dim", 0), ("end_dim", -1)))
        if name == "unflatten":
            dim, sizes = read_arguments(rest, kwargs, ("dim", REQUIRED), ("sizes", REQUIRED))
            if self._layout(x) == CHANNEL_STACKED and beyond_channels(dim):
                return self._emit("call_method", name, [self.env[x][0], dim, self._value(sizes)], {},
                                  CHANNEL_STACKED)
            return self._emit("call_method", name, [self._as(x, MEMBER_FIRST), shift_dim(dim), self._value(sizes)],
                              {}, MEMBER_FIRST)
        if name in ("transpose", "swapaxes"):
            return self._transpose(x, *read_arguments(rest, kwargs, ("dim0", REQUIRED), ("dim1", REQUIRED)))
        if name == "permute":
            dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest or kwargs["dims"]
            return self._permute(x, dims)
        if name in ("view", "reshape"):
            return self._reshape(x, rest or (kwargs.get("size", kwargs.get("shape")),))
        if name == "size":
            x_f = self._as(x, MEMBER_FIRST)
            if rest or kwargs:
                (dim,) = read_arguments(rest, kwargs, ("dim", REQUIRED))
                return self._emit("call_method", "size", [x_f, shift_dim(dim)], {}, VALUE)
            size = self.graph.call_method("size", (x_f,))
            return self._emit("call_function", operator.getitem, [size, slice(1, None)], {}, VALUE)
        if name in ("dim", "ndimension"):
            rank = self.graph.call_method("dim", (self._as(x, MEMBER_FIRST),))
            return self._emit("call_function", operator.sub, [rank, 1], {}, VALUE)
        raise Unsupported(f"Tensor.{name}{called_in(node)}: not an op the fused rewrite knows")

    # -- handlers -----------------------------------------------------------------------------------------------

    def _training(self):
        if self._training_flag is None:  # `self.training` of the FusedModel, read at each call
            self._training_flag = self.graph.get_attr("training")
        return self._training_flag

    def _elementwise(self, node, op, target, args, kwargs, in_place):
        members = [a for a in nodes_in((args, kwargs)) if self._is_member(a)]
        has_constant = any(self._layout(a) == CONSTANT for a in nodes_in((args, kwargs)))
        if in_place:
            # The result aliases the first operand, so it keeps that layout; F -> C copies made earlier would no
            # longer hold its values.
            layout = self._layout(args[0])
            if layout not in (MEMBER_FIRST, CHANNEL_STACKED):
                raise Unsupported(f"in-place {op_name(target)} on a non-member tensor{called_in(node)}")
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
                    converted[m] = self.graph.call_function(match_rank, (converted[m], *others))

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
            raise Unsupported(f"{name} without a dim (over all elements, so over the batch){called_in(node)}")
        return self._dim_op(node, name, x, dim, rest, kwargs)

    def _dim_op(self, node, name, x, dim, rest, kwargs):
        if isinstance(dim, torch.fx.Node):
            raise Unsupported(f"{name} over a dim computed at run time{called_in(node)}")
        if self._layout(x) == CHANNEL_STACKED and beyond_channels(dim):
            return self._emit("call_method", name, [self.env[x][0], dim, *self._value(rest)], self._value(kwargs),
                              CHANNEL_STACKED)
        return self._emit("call_method", name, [self._as(x, MEMBER_FIRST), shift_dim(dim), *self._value(rest)],
                          self._value(kwargs), MEMBER_FIRST)

    def _flatten(self, x, start_dim, end_dim):
        if self._layout(x) == CHANNEL_STACKED and isinstance(start_dim, int) and start_dim >= 1:
            # [B, N*C, H, W] flattened from dim 1 is [B, N*C*H*W] with member i's values in block i: C layout of
            # the flattened tensor, no copy beyond the original's.
            return self._emit("call_method", "flatten", [self.env[x][0], start_dim, end_dim], {}, CHANNEL_STACKED)
        return self._emit("call_method", "flatten",
                          [self._as(x, MEMBER_FIRST), shift_dim(start_dim), shift_dim(end_dim)], {}, MEMBER_FIRST)

    def _transpose(self, x, dim0, dim1):
        if self._layout(x) == CHANNEL_STACKED and beyond_channels((dim0, dim1)):
            return self._emit("call_method", "transpose", [self.env[x][0], dim0, dim1], {}, CHANNEL_STACKED)
        return self._emit("call_method", "transpose", [self._as(x, MEMBER_FIRST), shift_dim(dim0), shift_dim(dim1)], {},
                          MEMBER_FIRST)

    def _permute(self, x, dims):
        return self._emit("call_method", "permute", [self._as(x, MEMBER_FIRST), [0, *shift_dim(list(dims))]], {},
                          MEMBER_FIRST)

    def _reshape(self, x, sizes):
        return self._emit("call_function", reshape_member_first,
                          [self._as(x, MEMBER_FIRST), self.n, *self._value(list(sizes))], {}, MEMBER_FIRST)

    def _cat(self, node, target, args, kwargs):
        tensors, dim = read_arguments(args, kwargs, ("tensors", REQUIRED), ("dim", 0))
        if not isinstance(tensors, (list, tuple)) or not all(self._is_member(t) for t in tensors):
            raise Unsupported(f"{op_name(target)} of other than member tensors{called_in(node)}")
        if isinstance(dim, torch.fx.Node):
            raise Unsupported(f"{op_name(target)} over a dim computed at run time{called_in(node)}")
        if target is not torch.stack and all(self._layout(t) == CHANNEL_STACKED for t in tensors):
            if dim == 1:  # channel concatenation (ShuffleNet, DenseNet-like): stays C
                return self._emit("call_function", cat_channels, [[self.env[t][0] for t in tensors], self.n], {},
                                  CHANNEL_STACKED)
            if beyond_channels(dim):
                return self._emit("call_function", torch.cat, [[self.env[t][0] for t in tensors], dim], {},
                                  CHANNEL_STACKED)
        return self._emit("call_function", target, [[self._as(t, MEMBER_FIRST) for t in tensors], shift_dim(dim)], {},
                          MEMBER_FIRST)

    def _getitem(self, node):
        x, index = node.args
        if not self._is_member(x):
            return self._emit("call_function", operator.getitem, [self.env[x][0], self._value(index)], {},
                              self._layout(x))
        return self._emit("call_function", getitem_member_first, [self._as(x, MEMBER_FIRST), self._value(index)],
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
        raise Unsupported(f"Tensor attribute '{attr}'{called_in(node)}")

    def _functional_linear(self, node):
        x, weight, bias = read_arguments(node.args, node.kwargs, ("input", REQUIRED), ("weight", REQUIRED),
                                         ("bias", None))
        for t in (weight, bias):
            if t is not None and not (isinstance(t, torch.fx.Node) and t.op == "get_attr"
                                      and t.target in self.member_tensors):
                raise Unsupported(f"F.linear with a weight that is not a parameter of the model{called_in(node)}")
        bias_new = None if bias is None else self.env[bias][0]
        return self._emit("call_function", linear_member_first, [self._as(x, MEMBER_FIRST), self.env[weight][0],
                                                                  bias_new], {}, MEMBER_FIRST)
