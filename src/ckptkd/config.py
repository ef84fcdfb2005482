"""YAML configs: defaults, dotted-path overrides and validation up front.

Every problem is reported as one line naming the field (`config: schedule.epochs must be an integer >= 1, got -5`),
before any work starts. The resolved config (every default filled in) is what a run saves and what identifies it.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError

DEFAULTS: dict[str, Any] = {
    "name": "run",
    "seed": 0,
    "device": "auto",
    "precision": "fp32",
    "deterministic": False,
    "compile": False,
    "data": {
        "name": "digits",
        "root": None,
        "val_fraction": 0.1,
        "split_seed": 0,
        "subset": None,
        "label_noise": 0.0,
        "batch_size": 128,
        "eval_batch_size": 512,
        "augment": True,
        "pad": None,
        "hflip": None,
        "mean": None,
        "std": None,
        "resident": "auto",
        "image_size": None,
        "resize": None,
        "scale": [0.08, 1.0],
        "workers": None,
    },
    "model": {"name": "resnet8", "num_classes": None, "in_channels": None},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5.0e-4,
              "betas": [0.9, 0.999], "accumulate": 1, "ema": 0.0},
    "schedule": {"name": "multistep", "epochs": 60, "milestones": [0.5, 0.75], "step_size": 30, "gamma": 0.1,
                 "cycles": 5, "min_lr": 0.0, "warmup_epochs": 0},
    "checkpoints": {"fractions": [0.3, 0.5, 0.7, 1.0], "every": None, "epochs": []},
    "kd": {"teachers": [], "temperature": 4.0, "alpha": 0.1, "ensemble": "probs", "cache": "auto", "views": 32,
           "cache_dir": None, "channels_last": "auto", "autocast": "auto", "teacher_mode": "eval"},
    "eval": {"last_k": 5, "best_of_last": 0},
    "log": {"progress": "auto", "tensorboard": "auto", "report_to": []},
}

# Keys under `model` beyond these are passed to the model's constructor and checked against its signature.
MODEL_FIXED_KEYS = {"name", "num_classes", "in_channels"}


# Bounds a YAML text must stay within before anything reads what it says: a config is a few hundred values, so
# these refuse only what would otherwise exhaust the machine ("billion laughs" aliases, thousands of nested levels)
# or overflow later (a seed or size beyond 64 bits, a number that is not finite).
MAX_VALUES = 100_000   # values once every alias is expanded
MAX_DEPTH = 64         # nested mappings and lists
INT_LIMIT = 2 ** 63    # |int| below this: torch's seeds and sizes are 64-bit signed
_MERGE = "tag:yaml.org,2002:merge"


def _refuse(problem: str, node_or_mark) -> yaml.constructor.ConstructorError:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return yaml.constructor.ConstructorError(None, None, problem, mark)


class _Loader(yaml.SafeLoader):
    """YAML's safe loader (no tag builds an object), reading `1e-3` as the number it is — YAML 1.1, which PyYAML
    implements, makes a float need a dot (`1.0e-3`), so a learning rate written the usual way came back a string —
    and refusing, before anything is built, what YAML allows but a config never needs: a key given twice in one
    mapping (YAML keeps the last silently), nesting deeper than MAX_DEPTH, aliases that expand past MAX_VALUES
    values or into themselves, integers of 64 bits or more, and numbers that are not finite."""

    _depth = 0

    def compose_node(self, parent, index):
        # The composer recurses once per level: counting here refuses deep nesting before Python's stack runs out.
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _refuse(f"nested deeper than {MAX_DEPTH} levels", self.peek_event())
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_document(self, node):
        _expanded_size(node)
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:  # this mapping's own keys: a merged (`<<: *base`) key may be overridden
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                    key = self.construct_object(key_node)
                    if key in seen:
                        raise _refuse(f"duplicate key {key!r} (first at line {seen[key] + 1}): YAML would keep "
                                      "only the last", key_node)
                    seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        digits = node.value.lstrip("+-").replace("_", "")
        if len(digits) > 30:  # before int() converts it: thousands of digits take time and raise ValueError
            raise _refuse(f"integer of {len(digits)} digits (at most 2**63 - 1)", node)
        value = super().construct_yaml_int(node)
        if abs(value) >= INT_LIMIT:
            raise _refuse(f"integer {value} does not fit in 64 bits (at most 2**63 - 1)", node)
        return value

    def construct_yaml_float(self, node):
        value = super().construct_yaml_float(node)
        if not math.isfinite(value):
            raise _refuse(f"{node.value!r} is not a finite number", node)
        return value


def _expanded_size(root) -> int:
    """How many values `root` is once its aliases are expanded (an alias is the same node object again), counted
    once per distinct node, so a text of kilobytes that expands to gigabytes is refused in microseconds."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise _refuse("an alias refers to the node that contains it", node)
        open_nodes.add(key)
        children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                    else node.value if isinstance(node, yaml.SequenceNode) else [])
        total = 1 + sum(size(child) for child in children)
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise _refuse(f"expands to more than {MAX_VALUES:,} values (aliases repeated inside aliases?)", root)
        sizes[key] = total
        return total

    return size(root)


