"""Inputs built to exhaust a machine (issue 25's "resource exhaustion" and "numbers beyond the machine" classes),
each given to the real command in its own process: the answer is exit 2 and one line naming the file or field, and
the process never grows far beyond what importing torch costs (its peak resident memory, from wait4).

The memory bound is not a timing: the failures it guards against took gigabytes (a label of 2**40 made 2**40 class
names; a compressed archive of zeros decompressed to its full size). Each child also runs under an address-space
limit, so a regression fails here with a MemoryError rather than taking the test machine down."""

import io
import json
import os
import signal
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_config

# Importing torch and ckptkd costs ~230 MB resident here; the answers below must come with little on top of it.
PEAK_MB = 500
ADDRESS_SPACE = 6 * 2**30
HANG_GUARD_S = 120  # far beyond any answer (each takes a few seconds): only a hang reaches it

CONFIG = tiny_config(model={"name": "mlp", "widths": [4]}, schedule={"epochs": 1}, checkpoints={"fractions": [1.0]})


_SPAWNER = """
import os, resource, sys
limit, argv = int(sys.argv[1]), sys.argv[2:]
pid = os.fork()
if pid == 0:
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    os.execv(argv[0], argv)
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def _answer(argv: list[str], cwd: Path) -> tuple[int, str, float]:
    """(exit code, stderr, peak resident MB) of `python -m ckptkd ARGV` in a fresh process."""
    err_path = cwd / f".stderr-{os.getpid()}-{threading.get_ident()}"
    with open(err_path, "w") as err:
        # Through a small spawner: Linux carries ru_maxrss across fork and execve, so a child forked from this
        # (large) test process would report this process's size; the spawner's child starts from the spawner's.
        child = subprocess.Popen(
            [sys.executable, "-c", _SPAWNER, str(ADDRESS_SPACE), sys.executable, "-m", "ckptkd", *argv], cwd=cwd,
            stdout=subprocess.PIPE, stderr=err, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
            start_new_session=True)
        guard = threading.Timer(HANG_GUARD_S, os.killpg, (child.pid, signal.SIGKILL))  # the spawner and its child
        guard.start()
        try:
            out, _ = child.communicate()
        finally:
            guard.cancel()
    code, maxrss_kib = (int(v) for v in out.split()) if out.strip() else (-9, 0)
    return code, err_path.read_text(), maxrss_kib / 1024  # ru_maxrss is in KiB on Linux


def _yaml(path: Path, extra: str = "", **replace) -> str:
    text = yaml.safe_dump(CONFIG, default_flow_style=False)
    for old, new in replace.items():
        text = text.replace(old, new)
    path.write_text(text + extra)
    return str(path)


def _npz(path: Path, **arrays) -> Path:
    x = np.zeros((4, 8, 8), np.uint8)
    np.savez(path, **{"x_train": x, "y_train": np.array([0, 1, 0, 1]), "x_test": x, "y_test": np.array([0, 1, 0, 1]),
                      **arrays})
    return path


def _npz_declaring(path: Path, shape: tuple[int, ...]) -> Path:
    """A valid .npz whose x_train header declares `shape` of uint8 followed by 64 bytes: what a compressed archive of
    zeros that inflates to that size looks like until its data is read."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    _npz(path)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        data = {name: archive.read(name) for name in archive.namelist()}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, content in data.items():
            archive.writestr(name, header.getvalue() + bytes(64) if name == "x_train.npy" else content)
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A PNG header declaring width x height RGB pixels (and no pixel data)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def _folder(root: Path, bomb: Path | None = None) -> Path:
    for split in ("train", "test"):
        for name in ("a", "b"):
            (root / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / name / "0.png")
    if bomb is not None:
        shutil.move(bomb, root / "train" / "a" / "1.png")
    return root


def _run_copy(tmp: Path, teacher_run) -> Path:
    run = tmp / "run"
    shutil.copytree(teacher_run.path, run)
    return run


def _train(config: str, *sets: str) -> list[str]:
    return ["train", config, *[a for s in sets for a in ("--set", s)], "--out", "out"]


LAUGHS = "&a0 [" + ", ".join(["x"] * 10) + "]"
for _i in range(1, 9):
    LAUGHS += f", &a{_i} [" + ", ".join([f"*a{_i - 1}"] * 10) + "]"


