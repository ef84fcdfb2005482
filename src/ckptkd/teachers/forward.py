"""One forward pass for an ensemble of frozen models, batched across checkpoints of one architecture.

A snapshot ensemble is M checkpoints of the same network. Instead of M forwards one after another,
`EnsembleForward` stacks their weights and runs the network once under `torch.vmap`, so each layer
becomes one (grouped) kernel over all M models.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.func import functional_call, stack_module_state
from torch.nn.utils.fusion import fuse_conv_bn_eval


class EnsembleForward:
    """Runs M frozen models on one input batch and returns their logits stacked [M, B, C] (float32).

    Models whose class, parameter/buffer names, shapes, dtypes and devices, and `repr` all match form a
    group that runs as one vmapped forward; other models run one by one. The models are put in eval
    mode with `requires_grad` off (a teacher never trains); with `channels_last=True` they are also
    converted to channels_last in place.

    `batched` is True, False or "auto". "auto" runs groups batched when the input is on a CUDA device
    and one by one elsewhere. On CPU the batched forward lost to the loop: benchmarks/ensemble_forward.py
    (4 checkpoints, batch 128 of 3x32x32, 2 threads, torch 2.13) gave 0.40-0.46x the loop's images/s
    for both resnet20 and resnet56. vmap turns each conv into a grouped conv (slower on CPU than M
    plain convs) and adds reshapes and copies around every layer, while the loop it replaces costs
    little on CPU; on a GPU one launch per layer instead of M is what batching is for.

    The batched path works on a copy of the weights, stacked on its first use (and again after `to`):
    weights changed after that are not seen by it, so build a new `EnsembleForward` for new weights.
    If vmap fails for a group (an op without a batching rule, data-dependent control flow), that group
    runs one by one from then on and `fallback_reason` says why.

    `x` is one tensor that every model sees, or a list of M tensors, one per model (a group whose
    inputs differ in shape runs one by one for that call). `autocast_dtype` (e.g. torch.bfloat16)
    runs the forward under `torch.autocast` for the input's device type.
    The result is always float32, a normal tensor (not an inference tensor) without grad.
    """

    def __init__(self, models: list[nn.Module], *, batched: bool | str = "auto", channels_last: bool = False,
                 autocast_dtype: torch.dtype | None = None):
        if not models:
            raise ValueError("EnsembleForward needs at least one model")
        if batched not in (True, False, "auto"):
            raise ValueError(f"batched must be True, False or 'auto', got {batched!r}")
        self.models = list(models)
        self.batched = batched
        self.channels_last = channels_last
        self.autocast_dtype = autocast_dtype
        self.fallback_reason: str | None = None
        for model in self.models:
            model.eval()
            model.requires_grad_(False)
            if channels_last:
                # Stacking keeps each model's layout, so the vmapped weights are channels_last too.
                model.to(memory_format=torch.channels_last)
        self._groups = _group_by_architecture(self.models)
        self._looped: set[int] = set()  # indices into self._groups whose vmap failed
        self._stacked: dict[int, tuple[dict, dict]] = {}

    @property
    def groups(self) -> list[list[int]]:
        """Indices of the models that run batched together, in order of each group's first model."""
        return [list(g) for g in self._groups]

    def to(self, device) -> "EnsembleForward":
        for model in self.models:
            model.to(device)
        self._stacked.clear()
        return self

    def __call__(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        per_model = isinstance(x, (list, tuple))
        if per_model and len(x) != len(self.models):
            raise ValueError(f"got {len(x)} inputs for {len(self.models)} models")
        inputs = [self._layout(t) for t in x] if per_model else [self._layout(x)] * len(self.models)
        device_type = inputs[0].device.type
        batched = device_type == "cuda" if self.batched == "auto" else self.batched
        autocast = (torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
                    if self.autocast_dtype is not None else contextlib.nullcontext())

        logits: list[torch.Tensor | None] = [None] * len(self.models)
        with torch.inference_mode(), autocast:
            for g, group in enumerate(self._groups):
                group_inputs = [inputs[i] for i in group]
                if batched and len(group) > 1 and g not in self._looped and _same_shape(group_inputs):
                    outs = self._run_batched(g, group, group_inputs, per_model)
                else:
                    outs = [self.models[i](t) for i, t in zip(group, group_inputs)]
                for i, out in zip(group, outs):
                    logits[i] = out
        # Stacking outside inference mode makes a normal tensor, usable as a constant in autograd graphs.
        return torch.stack(logits).float()

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _run_batched(self, g: int, group: list[int], inputs: list[torch.Tensor], per_model: bool):
        base = self.models[group[0]]
        if g not in self._stacked:
            self._stacked[g] = stack_module_state([self.models[i] for i in group])
        params, buffers = self._stacked[g]

        def forward(p, b, x):
            return functional_call(base, (p, b), (x,))

        try:
            if per_model:
                return torch.vmap(forward, in_dims=(0, 0, 0))(params, buffers, torch.stack(inputs))
            return torch.vmap(forward, in_dims=(0, 0, None))(params, buffers, inputs[0])
        except Exception as vmap_error:
            # An error the loop raises too lies with the input, not with vmap: let it propagate,
            # and keep the group batched.
            outs = [self.models[i](t) for i, t in zip(group, inputs)]
            self._looped.add(g)
            del self._stacked[g]
            reason = (f"group {group} ({type(base).__name__}) runs one by one: "
                      f"{type(vmap_error).__name__}: {vmap_error}")
            self.fallback_reason = reason if self.fallback_reason is None else f"{self.fallback_reason}; {reason}"
            return outs


def _group_by_architecture(models: list[nn.Module]) -> list[list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, model in enumerate(models):
        groups.setdefault(_architecture_key(model), []).append(i)
    return list(groups.values())


def _architecture_key(model: nn.Module) -> tuple:
    # Every tensor that functional_call swaps in must stack with its counterparts, and `repr` catches
    # configuration that has no tensor (strides, activations, dropout rates).
    tensors = tuple((name, tuple(t.shape), t.dtype, t.device)
                    for name, t in (*model.named_parameters(), *model.named_buffers()))
    return type(model), repr(model), tensors


def _same_shape(tensors: list[torch.Tensor]) -> bool:
    return all(t.shape == tensors[0].shape for t in tensors)


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm2d that directly follows a Conv2d into that conv's weights, in place; returns how many.

    A frozen model's BatchNorm is a fixed per-channel affine map, so `conv -> bn` equals one conv with a bias. On a CPU
    this saves a full pass over every activation map: a resnet20 on 8x8 inputs ran 1.6x faster folded (with
    channels-last). Only pairs where the conv feeds nothing but the bn, and each module is called once, are folded;
    a model that torch.fx cannot trace is left as it is. The model must be in eval mode.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow or an untraceable op: keep the model unfolded
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0] if node.args else None
        if not (isinstance(source, torch.fx.Node) and source.op == "call_module"
                and isinstance(modules.get(source.target), nn.Conv2d)):
            continue
        bn, conv = modules[node.target], modules[source.target]
        if (len(source.users) != 1 or calls[source.target] != 1 or calls[node.target] != 1 or bn.training
                or bn.running_mean is None or conv.padding_mode != "zeros"):
            continue
        _replace(model, source.target, fuse_conv_bn_eval(conv, bn))
        _replace(model, node.target, nn.Identity())
        folded += 1
    return folded


def _replace(model: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, name, module)
