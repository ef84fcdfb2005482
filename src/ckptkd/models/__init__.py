"""Model registry: built-in architectures and the user's own, all built through `create`.

Every built-in model returns logits from `model(x)`, exposes the representation just before the
final linear layer as `model.forward_features(x)` (shape [B, model.feature_dim]), and names that
final layer `model.classifier`, so `model(x) == model.classifier(model.forward_features(x))`.

The CIFAR distillation zoo (resnet*, wrn_*, vgg*, MobileNetV2 / mobile_half, ShuffleV1, ShuffleV2, ResNet50) keeps
the module names of RepDistiller / mdistiller, so their checkpoints load with `load_state_dict(sd, strict=True)`;
where their final layer is `fc` or `linear`, `classifier` is a property returning it (no extra state-dict keys).
"""

import inspect
from collections.abc import Callable

import torch
from torch import nn

from .. import memory
from ..errors import UserError

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

# Passed by `create` itself, so they are not "extra" keyword arguments of a model.
_STANDARD_ARGS = {"num_classes", "in_channels", "image_size"}


def register(name: str):
    """Decorator adding a model class or factory function under `name`."""

    def decorator(factory):
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorator


def available() -> list[str]:
    """Registered model names, sorted. `wrn_D_W` accepts any valid depth and width beyond those listed."""
    return sorted(_REGISTRY)


def accepted_kwargs(name: str) -> set[str] | None:
    """The extra keyword arguments model `name` takes, or None if its constructor takes **kwargs."""
    params = inspect.signature(_lookup(name)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return {
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in _STANDARD_ARGS
    }


def create(name: str, *, num_classes: int, in_channels: int = 3, image_size=None, **kw) -> nn.Module:
    """Build model `name`. `image_size` is an int or (H, W); it reaches only constructors that name it."""
    factory = _lookup(name)
    accepted = accepted_kwargs(name)
    if accepted is not None:
        for key in kw:
            if key not in accepted:
                takes = ", ".join(sorted(accepted)) or "no extra arguments"
                raise UserError(f"model '{name}' does not take '{key}' (it takes: {takes}; --set model.{key}=null "
                                f"removes it, --set 'model={{name: {name}}}' replaces the section)")
    if image_size is not None and "image_size" in inspect.signature(factory).parameters:
        kw["image_size"] = _as_hw(image_size)
    extra = {k: v for k, v in kw.items() if k != "image_size"}
    _check_size(name, factory, extra, num_classes=num_classes, in_channels=in_channels, **kw)
    try:
        model = factory(num_classes=num_classes, in_channels=in_channels, **kw)
    except (TypeError, ValueError, RuntimeError) as e:
        if not extra:
            raise  # no argument of the user's is at fault: a bug of the constructor's, shown whole
        # Constructor arguments come from the config (model.<key>); a value the constructor cannot use is bad input.
        args = ", ".join(f"model.{k}={v!r}" for k, v in extra.items())
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"model '{name}' cannot be built with {args}: {reason}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"model '{name}' did not build a torch.nn.Module (got {type(model).__name__})")
    return model


# Training holds each parameter about four times (weights, gradients, optimizer state, a checkpoint being written).
TRAINING_COPIES = 4


def _check_size(name: str, factory, extra: dict, **kw) -> None:
    """Build the model on the meta device first (shapes, no memory) and refuse one that could never be trained
    here, e.g. model.widths=[10**9], before its weights are allocated. A constructor that cannot build on meta is
    left to the real build."""
    try:
        with torch.device("meta"):
            shapes = factory(**kw)
        size = sum(t.numel() * t.element_size() for t in (*shapes.parameters(), *shapes.buffers()))
    except Exception:  # noqa: BLE001 - any failure here is met again, and named, by the real build
        return
    args = "".join(f" model.{k}={v!r}" for k, v in extra.items())
    memory.check_fits(f"model '{name}'{args and ' with' + args}", TRAINING_COPIES * size,
                      f"its {size / 2**30:,.1f} GiB of weights, held {TRAINING_COPIES} times in training,")


def from_spec(spec: dict) -> nn.Module:
    """A fresh model from a manifest's `model` entry (name, classes, channels, image size, constructor kwargs)."""
    return create(spec["name"], num_classes=spec["num_classes"], in_channels=spec["in_channels"],
                  image_size=tuple(spec["image_size"]) if spec.get("image_size") else None, **spec.get("kwargs", {}))


def _lookup(name: str):
    if name in _REGISTRY:
        return _REGISTRY[name]
    factory = wrn.factory_from_name(name)
    if factory is None:
        raise UserError(f"unknown model '{name}' (available: {', '.join(available())}, wrn_D_W)")
    return factory


def _as_hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 2:
        if all(isinstance(s, int) for s in image_size):
            return tuple(image_size)
    raise UserError(f"image_size must be an int or (H, W), got {image_size!r}")


# The architecture modules register themselves with the decorator above, so they are imported last.
from . import imagenet, mobilenetv2, resnet, resnet50, shufflenet, small, vgg, wrn  # noqa: E402, F401