def _bombs(tmp: Path, teacher_run) -> dict:
    """name -> (argv, what the one line must name)."""
    bombs = {
        "YAML aliases expanding to 10**9 items": (
            _train(_yaml(tmp / "laughs.yaml", f"description: [{LAUGHS}]\n")), "laughs.yaml"),
        "YAML nested 5,000 levels deep": (
            _train(_yaml(tmp / "deep.yaml", "log: " + "[" * 5000 + "]" * 5000 + "\n")), "deep.yaml"),
        "a seed of 5,000 digits": (_train(_yaml(tmp / "digits.yaml", **{"seed: 0": "seed: " + "7" * 5000})), "digits.yaml"),
        "a learning rate of 1e400": (_train(_yaml(tmp / "lr.yaml", **{"lr: 0.05": "lr: 1e400"})), "lr.yaml"),
        "an npz label of 2**40": (
            _train(_yaml(tmp / "c.yaml"), "data.name=npz", f"data.root={_npz(tmp / 'label.npz', y_train=np.array([0, 1, 0, 2**40]))}"),
            "label.npz"),
        "an npz array that inflates to 32 GiB": (
            _train(_yaml(tmp / "c.yaml"), "data.name=npz", f"data.root={_npz_declaring(tmp / 'zipbomb.npz', (2**29, 8, 8))}"),
            "zipbomb.npz"),
        "an npz of Python objects": (
            _train(_yaml(tmp / "c.yaml"), "data.name=npz",
                   f"data.root={_npz(tmp / 'objects.npz', class_names=np.array([{'a': 1}, None], dtype=object))}"),
            "objects.npz"),
        "a PNG declaring 60,000 x 60,000 pixels": (
            _train(_yaml(tmp / "c.yaml"), "data.name=folder",
                   f"data.root={_folder(tmp / 'images', _png_declaring(tmp / 'big.png', 60_000, 60_000))}"),
            "1.png"),
    }
    bombs["an MLP layer of 10**9 units"] = (_train(_yaml(tmp / "c.yaml"), "model.widths=[1000000000]"),
                                             "model.widths=[1000000000]")
    study = {"name": "many", "seeds": 10**9, "pairs": [{"teacher": CONFIG, "student": CONFIG}]}
    (tmp / "seeds.yaml").write_text(yaml.safe_dump(study))
    bombs["a study of 10**9 seeds"] = (["study", str(tmp / "seeds.yaml"), "--out", "s"], "seeds")
    study = {"name": "many", "seeds": 1, "analysis": {"seeds": 10**9}, "pairs": [{"teacher": CONFIG, "student": CONFIG}]}
    (tmp / "analysis.yaml").write_text(yaml.safe_dump(study))
    bombs["a study's analysis of 10**9 split seeds"] = (["study", str(tmp / "analysis.yaml"), "--out", "s"],
                                                        "analysis.seeds")
    run = _run_copy(tmp / "deep-manifest", teacher_run)
    (run / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    bombs["a manifest nested 100,000 levels deep"] = (["show", str(run)], "manifest.json")
    run = _run_copy(tmp / "huge-manifest", teacher_run)
    with open(run / "manifest.json", "r+b") as f:
        f.truncate(300 * 2**20)  # sparse: 300 MiB on paper, nothing on disk
    bombs["a manifest of 300 MiB"] = (["show", str(run)], "manifest.json")
    run = _run_copy(tmp / "digits-analysis", teacher_run)
    (run / "analysis.json").write_text('{"format": ' + "9" * 5000 + "}")
    bombs["an analysis holding an integer of 5,000 digits"] = (["select", str(run)], "analysis.json")
    hf = tmp / "hf" / "checkpoint-24"
    hf.mkdir(parents=True)
    from safetensors.torch import save_file

    from ckptkd.run import resolve
    save_file({k: v.contiguous() for k, v in resolve(f"{teacher_run.path}@last")[0].state_dict().items()},
              hf / "model.safetensors")
    (hf / "trainer_state.json").write_text('{"log_history": ' + "[" * 100_000 + "]" * 100_000 + "}")
    bombs["a trainer_state.json nested 100,000 levels deep"] = (
        ["import", str(tmp / "hf"), "--model", "resnet8", "--out", "imported"], "trainer_state.json")
    study = {"name": "laughs", "seeds": 1, "pairs": [{"teacher": CONFIG, "student": CONFIG}]}
    (tmp / "study.yaml").write_text(yaml.safe_dump(study) + f"description: [{LAUGHS}]\n")
    bombs["a study description of 10**9 items"] = (["study", str(tmp / "study.yaml"), "--out", "s"], "study.yaml")
    return bombs


@pytest.mark.slow
def test_inputs_built_to_exhaust_memory_are_answered_in_one_line_with_little_memory(tmp_path, teacher_run):
    bombs = _bombs(tmp_path, teacher_run)
    problems = []
    print(f"\n{'input':<52} exit  peak MB  seconds")  # `pytest -s` shows what each answer cost
    for name, (argv, names) in bombs.items():
        started = time.perf_counter()
        code, err, peak_mb = _answer(argv, tmp_path)
        print(f"{name:<52} {code:>4} {peak_mb:>8.0f} {time.perf_counter() - started:>8.1f}")
        lines = err.strip().splitlines()
        if code != 2 or "Traceback" in err or not lines or not lines[-1].startswith("ckptkd: error: "):
            problems.append(f"{name}: exit {code}: {err.strip()[-300:]}")
        elif names not in lines[-1]:
            problems.append(f"{name}: the line does not name {names!r}: {lines[-1]}")
        elif peak_mb > PEAK_MB:
            problems.append(f"{name}: peak {peak_mb:.0f} MB > {PEAK_MB} MB")
    assert not problems, "\n".join(problems)
    assert not (tmp_path / "out").exists() and not (tmp_path / "imported").exists()


def test_npz_headers_are_read_before_any_array(tmp_path, monkeypatch):
    """An archive's arrays are sized from their headers: one that would not fit is refused without np.load."""
    from ckptkd.data import sources
    from ckptkd.errors import UserError

    path = _npz(tmp_path / "ok.npz")
    exact = 2 * 4 * 8 * 8 + 2 * 4 * 8  # two 4x8x8 uint8 image arrays, two int64 label arrays of 4
    monkeypatch.setattr(sources.memory, "available_memory", lambda: exact)
    assert sources.load_raw("npz", str(path)).train_x.shape == (4, 1, 8, 8)
    monkeypatch.setattr(sources.memory, "available_memory", lambda: exact - 1)
    monkeypatch.setattr(np, "load", lambda *a, **k: pytest.fail("an array was read"))
    with pytest.raises(UserError, match=r"ok.npz: its arrays need 0.0 GiB in memory; this machine has 0.0 GiB"):
        sources.load_raw("npz", str(path))


def test_a_folder_is_sized_from_one_header_before_any_image_is_decoded(tmp_path, monkeypatch):
    from ckptkd.data import images, sources
    from ckptkd.errors import UserError

    root = _folder(tmp_path / "images")
    exact = 4 * 8 * 8 * 3  # four 8x8 images, held as RGB at most
    monkeypatch.setattr(sources.memory, "available_memory", lambda: exact)
    assert sources.load_raw("folder", str(root)).train_x.shape == (2, 3, 8, 8)
    monkeypatch.setattr(sources.memory, "available_memory", lambda: exact - 1)
    monkeypatch.setattr(images, "_read_image", lambda *a, **k: pytest.fail("an image was decoded"))
    with pytest.raises(UserError, match=r"folder: .*images: 4 images of 8x8 need"):
        sources.load_raw("folder", str(root))
    monkeypatch.setattr(images, "MAX_CLASSES", 1)
    with pytest.raises(UserError, match=r"2 class folders in .*train; at most 1 are supported"):
        sources.load_raw("folder", str(root))


def test_an_image_of_another_size_is_refused_from_its_header(tmp_path, monkeypatch):
    """A later image of another size (a decompression bomb among small images, say) is never decoded."""
    from ckptkd.data import images
    from ckptkd.errors import UserError

    root = _folder(tmp_path / "images", _png_declaring(tmp_path / "big.png", 12_000, 7_000))
    monkeypatch.setattr(np, "asarray", lambda *a, **k: pytest.fail("decoded"))
    with pytest.raises(UserError, match=r"1.png is 12000x7000 but .*0.png is 8x8"):
        images._read_image(root / "train" / "a" / "1.png", (8, 8), root / "train" / "a" / "0.png")


def test_json_nesting_digits_and_size_beyond_reason_are_one_line(tmp_path):
    from ckptkd.errors import UserError
    from ckptkd.run.storage import MAX_JSON_BYTES, read_json

    for name, text, needle in (("deep", "[" * 50_000 + "]" * 50_000, "is not valid JSON"),
                               ("digits", "9" * 5000, r"is not valid JSON \(Exceeds the limit"),
                               ("object", '{"a": ' * 3000 + "1" + "}" * 3000, "is not valid JSON")):
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=needle):
            read_json(tmp_path / name, "manifest")
    with open(tmp_path / "big", "wb") as f:
        f.truncate(MAX_JSON_BYTES + 1)
    with pytest.raises(UserError, match=r"manifest .*big is 256 MiB; a JSON file ckptkd reads is at most 256 MiB"):
        read_json(tmp_path / "big", "manifest")
    (tmp_path / "fine").write_text(json.dumps({"a": [[1, 2]], "b": 10 ** 300}))
    assert read_json(tmp_path / "fine") == {"a": [[1, 2]], "b": 10 ** 300}


