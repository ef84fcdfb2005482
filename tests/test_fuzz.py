"""Property-based bad input (hypothesis): random and mutated configs, `--set` overrides, references, paths, manifests
and analysis files thrown at every command. Every answer is exit 0, or exit 2 with exactly one error line (the last
line on stderr) — never a traceback.

Commands run in this process through `ckptkd.cli.main`, for real, on a base config small enough that a valid
example trains in a fraction of a second (digits, a 4-unit MLP, 1 epoch); `study` runs its validation, plan and
database (workers claim nothing), `bench` and `demo` are left out (fixed workloads that take no input to fuzz)."""

import itertools
import json
import shutil
from unittest import mock

import numpy as np
import pytest
import yaml
from conftest import call_cli, rewrite_manifest, tiny_config
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from ckptkd import config as config_mod

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
                                       "@top-info:0", "@top-info:x", "@all", "@0.3,0.5", "@,", "@@", "@0.5,epoch=1",
                                       "@0.5,0.5", "@epoch=4,epoch=4", "@0.7,epoch=4"]),
                      st.text(max_size=10).map(lambda t: "@" + t))

_counter = itertools.count()
# A valid example may ask for 10**5 epochs (schedule.epochs is drawn up to its bound): one such run took minutes and
# stalled the suite. Valid runs are therefore stopped, as Ctrl-C would stop them, once epoch STOP_AFTER_EPOCH is
# saved; runs of fewer epochs finish.
STOP_AFTER_EPOCH = 3


def _call(argv: list[str]) -> tuple[int, str]:
    from ckptkd.run import folder

    save_state, stopped = folder.save_state, []

    def save_then_stop_long_runs(path, model, optimizer, progress, **ema):
        save_state(path, model, optimizer, progress, **ema)
        if progress.epoch >= STOP_AFTER_EPOCH:
            stopped.append(progress.epoch)
            raise KeyboardInterrupt

    with mock.patch.object(folder, "save_state", save_then_stop_long_runs):
        done = call_cli(*argv)
    code, err = done.returncode, done.stderr
    if stopped:  # what the command answers to a Ctrl-C: exit 130 and how to continue
        assert code == 130 and err.strip().splitlines()[-1].startswith("ckptkd: interrupted"), (
            f"a run stopped after epoch {stopped[0]} answered exit {code}: {argv}\n{err}")
        code = 0
    return code, err


def _answered_well(argv, code, err) -> None:
    event(f"{argv[0]}: exit {code}")  # `pytest --hypothesis-show-statistics` shows how many were valid
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
    resume = ["--resume"] if data.draw(st.booleans()) else []  # into a folder that may not exist
    if command == "train":
        argv = ["train", str(config), *sets, "--out", str(out), *resume]
    elif command == "distill":
        teachers = [a for _ in range(data.draw(st.integers(0, 2)))
                    for a in ("--teacher", run + data.draw(SELECTORS))]
        argv = ["distill", str(config), *teachers, *sets, "--out", str(out), *resume]
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


def test_a_long_valid_run_drawn_by_the_fuzzer_is_stopped_after_a_few_epochs(fuzz_root):
    """The fuzzer once drew `schedule.epochs=87756`, a valid run of minutes; such runs end after STOP_AFTER_EPOCH."""
    out = fuzz_root / f"out{next(_counter)}"
    argv = ["train", str(fuzz_root / "base.yaml"), "--set", "schedule.epochs=87756", "--out", str(out)]
    code, err = _call(argv)
    assert code == 0 and "Traceback" not in err, err
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((out / "manifest.json").read_text())["status"] == "interrupted"
    assert 0 < len(epochs) <= STOP_AFTER_EPOCH  # the line of the epoch it stopped at is written on resume


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
# Regression seeds: inputs that once found a bug stay in every run.
@example(text=yaml.safe_dump(BASE).replace("seed: 0", "seed: 77777777777777"))  # overflowed torch's 64-bit seed
@example(text=yaml.safe_dump(BASE).replace("seed: 0", "seed: " + "7" * 5000))  # ValueError: int digits limit
def test_yaml_structure_and_numeric_extremes_are_answered_in_one_line(fuzz_root, text):
    config = fuzz_root / f"structure{next(_counter)}.yaml"
    config.write_text(text)
    argv = ["train", str(config), "--out", str(fuzz_root / f"out{next(_counter)}")]
    code, err = _call(argv)
    _answered_well(argv, code, err)