class _Dumper(yaml.SafeDumper):
    """Quotes a string that `_Loader` would read as a number (a run named `1e3`), so a saved config reads back."""


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)
_Loader.add_constructor("tag:yaml.org,2002:float", _Loader.construct_yaml_float)
for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))


def load_yaml(text_: str) -> Any:
    return yaml.load(text_, Loader=_Loader)  # noqa: S506 -- _Loader is a SafeLoader


Check = Callable[[Any], str | None]  # returns a description of what was expected, or None when the value is fine


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float))) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, nullable: bool = False) -> Check:
    def check(v):
        if v is None and nullable:
            return None
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = f" >= {lo}" if lo is not None else ""
            bounds += f" and <= {hi}" if hi is not None else ""
            return f"an integer{bounds}" + (" or null" if nullable else "")
        return None
    return check


MAX_EPOCHS = 100_000  # schedule.epochs; an imported trajectory is held to it too
# ImageNet-21k has 21,841: a data set with more labels is a corrupt file, and a wider head (model.num_classes) only
# makes logits no batch can hold (12.7 M classes: 26 GB for one evaluation batch)
MAX_CLASSES = 100_000
# Seeds are mixed into derived seeds (seed * 1_000_003 + epoch * 7_919 for an epoch's order, 1000 * seed + k for the
# estimators' splits) that torch takes as 64-bit integers: a 31-bit seed keeps every one of them in range.
MAX_SEED = 2 ** 31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # weights and losses are float32: a larger setting overflows in the first step


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, nullable: bool = False) -> Check:
    def check(v):
        if v is None and nullable:
            return None
        if _is_num(v) and v == v and FLOAT32_MAX < abs(v) and hi is None:
            return f"a number within float32's range (|x| <= {FLOAT32_MAX:.3g})"
        ok = _is_num(v) and v == v and abs(v) != float("inf")
        if ok and lo is not None:
            ok = v > lo if lo_open else v >= lo
        if ok and hi is not None:
            ok = v <= hi
        if not ok:
            parts = []
            if lo is not None:
                parts.append(f"{'>' if lo_open else '>='} {lo}")
            if hi is not None:
                parts.append(f"<= {hi}")
            return "a number" + (" " + " and ".join(parts) if parts else "") + (" or null" if nullable else "")
        return None
    return check


def boolean(nullable: bool = False) -> Check:
    return lambda v: None if isinstance(v, bool) or (v is None and nullable) else "true or false" + (" or null" if nullable else "")


def one_of(*choices: Any) -> Check:
    return lambda v: None if v in choices else "one of " + ", ".join(map(str, choices))


def text(nullable: bool = False, pattern: str | None = None) -> Check:
    def check(v):
        if v is None and nullable:
            return None
        if not isinstance(v, str) or not v or (pattern and not re.fullmatch(pattern, v)):
            return "a non-empty string" + (f" matching {pattern}" if pattern else "") + (" or null" if nullable else "")
        return None
    return check


def list_of(item: Check, nullable: bool = False, min_len: int = 0) -> Check:
    def check(v):
        if v is None and nullable:
            return None
        if not isinstance(v, list) or len(v) < min_len or any(item(x) is not None for x in v):
            example = item(object())  # what one item must be
            wanted = f"a list whose items are each {example}" + (f" (at least {min_len})" if min_len else "")
            if isinstance(v, list):  # name the first item at fault, not only the whole list
                bad = next((i for i, x in enumerate(v) if item(x) is not None), None)
                if bad is not None:
                    wanted += f"; item {bad} ({v[bad]!r}) is not"
            return wanted
        return None
    return check


