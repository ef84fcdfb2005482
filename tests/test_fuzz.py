"""Property-based bad input (hypothesis): random and mutated configs, `--set` overrides, references, paths, manifests
and analysis files thrown at every command. Every answer is exit 0, or exit 2 with exactly one error line (the last
line on stderr) — never a traceback.

Commands run in this process through `ckptkd.cli.main`, for real, on a base config small enough that a valid
example trains in a fraction of a second (digits, a 4-unit MLP, 1 epoch); `study` runs its validation, plan and
database (workers claim nothing), `bench` and `demo` are left out (fixed workloads that take no input to fuzz)."""

import contextlib
import io
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import rewrite_manifest, tiny_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckptkd import config as config_mod
from ckptkd.cli import main

BASE = tiny_config(model={"name": "mlp", "widths": [4]}, schedule={"epochs": 1}, checkpoints={"fractions": [1.0]},
                   eval={"last_k": 1})
KEYS = sorted(config_mod.flatten(config_mod.DEFAULTS)) + ["model.widths", "model.channels", "nonsense", "data.x.y",
                                                           "kd.teachers"]
# Values a key might plausibly get, and plainly wrong ones; the model and data names stay cheap to train.
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 3), st.integers(-10**12, 10**12),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.sampled_from(["auto", "cpu", "cuda", "mlp", "resnet8", "cnn", "lenet5", "digits", "npz", "folder", "cifar10",
                     "sgd", "adamw", "cosine", "snapshot", "step", "probs", "logits", "per_teacher", "on", "off", "bf16",
                     "fp16", "train", "eval", "tensorboard", "wandb", "0.5", "[1, 2]", "{a: 1}", ""]),
    st.lists(st.one_of(st.integers(-2, 80), st.floats(-1, 2), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(0, 3), max_size=2),
)
OVERRIDE = st.one_of(
    st.tuples(st.sampled_from(KEYS), VALUES).map(lambda kv: f"{kv[0]}={yaml.safe_dump(kv[1], default_flow_style=True).strip().removesuffix('...').strip()}"),
    st.text(max_size=20),  # not even key=value
)
SELECTORS = st.one_of(st.sampled_from(["", "@last", "@0.5", "@1.0", "@0", "@1.5", "@-1", "@epoch=1", "@epoch=0",
                                       "@epoch=99", "@epoch=x", "@best-val", "@best-info", "@top-info:2",
                                       "@top-info:0", "@top-info:x", "@all", "@0.3,0.5", "@,", "@@", "@0.5,epoch=1"]),
                      st.text(max_size=10).map(lambda t: "@" + t))

_counter = itertools.count()