# --- the contents of data files and of other trainers' checkpoints --------------------------------------------------

def _train_on(fuzz_root, data_name: str, root) -> None:
    argv = ["train", str(fuzz_root / "base.yaml"), "--set", f"data.name={data_name}", "--set", f"data.root={root}",
            "--out", str(fuzz_root / f"out{next(_counter)}")]
    code, err = _call(argv)
    _answered_well(argv, code, err)


_SMALL_DIMS = st.lists(st.integers(0, 5), min_size=0, max_size=5).map(tuple)


@st.composite
def npz_arrays(draw) -> dict:
    """An archive as a careless export might write one: a valid one (20 training and 10 test images, two classes)
    with up to three things changed: an array missing, any dtype or shape, labels out of range (2**40 included),
    NaN or out-of-range pixels, class names of the wrong kind or count."""
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    image = draw(st.sampled_from([(5, 5), (4, 4, 3), (3, 4, 1)]))
    arrays = {"x_train": rng.integers(0, 256, (20, *image), dtype=np.uint8), "y_train": np.arange(20) % 2,
              "x_test": rng.integers(0, 256, (10, *image), dtype=np.uint8), "y_test": np.arange(10) % 2}
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(["x_train", "y_train", "x_test", "y_test", "class_names"]))
        change = draw(st.sampled_from(["drop", "dtype", "shape", "fill", "label", "length", "names"]))
        value = arrays.get(key, np.array(["a", "b"]))
        with np.errstate(all="ignore"):
            if change == "drop":
                arrays.pop(key, None)
                continue
            if change == "dtype":
                dtype = draw(st.sampled_from(["float32", "float64", "int64", "bool", "uint16", "complex64", "<U2"]))
                value = value.astype(dtype) if value.dtype.kind != "U" else np.zeros(value.shape, dtype)
                if value.dtype.kind == "f" and draw(st.booleans()):
                    value = value / 255
            elif change == "shape":
                value = np.zeros(draw(_SMALL_DIMS), value.dtype)
            elif change == "fill":
                value = np.full(value.shape, draw(st.sampled_from([0.5, -1, 1e30, float("nan"), float("inf")])))
            elif change == "label":
                value = value.astype(np.int64) if value.dtype.kind in "iu" else value.copy()
                if value.size and value.dtype.kind in "iu":
                    value.flat[0] = draw(st.sampled_from([-1, 2, 11, 3_000_000, 2**40, 2**62]))
            elif change == "length":
                value = value[:draw(st.integers(0, len(value)))] if value.ndim else value
            else:
                value = np.array(draw(st.sampled_from([["a"], ["a", "b", "c"], [1, 2], [["a"], ["b"]], []])))
        arrays[key] = value
    return arrays


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(arrays=npz_arrays())
@example(arrays={"x_train": np.zeros((2, 3, 3), np.uint8), "y_train": np.array([0, 2**40]),  # 2**40 class names
                 "x_test": np.zeros((2, 3, 3), np.uint8), "y_test": np.array([0, 1])})
@example(arrays={"x_train": np.zeros((2, 3, 3), np.uint8), "y_train": np.array([0, 1]),  # divided by zero
                 "x_test": np.zeros((0, 3, 3), np.uint8), "y_test": np.zeros(0, np.int64)})
def test_npz_contents_are_trained_on_or_answered_in_one_line(fuzz_root, arrays):
    path = fuzz_root / f"data{next(_counter)}.npz"
    np.savez(path, **arrays)
    _train_on(fuzz_root, "npz", path)


_MODES = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2, "P": 1, "1": 1, "I;16": 1, "I": 1, "F": 1, "CMYK": 4}


@st.composite
def image_trees(draw) -> list[tuple[str, object]]:
    """root/{train,test}/CLASS/ files: a valid tree (two classes, 12 RGB training and 4 test images of 6x4) with
    up to three things changed: images in every mode PIL writes (16-bit, float, palette, alpha, bilevel), another
    size, files that are not images (empty, text, truncated), a folder where a file was, a class only in test."""
    entries = {f"{split}/{cls}/{i}.png": ("image", "RGB", (6, 4)) for split, n in (("train", 6), ("test", 2))
               for cls in ("cat", "dog") for i in range(n)}
    for _ in range(draw(st.integers(0, 3))):
        split = draw(st.sampled_from(["train", "test"]))
        cls = draw(st.sampled_from(["cat", "dog", ".hidden", "bird"]))
        name = f"{split}/{cls}/{draw(st.integers(0, 6))}{draw(st.sampled_from(['.png', '.jpg', '.bmp', '.PNG', '.txt']))}"
        kind = draw(st.sampled_from(["image"] * 3 + ["empty", "text", "truncated", "folder", "drop"]))
        if kind == "drop":
            entries = {k: v for k, v in entries.items() if not k.startswith(f"{split}/{cls}/")}
            continue
        entries[name] = (kind, draw(st.sampled_from(list(_MODES))), draw(st.sampled_from([(6, 4), (5, 4), (1, 1)])))
    return sorted(entries.items())