def device_name(v: Any) -> str | None:
    if isinstance(v, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
        return None
    return "auto, cpu, cuda, cuda:N or mps"


def milestone(v: Any) -> str | None:
    # An integer is an epoch; a float below 1 a fraction of training, so `--set schedule.epochs=5` keeps its shape.
    if _is_int(v) and v >= 1 or isinstance(v, float) and 0.0 < v < 1.0:
        return None
    return "an epoch (integer >= 1) or a fraction of training (0 < x < 1)"


# Options added after studies were run with this code, each at the value that reproduces what ran before them. At
# that value they are left out of a task's identity (`identity`), so a study begun before an option existed resumes
# instead of starting again under new task names.
NEUTRAL: dict[str, Any] = {"kd.teacher_mode": "eval", "log.report_to": [], "optim.accumulate": 1,
                           "deterministic": False, "eval.best_of_last": 0, "compile": False,
                           "data.resident": "auto", "data.image_size": None, "data.resize": None,
                           "data.scale": [0.08, 1.0], "optim.ema": 0.0}


# The torch.compile backends `compile` may name (true is inductor): the compiler, and the two that trace without one.
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager", "cudagraphs")


# Options that change how fast a run computes, never what: left out of a task's identity and of the config a resume
# compares, whatever their value (streamed batches do not depend on the number of decoding workers).
RUNTIME_ONLY = ("data.workers",)


def identity(obj: Any) -> Any:
    """`obj` (a run config, or a structure holding run configs) without the `NEUTRAL` options at their neutral value
    and without the `RUNTIME_ONLY` ones."""
    if isinstance(obj, list):
        return [identity(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: identity(v) for k, v in obj.items()}
    for dotted in RUNTIME_ONLY:
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key in out[section] and "schedule" in out:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    for dotted, neutral in NEUTRAL.items():
        if "." not in dotted:  # a top-level option
            if dotted in out and out[dotted] == neutral and "schedule" in out:  # of a run config
                del out[dotted]
            continue
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and out[section].get(key, neutral) == neutral:
            out[section] = {k: v for k, v in out[section].items() if k != key}
    return out


FIELDS: dict[str, Check] = {
    "name": text(pattern=r"[A-Za-z0-9_.\-]+"),
    "seed": integer(0, MAX_SEED),
    "device": device_name,
    "precision": one_of("fp32", "bf16", "fp16"),
    "deterministic": boolean(),
    "compile": lambda v: None if isinstance(v, bool) or v in COMPILE_BACKENDS else (
        f"true, false or a torch.compile backend ({', '.join(COMPILE_BACKENDS)})"),
    "data.name": text(),
    "data.root": text(nullable=True),
    "data.val_fraction": number(0.0, 0.9),
    "data.split_seed": integer(0, MAX_SEED),
    "data.subset": integer(1, nullable=True),
    "data.label_noise": number(0.0, 0.9),
    "data.batch_size": integer(1),
    "data.eval_batch_size": integer(1),
    "data.augment": boolean(),
    "data.pad": integer(0, 16, nullable=True),
    "data.hflip": boolean(nullable=True),
    "data.mean": list_of(number(), nullable=True, min_len=1),
    "data.std": list_of(number(0.0, lo_open=True), nullable=True, min_len=1),
    "data.resident": lambda v: None if isinstance(v, bool) or v == "auto" else "true, false or auto",
    "data.image_size": integer(8, 1024, nullable=True),
    "data.resize": integer(8, 2048, nullable=True),
    "data.scale": lambda v: None if isinstance(v, list) and len(v) == 2 and all(
        number(0.0, 1.0, lo_open=True)(x) is None for x in v) and v[0] <= v[1] else "two area fractions [low, high], 0 < low <= high <= 1",
    "data.workers": integer(0, 64, nullable=True),
    "model.name": text(),
    "model.num_classes": integer(2, MAX_CLASSES, nullable=True),
    "model.in_channels": integer(1, nullable=True),
    "optim.name": one_of("sgd", "adamw"),
    "optim.lr": number(0.0, lo_open=True),
    "optim.momentum": number(0.0, 0.999),
    "optim.nesterov": boolean(),
    "optim.weight_decay": number(0.0),
    "optim.betas": list_of(number(0.0, 0.9999), min_len=2),
    "optim.accumulate": integer(1, 1024),
    "optim.ema": number(0.0, 0.999999),  # the decay; 0 is off
    "schedule.name": one_of("constant", "step", "multistep", "cosine", "snapshot"),
    "schedule.epochs": integer(1, MAX_EPOCHS),
    "schedule.milestones": list_of(milestone),
    "schedule.step_size": integer(1),
    "schedule.gamma": number(0.0, 1.0, lo_open=True),
    "schedule.cycles": integer(1),
    "schedule.min_lr": number(0.0),
    "schedule.warmup_epochs": integer(0),
    "checkpoints.fractions": list_of(number(0.0, 1.0, lo_open=True)),
    "checkpoints.every": integer(1, nullable=True),
    "checkpoints.epochs": list_of(integer(1)),
    "kd.teachers": list_of(text()),
    "kd.temperature": number(0.0, lo_open=True),
    "kd.alpha": number(0.0, 1.0),
    "kd.ensemble": one_of("probs", "logits", "per_teacher"),
    "kd.cache": one_of("auto", "on", "off"),
    "kd.views": integer(1, 4096),
    "kd.cache_dir": text(nullable=True),
    "kd.channels_last": one_of("auto", True, False),
    "kd.autocast": one_of("auto", "none", "bf16", "fp16"),
    "kd.teacher_mode": one_of("eval", "train"),
    "eval.last_k": integer(1),
    "eval.best_of_last": integer(0),
    "log.progress": one_of("auto", True, False),
    "log.tensorboard": one_of("auto", True, False),
    "log.report_to": list_of(one_of("tensorboard", "mlflow", "wandb")),
}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def get(cfg: dict, path: str) -> Any:
    node = cfg
    for part in path.split("."):
        node = node[part]
    return node


def _merge(base: dict, update: dict, prefix: str = "") -> None:
    for key, value in update.items():
        path = f"{prefix}{key}"
        if not isinstance(key, str):
            raise UserError(f"config: key {key!r} under '{prefix.rstrip('.') or 'top level'}' must be a string")
        if key not in base:
            if prefix == "model.":
                base[key] = value  # a constructor argument of the model, checked once the model is known
                continue
            known = ", ".join(sorted(base))
            raise UserError(f"config: unknown key '{path}' (known here: {known})")
        if isinstance(base.get(key), dict):
            if not isinstance(value, dict):
                raise UserError(f"config: '{path}' must be a mapping, got {value!r}")
            _merge(base[key], value, path + ".")
        else:
            base[key] = value


def _override(cfg: dict, key: str, value: Any, defaults: dict) -> None:
    """One `--set key=value` (or API override). `null` removes the key: a setting returns to its default, a model
    argument goes (so `--set model.widths=null` lets another model be named). A mapping given for a whole section
    replaces it, refilled from the defaults (`--set 'model={name: resnet8}'` drops the previous model's arguments),
    where a config file's section is merged into the defaults. Anything else is merged as a file's value would be."""
    *parents, last = key.split(".")
    node, default = cfg, defaults
    for part in parents:
        if not isinstance(node.get(part), dict):
            break
        node, default = node[part], default.get(part, {}) if isinstance(default, dict) else {}
    else:
        if value is None and last in node:
            if isinstance(default, dict) and last in default:
                node[last] = copy.deepcopy(default[last])
            else:
                del node[last]
            return
        if isinstance(value, dict) and isinstance(node.get(last), dict):
            fresh = copy.deepcopy(default.get(last, {})) if isinstance(default, dict) else {}
            _merge(fresh, value, key + ".")
            node[last] = fresh
            return
    _merge(cfg, _nest(key, value))


def parse_override(item: str) -> tuple[str, Any]:
    """`schedule.epochs=5` -> ("schedule.epochs", 5); the value is read as a YAML scalar or flow list."""
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected key=value, e.g. --set schedule.epochs=5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
        raise UserError(f"--set {item!r}: {key!r} is not a dotted config key")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"--set {key}: cannot parse value {raw!r} ({str(e).splitlines()[0]})") from None
    return key, value


def _nest(path: str, value: Any) -> dict:
    node: dict = {}
    root = node
    parts = path.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return root


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text_ = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read config {path}: {e}") from None
    try:
        data = load_yaml(text_)
    except yaml.YAMLError as e:
        where = ""
        mark = getattr(e, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"config {path}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config {path}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def resolve(source: str | Path | dict | None = None, overrides: dict[str, Any] | list[str] | None = None,
            defaults: dict | None = None) -> dict:
    """Defaults ← file (or dict) ← overrides, validated. Returns a new, fully filled config dict."""
    cfg = copy.deepcopy(defaults if defaults is not None else DEFAULTS)
    if isinstance(source, (str, Path)):
        _merge(cfg, read_yaml(source))
    elif isinstance(source, dict):
        _merge(cfg, copy.deepcopy(source))
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides or [])
    for key, value in items:
        _override(cfg, key, value, defaults if defaults is not None else DEFAULTS)
    if isinstance(cfg["kd"]["cache"], bool):  # YAML 1.1 reads a bare on/off as a boolean
        cfg["kd"]["cache"] = "on" if cfg["kd"]["cache"] else "off"
    validate(cfg)
    return cfg