def _call(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code
    return code, err.getvalue()


def _answered_well(argv, code, err) -> None:
    assert code in (0, 2), f"exit {code} for {argv}:\n{err}"
    assert "Traceback" not in err, f"{argv}:\n{err}"
    if code == 2:
        errors = [line for line in err.strip().splitlines() if ": error: " in line]
        assert len(errors) == 1 and err.strip().endswith(errors[0]), f"{argv}:\n{err}"


def _mutated(tree, draw_key, draw_value):
    """A deep copy of `tree` with one value replaced (or a key added or removed) somewhere."""
    tree = json.loads(json.dumps(tree))
    node, keys = tree, []
    while isinstance(node, dict) and node:
        key = draw_key(sorted(node))
        keys.append(key)
        if not isinstance(node[key], dict) or draw_value(st.booleans()):
            break
        node = node[key]
    action = draw_value(st.sampled_from(["replace", "drop", "add"]))
    if action == "drop" and keys:
        node.pop(keys[-1], None)
    elif action == "add":
        node[draw_value(st.text(max_size=6))] = draw_value(VALUES)
    elif keys:
        node[keys[-1]] = draw_value(VALUES)
    return tree


@pytest.fixture(scope="module")
def fuzz_root(tmp_path_factory, teacher_run):
    root = tmp_path_factory.mktemp("fuzz")
    shutil.copytree(teacher_run.path, root / "t")
    (root / "base.yaml").write_text(yaml.safe_dump(BASE))
    (root / "text.txt").write_text("not a checkpoint")
    (root / "empty").mkdir()
    return root


COMMANDS = ["train", "distill", "analyze", "select", "study", "show", "verify", "import", "report"]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                    HealthCheck.too_slow])
@given(data=st.data())
def test_every_command_answers_bad_input_with_one_line(fuzz_root, monkeypatch, data):
    from ckptkd.study.queue import ResultsDB

    # A study's workers claim nothing here: its validation, plan and database are what is exercised.
    monkeypatch.setattr(ResultsDB, "claim_group", lambda self, *a, **k: [])
    monkeypatch.setattr(ResultsDB, "pending_count", lambda self: 0)
    out = fuzz_root / f"out{next(_counter)}"
    command = data.draw(st.sampled_from(COMMANDS))
    overrides = data.draw(st.lists(OVERRIDE, max_size=3))
    sets = [arg for o in overrides for arg in ("--set", o)]
    config = fuzz_root / "base.yaml"
    if data.draw(st.booleans()):  # a mutated config file rather than overrides alone
        config = fuzz_root / f"cfg{next(_counter)}.yaml"
        mutated = _mutated(BASE, lambda keys: data.draw(st.sampled_from(keys)), data.draw)
        config.write_text(data.draw(st.sampled_from([yaml.safe_dump(mutated), json.dumps(mutated)[:-1],
                                                     "- a list\n", "key: [unclosed\n", ""])))
    run = str(data.draw(st.sampled_from([fuzz_root / "t", fuzz_root / "nowhere", fuzz_root / "text.txt",
                                         fuzz_root / "empty"])))
    if command == "train":
        argv = ["train", str(config), *sets, "--out", str(out)]
    elif command == "distill":
        teachers = [a for _ in range(data.draw(st.integers(0, 2)))
                    for a in ("--teacher", run + data.draw(SELECTORS))]
        argv = ["distill", str(config), *teachers, *sets, "--out", str(out)]
        if data.draw(st.booleans()):
            argv += ["--fuse", "--seeds", data.draw(st.sampled_from(["0,1", "0,0", "x", "-1", "1"]))]
    elif command == "analyze":
        argv = ["analyze", run, "--no-plots", "--seeds", str(data.draw(st.integers(-1, 3))), "--split",
                data.draw(st.sampled_from(["train", "val", "test"]))]
    elif command == "select":
        argv = ["select", run, "--by", data.draw(st.sampled_from(["info", "val", "nc1", "x"])), "--k",
                str(data.draw(st.integers(-1, 9))), "--json"]
    elif command == "study":
        study = {"name": "fuzz", "seeds": 1, "variants": ["none"],
                 "pairs": [{"teacher": BASE, "student": BASE}]}
        if data.draw(st.booleans()):
            study = _mutated(study, lambda keys: data.draw(st.sampled_from(keys)), data.draw)
        (out.parent / f"{out.name}.yaml").write_text(yaml.safe_dump(study))
        argv = ["study", str(out.parent / f"{out.name}.yaml"), *sets, "--out", str(out), "--no-report"]
    elif command == "import":
        argv = ["import", run, "--model", data.draw(st.sampled_from(["mlp", "resnet8", "nope"])), *sets,
                "--out", str(out)]
    else:
        argv = [command, run]
    code, err = _call(argv)
    _answered_well(argv, code, err)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_manifest_or_analysis_is_read_or_refused_in_one_line(fuzz_root, teacher_run, data):
    """Mutations that pass the checksum (resealed, as a careless tool might write them) reach the schema checks."""
    from ckptkd import analyze
    from ckptkd.run.storage import write_sealed_json

    run = fuzz_root / f"m{next(_counter)}"
    shutil.copytree(teacher_run.path, run)
    if not (fuzz_root / "analysed").exists():
        shutil.copytree(teacher_run.path, fuzz_root / "analysed")
        analyze(fuzz_root / "analysed", plots=False, quiet=True, seeds=2)
    shutil.copy(fuzz_root / "analysed" / "analysis.json", run / "analysis.json")
    target = data.draw(st.sampled_from(["manifest.json", "analysis.json"]))
    original = json.loads((run / target).read_text())
    original.pop("checksum", None)
    mutated = original
    for _ in range(data.draw(st.integers(1, 3))):
        mutated = _mutated(mutated, lambda keys: data.draw(st.sampled_from(keys)), data.draw)
    if target == "manifest.json":
        rewrite_manifest(run, mutated) if isinstance(mutated, dict) else None
    else:
        write_sealed_json(run / target, mutated)
    for argv in (["show", str(run)], ["select", str(run), "--json"], ["select", str(run), "--by", "val"],
                 ["verify", str(run)]):
        code, err = _call(argv)
        _answered_well(argv, code, err)


@st.composite
def yaml_structures(draw) -> str:
    """The base config's text with one structural twist YAML allows: a key repeated in a mapping, aliases nested
    n^k times under some key, a value nested d levels deep, an integer of many digits, a float beyond 1e308, an
    alias to the mapping that holds it. Small draws stay within the loader's bounds and must still be answered
    (trained, or refused for what the key or value is)."""
    base = yaml.safe_dump(BASE, default_flow_style=False)
    key = draw(st.sampled_from(["model", "description", "seed", "log", "optim", "data"]))
    twist = draw(st.sampled_from(["duplicate", "aliases", "deep", "digits", "float", "self"]))
    if twist == "duplicate":
        line = draw(st.sampled_from([line for line in base.splitlines() if line and not line.startswith(" ")]))
        return base + line + "\n"
    if twist == "aliases":
        fan, depth = draw(st.integers(1, 12)), draw(st.integers(1, 10))
        levels = [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * fan if i else ["x"] * fan) + "]" for i in range(depth)]
        return base + f"{key}: [" + ", ".join(levels) + "]\n"
    if twist == "deep":
        depth = draw(st.integers(1, 3000))
        return base + f"{key}: " + "[" * depth + "1" + "]" * depth + "\n"
    if twist == "digits":
        digits = draw(st.integers(1, 6000))
        return base.replace("seed: 0", f"seed: {draw(st.sampled_from(['', '-']))}{'7' * digits}")
    if twist == "float":
        return base.replace("lr: 0.05", f"lr: {draw(st.sampled_from(['1e308', '1e309', '-1e400', '.inf', '.nan']))}")
    return base + f"{key}: &self {{a: *self}}\n"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(text=yaml_structures())
def test_yaml_structure_and_numeric_extremes_are_answered_in_one_line(fuzz_root, text):
    config = fuzz_root / f"structure{next(_counter)}.yaml"
    config.write_text(text)
    argv = ["train", str(config), "--out", str(fuzz_root / f"out{next(_counter)}")]
    code, err = _call(argv)
    _answered_well(argv, code, err)
