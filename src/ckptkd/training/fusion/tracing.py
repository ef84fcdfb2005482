"""Tracing one member's forward, and telling whether two models are one architecture.

`self.training` used in forward is supported where it is the ``training=`` argument of a functional dropout (the
fused forward then reads the FusedModel's own flag at each call); a forward that branches on it is refused, as is
any forward `torch.fx.symbolic_trace` cannot trace."""

from __future__ import annotations

import torch
import torch.fx
from torch import nn

from .ops import TRAINING_ARGUMENT, Unsupported, bind_arguments


def trace(model: nn.Module) -> tuple[torch.fx.GraphModule, set[str]]:
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
        raise Unsupported(f"torch.fx cannot trace {type(model).__name__}.forward ({message})") from None
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
        if a.op == "call_function" and a.target in TRAINING_ARGUMENT:
            bound_a, bound_b = bind_arguments(a), bind_arguments(b)
            if bound_a is not None and bound_b is not None and bound_a.pop("training", None) is True \
                    and bound_b.pop("training", None) is False and _by_name(bound_a) == _by_name(bound_b):
                training_nodes.add(a.name)
                continue
        same = False
        break
    if not same:
        raise Unsupported(f"{type(model).__name__}.forward branches on self.training (beyond the training= "
                          "argument of a functional dropout), so train and eval mode are not one graph")
    if any(node.op == "call_function" and node.target in TRAINING_ARGUMENT and node.name not in training_nodes
           and bind_arguments(node) is None for node in train_nodes):
        raise Unsupported("a dropout call whose arguments the rewrite cannot read")
    return train, training_nodes


def _by_name(arg):
    """Arguments with each node replaced by its name, to compare two graphs' nodes."""
    return torch.fx.node.map_arg(arg, lambda node: ("node", node.name))


def architecture_difference(first: nn.Module, other: nn.Module, first_code: str, other_code: str) -> str | None:
    """What makes `other` another architecture than `first` (for a one-line refusal), or None where they are one.

    The code arguments are the models' traced forwards: a constructor argument may change forward and no tensor."""
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
    """Every parameter and buffer by name (shared ones under each name): shape, dtype, device, requires_grad, kind."""
    table = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        table[name] = (tuple(p.shape), p.dtype, p.device, p.requires_grad, "parameter")
    persistent = set(model.state_dict(keep_vars=True))
    for name, b in model.named_buffers(remove_duplicate=False):
        kind = "buffer" if name in persistent else "non-persistent buffer"
        table[name] = (tuple(b.shape), b.dtype, b.device, False, kind)
    return table