def validate(cfg: dict) -> None:
    for path, check in FIELDS.items():
        section, _, key = path.rpartition(".")
        node = cfg[section] if section else cfg
        if key not in node:  # a model's fixed keys are optional
            continue
        # Looked up by path, not flattened: a mapping given where a value belongs must meet the check, not vanish.
        expected = check(node[key])
        if expected is not None:
            raise UserError(f"config: {path} must be {expected}, got {node[key]!r}")
    sched = cfg["schedule"]
    epochs = sched["epochs"]
    if sched["name"] == "multistep" and any(_is_int(m) and m > epochs for m in sched["milestones"]):
        raise UserError(f"config: schedule.milestones {sched['milestones']} go past schedule.epochs={epochs}")
    if sched["name"] == "snapshot" and sched["cycles"] > epochs:
        raise UserError(f"config: schedule.cycles={sched['cycles']} is more than schedule.epochs={epochs}")
    if sched["warmup_epochs"] >= epochs:
        raise UserError(f"config: schedule.warmup_epochs={sched['warmup_epochs']} must be below "
                        f"schedule.epochs={epochs} (for a run this short, --set schedule.warmup_epochs="
                        f"{'0' if epochs == 1 else f'{epochs - 1} or 0'})")
    late = [e for e in cfg["checkpoints"]["epochs"] if e > epochs]
    if late:
        raise UserError(f"config: checkpoints.epochs {late} go past schedule.epochs={epochs}")
    check_trackers(cfg["log"]["report_to"], cfg["log"]["tensorboard"])
    if cfg["kd"]["teacher_mode"] == "train" and cfg["kd"]["cache"] == "on":
        raise UserError("config: kd.teacher_mode=train (teachers on batch statistics) cannot use kd.cache=on: their "
                        "outputs depend on the batch; use kd.cache=auto or off")
    data = cfg["data"]
    if data["mean"] is not None and data["std"] is not None and len(data["mean"]) != len(data["std"]):
        raise UserError("config: data.mean and data.std must have the same length")


TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> the package it needs


def check_trackers(report_to: list, tensorboard_setting) -> None:
    """An unknown tracker, or one whose package is not installed, is refused before anything is written."""
    for name in report_to:
        if name not in TRACKERS:
            raise UserError(f"config: log.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
    wanted = list(report_to) + (["tensorboard"] if tensorboard_setting is True else [])
    for name in dict.fromkeys(wanted):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            field = "log.tensorboard=true" if name not in report_to else f"log.report_to includes {name}"
            raise UserError(f"config: {field} but the {TRACKERS[name]} package is not installed "
                            "(pip install 'ckptkd[track]')")


def epoch_at_fraction(fraction: float, epochs: int) -> int:
    """The epoch a fraction of training names (`checkpoints.fractions`, `RUN@0.5`): rounded half up, never below 1."""
    return max(1, min(epochs, math.floor(fraction * epochs + 0.5)))


def dump(cfg: dict) -> str:
    return yaml.dump(cfg, Dumper=_Dumper, sort_keys=False, default_flow_style=None)
