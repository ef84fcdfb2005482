"""The shipped student recipes distill without diverging on every kind of data we read: digits, Fashion-MNIST, an
npz archive and an image folder. Each trains a small teacher, then a student under it for a few epochs with the
recipe's optimiser, schedule shape (warm-up included) and KD settings, and checks that run health stays clear."""

import os

import numpy as np
import pytest
from PIL import Image

from ckptkd import distill, train

from conftest import REPO

FASHION = "/usr/share/datasets/fashion-mnist"
QUIET = {"log.progress": False, "log.tensorboard": False, "device": "cpu"}


def _learnable_images(n: int, size: int, channels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright square at one of four places, with noise: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 4
    x = rng.integers(0, 120, size=(n, size, size, channels), dtype=np.uint8)
    half = size // 2
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 2)
        x[i, r * half:(r + 1) * half, q * half:(q + 1) * half] += 100
    return x, labels


def _npz(tmp_path) -> dict:
    x, y = _learnable_images(400, 16, 3, seed=0)
    np.savez(tmp_path / "mine.npz", x_train=x[:320], y_train=y[:320], x_test=x[320:], y_test=y[320:])
    return {"data.name": "npz", "data.root": str(tmp_path / "mine.npz"), "data.batch_size": 32}


def _folder(tmp_path) -> dict:
    x, y = _learnable_images(240, 12, 1, seed=1)
    for i, (image, label) in enumerate(zip(x, y)):
        split = "test" if i % 5 == 0 else "train"
        folder = tmp_path / "pets" / split / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
    return {"data.name": "folder", "data.root": str(tmp_path / "pets"), "data.batch_size": 32}


def _fashion(_tmp_path) -> dict:
    return {"data.name": "fashion-mnist", "data.root": FASHION, "data.subset": 600, "data.val_fraction": 0.005}


SOURCES = {"digits": lambda _: {}, "npz": _npz, "folder": _folder, "fashion-mnist": _fashion}
# (student recipe, teacher recipe) shipped together; the digits recipes serve any small data set.
RECIPES = {"digits": ("digits_student.yaml", "digits_teacher.yaml"),
           "npz": ("digits_student.yaml", "digits_teacher.yaml"),
           "folder": ("digits_student.yaml", "digits_teacher.yaml"),
           "fashion-mnist": ("fashion_kd_student.yaml", "fashion_kd_teacher.yaml")}


@pytest.mark.parametrize("source", list(SOURCES))
def test_shipped_student_recipe_stays_healthy_under_kd(tmp_path, source):
    if source == "fashion-mnist" and not os.path.isdir(FASHION):
        pytest.skip("dataset-fashion-mnist not installed")
    data = SOURCES[source](tmp_path)
    student, teacher = RECIPES[source]
    # Short runs, same rates: the schedule keeps its shape (milestones are fractions, the warm-up its epochs).
    t = train(str(REPO / "configs" / teacher), out=tmp_path / "t", quiet=True,
              overrides={**QUIET, **data, "schedule.epochs": 8, "checkpoints.fractions": [0.5, 1.0]})
    assert t.manifest.health["ok"], t.manifest.health
    s = distill(str(REPO / "configs" / student), teachers=[t.ref("0.5"), t.ref("last")], out=tmp_path / "s",
                quiet=True, overrides={**QUIET, **data, "schedule.epochs": 8})
    manifest = s.manifest
    assert manifest.health == {"ok": True, "flags": []}
    assert manifest.final.train_acc > 0.5  # it learned, under the teachers


SCALE_RECIPES = [("tiny_imagenet_table.yaml", "tiny_imagenet_resnet34.yaml", "tiny_imagenet_students.yaml",
                  ("ResNet34", "ResNet18"), 8 * 3 + 1),
                 ("imagenet_table.yaml", "imagenet_resnet50.yaml", "imagenet_students.yaml",
                  ("resnet50", "mobilenet_v2"), 6 * 3 + 1)]


@pytest.mark.parametrize("table, teacher, student, models, at_least", SCALE_RECIPES, ids=["tiny-imagenet", "imagenet"])
def test_tiny_imagenet_and_imagenet_recipes_validate_and_read_their_layouts(tmp_path, table, teacher, student,
                                                                             models, at_least):
    """The configs resolve, their study plans (teacher, analysis, every variant x seed), and their data sections read
    fixtures in their layouts: Tiny-ImageNet's in memory at 64 px, ImageNet's streamed at 224 px."""
    import numpy as np

    from ckptkd import config, data as data_mod
    from ckptkd.data.photos import write_photo_folder
    from ckptkd.study.config import resolve_study
    from ckptkd.study.plan import plan
    from test_sources import _write_tiny_imagenet

    root = tmp_path / "data"
    if "tiny" in table:
        root.mkdir()
        _write_tiny_imagenet(root, np.random.default_rng(0), size=64)
    else:
        write_photo_folder(root, classes=3, train_per_class=140, test_per_class=2, sizes=(40, 60), modes=False)
    cfgs = [config.resolve(str(REPO / "configs" / name), {"data.root": str(root), "data.val_fraction": 0.34}
                           if "tiny" in table else {"data.root": str(root)}) for name in (teacher, student)]
    assert [c["model"]["name"] for c in cfgs] == list(models)
    for cfg in cfgs:
        data = data_mod.build(cfg["data"])
        assert data.streaming == ("tiny" not in table)
        assert data.image_shape == ((3, 64, 64) if "tiny" in table else (3, 224, 224))
        assert [round(float(v), 3) for v in data.mean] == [0.485, 0.456, 0.406]
    study = resolve_study(str(REPO / "configs" / table), {"common.data.root": str(root)})
    assert len(plan(study)) >= at_least