def _write_tree(root, entries) -> None:
    import io as io_mod

    from PIL import Image

    for name, (kind, mode, size) in entries:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "folder":
            path.mkdir(exist_ok=True)
            continue
        if kind in ("empty", "text"):
            path.write_text("" if kind == "empty" else "not an image")
            continue
        fmt = {".jpg": "JPEG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
        # a mode this format cannot hold becomes a PNG of it, and I or F (no PNG holds them) a 16-bit PNG
        for mode, fmt in ((mode, fmt), (mode, "PNG"), ("I;16", "PNG")):
            buffer = io_mod.BytesIO()
            try:
                Image.new(mode, size).save(buffer, format=fmt)
                break
            except (OSError, ValueError, KeyError):
                continue
        data = buffer.getvalue()
        path.write_bytes(data[:len(data) // 2] if kind == "truncated" else data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(entries=image_trees())
@example(entries=[("test/cat/0.png", ("image", "I;16", (6, 4))), ("train/cat/0.png", ("image", "RGB", (6, 4)))])
def test_image_folder_contents_are_trained_on_or_answered_in_one_line(fuzz_root, entries):
    root = fuzz_root / f"tree{next(_counter)}"
    root.mkdir()
    _write_tree(root, entries)
    _train_on(fuzz_root, "folder", root)


NUMBERS = st.one_of(st.integers(-3, 10), st.sampled_from([10**400, -10**30, 2**63, 1e308]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3), st.none(), st.booleans(),
                    st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(data=st.data())
def test_other_trainers_checkpoint_metadata_is_imported_or_answered_in_one_line(fuzz_root, teacher_run, data):
    """A trainer's .pth with any epoch, accuracy and wrapper keys, or a Hugging Face checkpoint folder whose
    trainer_state.json holds anything JSON can: imported (then analysable), or refused in one line."""
    import torch
    from safetensors.torch import save_file

    from ckptkd.run import resolve

    state = resolve(f"{teacher_run.path}@last")[0].state_dict()
    source = fuzz_root / f"import{next(_counter)}"
    source.mkdir()
    if data.draw(st.booleans()):
        saved = {data.draw(st.sampled_from(["model", "state_dict", "model_state", "net"])): state}
        for key in data.draw(st.lists(st.sampled_from(["epoch", "best_acc", "accuracy", "metric", "best_valid_acc",
                                                       "args", "opt", "version"]), max_size=4, unique=True)):
            saved[key] = data.draw(NUMBERS)
        torch.save(saved, source / f"ckpt_epoch_{data.draw(st.integers(0, 3))}.pth")
    else:
        folder = source / f"checkpoint-{data.draw(st.integers(0, 50))}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
        trainer_state = {key: data.draw(NUMBERS) for key in data.draw(st.lists(st.sampled_from(
            ["epoch", "global_step", "num_train_epochs", "best_metric"]), max_size=4, unique=True))}
        if data.draw(st.booleans()):
            trainer_state["log_history"] = data.draw(st.one_of(NUMBERS, st.lists(st.dictionaries(
                st.sampled_from(["epoch", "eval_accuracy", "eval_loss", "loss", "step"]), NUMBERS), max_size=3)))
        text = json.dumps(trainer_state) if data.draw(st.integers(0, 5)) else json.dumps(trainer_state)[:-1]
        (folder / "trainer_state.json").write_text(text)
    out = fuzz_root / f"out{next(_counter)}"
    argv = ["import", str(source), "--model", "resnet8", "--out", str(out), "--set", "data.name=digits"]
    code, err = _call(argv)
    _answered_well(argv, code, err)
    if code == 0:
        argv = ["analyze", str(out), "--no-plots", "--seeds", "1"]
        _answered_well(argv, *_call(argv))
