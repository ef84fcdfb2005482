"""The fused model: `fuse(models)` builds a `FusedModel`, `fusable(model)` says beforehand whether it can.

The semantics, member by member, in detail:

- forward: BatchNorm uses each member's own batch statistics and updates each member's own running statistics with
  the layer's momentum and eps; `num_batches_tracked` is counted per member. Dropout draws other random masks than N
  separate models would (same distribution).
- gradients: for a loss that is the SUM over members of each member's own loss, e.g.
  ``N * kd_loss(out.flatten(0, 1), ...)`` for a batch-mean loss (a mean over N*B samples is 1/N of the sum of the N
  member means), the gradient of every fused parameter, sliced at member i, equals member i's separate gradient.
  A fused parameter is stored as ``[N, *shape]``, so an element-wise optimizer over `FusedModel.parameters()` (SGD
  with momentum / Nesterov / weight decay, Adam, AdamW) gives each member exactly the update of its own optimizer.
  A mean over members instead of the sum divides each member's gradient by N.

Speed (`ckptkd bench --workload fused`, benchmarks/README.md): small models fused train several times faster than one
after another; on a CPU wide convolutions (resnet20 on 3x32x32: 0.76x) are faster apart, which
`ckptkd.training.engines.choose_engine` decides per model.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ...errors import UserError
from .modules import FUSED_LAYERS, FusedBatchNorm, stacked_parameter
from .ops import Unsupported
from .rewrite import Rewriter
from .tracing import architecture_difference, trace


# Attributes FusedModel sets on itself; a model with a top-level attribute of one of these names (or of one of
# FusedModel's methods) cannot keep its names in the fused model.
_RESERVED = ("num_members", "_graph", "_forward", "_member_keys")


def _plan(model: nn.Module, n: int, channels_last: bool = False):
    """Trace and rewrite (without touching weights): what fusable() checks and fuse() builds from."""
    if not isinstance(model, nn.Module):
        raise Unsupported(f"not a torch.nn.Module ({type(model).__name__})")
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    if len(names) != len(set(id(p) for p in model.parameters())):
        raise Unsupported("the model shares (ties) a parameter between layers; stacking would untie it")
    top_level = {key.split(".")[0] for key in model.state_dict()} | set(dict(model.named_children()))
    taken = sorted(name for name in top_level if name in _RESERVED or hasattr(FusedModel, name))
    if taken:
        raise Unsupported(f"the model has a top-level attribute '{taken[0]}', a name FusedModel uses itself")
    traced, training_nodes = trace(model)
    rewriter = Rewriter(traced, n, training_nodes, channels_last)
    return traced, rewriter, rewriter.run()


def fusable(model: nn.Module) -> tuple[bool, str]:
    """Whether `fuse` can rewrite this architecture: (True, "") or (False, a one-line reason).

    Only the architecture is checked (tracing and the op rewrite); `fuse` also checks that its models agree."""
    try:
        _plan(model, 2)
    except Unsupported as error:
        return False, str(error)
    return True, ""


class FusedModel(nn.Module):
    """N models of one architecture computed as one (see the package docstring). Build it with `fuse(models)`.

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
        except Unsupported as error:
            raise UserError(f"cannot fuse {type(models[0]).__name__}: {error}") from None
        first_code = traced.code
        for i, model in enumerate(models[1:], start=1):
            try:
                other_code = trace(model)[0].code if type(model) is type(models[0]) else ""
            except Unsupported as error:
                raise UserError(f"cannot fuse: model {i}: {error}") from None
            difference = architecture_difference(models[0], model, first_code, other_code)
            if difference is not None:
                raise UserError(f"cannot fuse models of different architectures: model {i} differs from model 0 "
                                f"in {difference}")
        self.num_members = len(models)
        self._member_keys = list(models[0].state_dict().keys())
        self._build_modules(models, rewriter)
        self._check_counters()
        self._graph = graph
        self._compile()
        self.train(models[0].training)

    # -- building ----------------------------------------------------------------------------------------------

    def _build_modules(self, models, rewriter):
        # Fused and stateless layers where the graph calls them ...
        for target, kind in rewriter.module_kinds.items():
            if kind == "fused":
                layers = [m.get_submodule(target) for m in models]
                module = FUSED_LAYERS[type(layers[0])](layers)
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
                _container(self, path).register_parameter(attr, stacked_parameter(tensors))
        for name, _ in models[0].named_buffers():
            if name not in done:
                *path, attr = name.split(".")
                stacked = torch.stack([m.get_buffer(name).detach() for m in models])
                _container(self, path).register_buffer(attr, stacked, persistent=name in persistent)
        # Constant tensors the trace lifted out of forward (the same in every member): plain attributes.
        for target, value in rewriter.constants.items():
            *path, attr = target.split(".")
            setattr(_container(self, path), attr, value)
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
        exec(compile(code.src, f"<ckptkd.training.fusion:{len(self._graph.nodes)} nodes>", "exec"), namespace)
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
    """The submodule of `root` at `path` (names of registered submodules), each missing one made an empty nn.Module,
    for a layer or tensor of the original model to go under its original name."""
    module = root
    for name in path:
        child = dict(module.named_children()).get(name)
        if child is None:
            child = nn.Module()
            module.add_module(name, child)
        module = child
    return module


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    """Register `module` at the dotted path `target` of `root`."""
    *path, name = target.split(".")
    _container(root, path).add_module(name, module)