def test_a_model_too_large_for_this_machine_is_refused_before_its_weights_exist(monkeypatch):
    """Built on the meta device first: its size, 4x for training, against what is available; exactly enough is
    built."""
    import torch

    from ckptkd import memory
    from ckptkd.errors import UserError
    from ckptkd.models import TRAINING_COPIES, create

    weights = 4 * (64 * 100 + 100 + 100 * 10 + 10)  # mlp 64 -> 100 -> 10, float32
    monkeypatch.setattr(memory, "available_memory", lambda: TRAINING_COPIES * weights)
    model = create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[100])
    assert sum(p.numel() for p in model.parameters()) * 4 == weights and model.hidden[0].weight.device.type == "cpu"
    monkeypatch.setattr(memory, "available_memory", lambda: TRAINING_COPIES * weights - 1)
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters",
                        lambda self: pytest.fail("weights were made") if self.weight.device.type == "cpu" else None)
    with pytest.raises(UserError, match=r"model 'mlp' with model.widths=\[100\]: its 0.0 GiB of weights, held 4 "
                                        r"times in training, need 0.0 GiB"):
        create("mlp", num_classes=10, in_channels=1, image_size=8, widths=[100])


def test_running_out_of_memory_mid_run_is_one_line_and_the_run_is_marked_failed(tmp_path, monkeypatch):
    from ckptkd import train
    from ckptkd.errors import UserError
    from ckptkd.run import Run
    from ckptkd.training import loop

    def no_memory(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 4308000000 bytes")

    monkeypatch.setattr(loop, "evaluate", no_memory)
    with pytest.raises(UserError, match=r"out of memory training .*oom \(\[enforce fail .*\): the run stopped and "
                                        r"is marked failed \(saved: nothing yet\); train it again with a smaller "
                                        r"data.batch_size"):
        train(CONFIG, out=tmp_path / "oom", quiet=True)
    assert Run(tmp_path / "oom").manifest.status == "failed"
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error stays what it is
        train(CONFIG, out=tmp_path / "bug", quiet=True)


def test_models_of_impossible_shapes_are_refused_before_they_are_built():
    from ckptkd.errors import UserError
    from ckptkd.models import create

    for widths in ([0], 64, [8, -1], [True]):
        with pytest.raises(UserError, match=r"model.widths=.*: it must be a list of layer widths of at least 1"):
            create("mlp", num_classes=10, in_channels=1, image_size=8, widths=widths)
    # it used to build 100,000 layers on the meta device first (82 s, 1.4 GB) to be refused for their size
    with pytest.raises(UserError, match=r"wrn_100000_1': WRN depth at most 1204 and width at most 100"):
        create("wrn_100000_1", num_classes=10, in_channels=3, image_size=32)


def test_a_teacher_cache_folder_that_cannot_be_written_says_what_to_set(tmp_path, teacher_run, monkeypatch):
    """A teacher in a read-only folder: its default cache (RUN/cache) cannot be written; the one line names
    kd.cache_dir and kd.cache before any teacher forward is spent."""
    import tempfile as tempfile_mod

    from ckptkd import distill
    from ckptkd.errors import UserError

    teacher = tmp_path / "shared" / "t"  # a copy: the session's teacher may have a cache already
    shutil.copytree(teacher_run.path, teacher, ignore=shutil.ignore_patterns("cache"))
    real = tempfile_mod.NamedTemporaryFile

    def read_only(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(teacher):
            raise OSError(30, "Read-only file system", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile_mod, "NamedTemporaryFile", read_only)
    cfg = tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1}, kd={"cache": "on"})
    with pytest.raises(UserError, match=r"cannot write the teacher cache into .*cache \(Read-only file system\): "
                                        r"set kd.cache_dir to a folder you can write, or kd.cache: off"):
        distill(cfg, teachers=[f"{teacher}@0.5"], out=tmp_path / "s", quiet=True)
    assert not (teacher / "cache").exists() or not any((teacher / "cache").iterdir())
    cfg["kd"]["cache_dir"] = str(tmp_path / "my-cache")
    assert distill(cfg, teachers=[f"{teacher}@0.5"], out=tmp_path / "s2", quiet=True).manifest.complete
