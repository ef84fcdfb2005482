"""The streaming image source: ImageNet-layout folders of mixed sizes and modes, Tiny-ImageNet's layout and WebDataset
shards, decoded in worker processes with each run's order and augmentation a function of (seed, epoch) alone."""

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from ckptkd import config, data as data_mod, distill, train
from ckptkd.data.photos import write_photo_folder
from ckptkd.data.streaming import RATIO, StreamingData, Views
from ckptkd.errors import UserError
from ckptkd.selection.analysis import analyze, select

from conftest import manifest_json, run_cli, stop_after_epoch
from test_sources import _write_tiny_imagenet


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """3 classes of JPEG and PNG crops, 40-96 px of mixed aspect, some grayscale, palette or RGBA."""
    return write_photo_folder(tmp_path_factory.mktemp("photos"), classes=3, train_per_class=8, test_per_class=3)


def streamed(root, **data) -> StreamingData:
    cfg = config.resolve({"data": {"name": "imagenet", "root": str(root), "image_size": 24, "workers": 0,
                                   "val_fraction": 0.25, **data}})
    built = data_mod.build(cfg["data"])
    assert isinstance(built, StreamingData)
    return built


def student_config(root, **sections) -> dict:
    cfg = {"name": "streamed", "seed": 0, "device": "cpu",
           "data": {"name": "imagenet", "root": str(root), "image_size": 24, "workers": 2, "val_fraction": 0.25,
                    "batch_size": 6},
           "model": {"name": "resnet8"}, "optim": {"lr": 0.05},
           "schedule": {"name": "cosine", "epochs": 3}, "checkpoints": {"fractions": [0.5, 1.0]},
           "log": {"progress": False, "tensorboard": False}}
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    return cfg


def test_the_fixture_mixes_sizes_formats_and_modes(photos):
    files = sorted((photos / "train").rglob("*.*")) + sorted((photos / "val").rglob("*.*"))
    with_pil = [Image.open(f) for f in files]
    assert len({im.size for im in with_pil}) > 10
    assert {im.format for im in with_pil} == {"JPEG", "PNG"}
    assert {"RGB", "L", "P", "RGBA"} <= {im.mode for im in with_pil}
    assert len(list((photos / "train").iterdir())) == 3


def test_mixed_sizes_stream_on_auto_and_equal_sizes_stay_in_memory(photos, tmp_path):
    assert streamed(photos, resident="auto").image_shape == (3, 24, 24)
    same = tmp_path / "same"
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (same / split / f"c{c}").mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(same / split / f"c{c}" /
                                                                                        f"{i}.png")
    resident = data_mod.build(config.resolve({"data": {"name": "imagenet", "root": str(same),
                                                       "val_fraction": 0.25}})["data"])
    assert not resident.streaming and resident.image_shape == (3, 12, 12)
    forced = data_mod.build(config.resolve({"data": {"name": "imagenet", "root": str(same), "val_fraction": 0.25,
                                                     "resident": False, "image_size": 8, "workers": 0}})["data"])
    assert forced.streaming and forced.image_shape == (3, 8, 8)
    with pytest.raises(UserError, match="data.image_size applies to streamed images"):
        data_mod.build(config.resolve({"data": {"name": "imagenet", "root": str(same), "image_size": 8}})["data"])
    with pytest.raises(UserError, match="all images must share one size"):
        data_mod.build(config.resolve({"data": {"name": "imagenet", "root": str(photos), "resident": True}})["data"])
    with pytest.raises(UserError, match="data.resident: false streams image trees"):
        data_mod.build(config.resolve({"data": {"name": "digits", "resident": False}})["data"])
    with pytest.raises(UserError, match=r"data.scale applies to streamed images; digits .* \(only folder, "):
        data_mod.build(config.resolve({"data": {"name": "digits", "scale": [0.5, 1.0]}})["data"])


def _epoch(data, seed, epoch, batch_size=5):
    return list(data.train_batches(seed=seed, epoch=epoch, batch_size=batch_size))


def test_batches_are_a_function_of_seed_and_epoch_not_of_the_workers(photos):
    alone = _epoch(streamed(photos, workers=0), 3, 2)
    pooled = streamed(photos, workers=2)
    assert len(alone) == pooled.steps_per_epoch(5) == 18 // 5
    for a, b in zip(alone, _epoch(pooled, 3, 2)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)
    other_epoch, other_seed = _epoch(pooled, 3, 3), _epoch(pooled, 4, 2)
    assert not torch.equal(alone[0].x, other_epoch[0].x) and not torch.equal(alone[0].x, other_seed[0].x)
    # every training image once per epoch (the ragged tail dropped), each with its own label
    seen = torch.cat([b.index for b in alone])
    assert len(set(seen.tolist())) == len(seen) == 15
    data = streamed(photos)
    assert torch.equal(torch.cat([b.y for b in alone]), data.train_y[seen])


def test_rank_slices_make_up_the_global_batch(photos):
    data = streamed(photos)
    plans = [data.epoch_plan(seed=s, epoch=1) for s in (0, 1)]
    whole = list(data.group_batches(plans, 6))
    halves = [list(data.group_batches(plans, 6, rank=r, world_size=2)) for r in (0, 1)]
    for w, a, b in zip(whole, *halves):
        assert w.x.shape[:2] == (2, 6) and a.x.shape[:2] == (2, 3)
        assert torch.equal(torch.cat([a.x, b.x], 1), w.x) and torch.equal(torch.cat([a.y, b.y], 1), w.y)
    # each member of a group sees what it would see alone
    assert torch.equal(whole[0].x[1], _epoch(data, 1, 1, 6)[0].x)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 4000), height=st.integers(1, 4000), key=st.integers(0, 2**62 - 1),
       low=st.floats(0.01, 1.0))
def test_random_resized_crops_stay_inside_and_follow_scale_and_ratio(width, height, key, low):
    views = Views(size=32, resize=37, scale=(low, 1.0), hflip=True, augment=True)
    box, flip = views.random_resized(width, height, key)
    assert views.random_resized(width, height, key) == (box, flip)  # the key alone decides
    left, top, right, bottom = box
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    if (w, h) != (width, height) and not (w == width or h == height):  # not torchvision's fallback crop
        assert low * width * height * 0.9 - 2 * (w + h) <= w * h <= width * height
        assert RATIO[0] * 0.9 <= w / h <= RATIO[1] * 1.1 or min(w, h) < 10


def test_evaluation_takes_the_centre_crop_of_the_resized_image(tmp_path):
    """A 100x50 image whose red channel is the column: resize to 40 (shorter side) then centre-crop 32 keeps the
    middle 80% of the 50-pixel height, hence columns 30..70 of 100."""
    columns = np.tile(np.linspace(0, 255, 100).astype(np.uint8), (50, 1))
    image = np.stack([columns, np.zeros_like(columns), np.zeros_like(columns)], axis=2)
    for split in ("train", "val"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(3):
                Image.fromarray(image).save(tmp_path / split / f"c{c}" / f"{i}.png")
    data = streamed(tmp_path, image_size=32, resize=40, resident=False, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    x, _ = next(data.eval_batches("test", 6))
    red = x[0, 0] * 255
    assert red[:, 0].mean() == pytest.approx(255 * 30.5 / 99, abs=4)
    assert red[:, -1].mean() == pytest.approx(255 * 69.5 / 99, abs=4)
    assert torch.equal(x[0], x[5])


def test_a_photo_tree_trains_distills_analyses_selects_and_resumes_bit_identically(photos, tmp_path, monkeypatch):
    """The issue's whole path through streamed data: a teacher, a student from @0.5 and one from a snapshot
    ensemble, the analysis and T*, and a teacher interrupted after epoch 1 that resumes to the same weights."""
    cfg = student_config(photos)
    teacher = train(cfg, out=tmp_path / "teacher", quiet=True)
    manifest = manifest_json(tmp_path / "teacher")
    assert manifest["status"] == "complete" and manifest["data"]["streamed"] is True
    assert manifest["data"]["image_shape"] == [3, 24, 24] and manifest["data"]["train"] == 18

    undo = stop_after_epoch(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "stopped", quiet=True)
    undo()
    resumed = train(cfg, out=tmp_path / "stopped", resume=True, quiet=True)
    assert [c.sha256 for c in resumed.manifest.checkpoints] == [c.sha256 for c in teacher.manifest.checkpoints]

    student = student_config(photos, name="student", kd={"temperature": 4.0, "alpha": 0.5})
    half = distill(student, [f"{tmp_path / 'teacher'}@0.5"], out=tmp_path / "half", quiet=True)
    snapshot = distill(student, [f"{tmp_path / 'teacher'}@0.5,1.0"], out=tmp_path / "snapshot", quiet=True)
    plain = distill(student, None, out=tmp_path / "plain", quiet=True)
    assert [t["epoch"] for t in manifest_json(tmp_path / "half")["teachers"]] == [2]  # 0.5 of 3 epochs
    assert [t["epoch"] for t in manifest_json(tmp_path / "snapshot")["teachers"]] == [2, 3]
    # the teachers shaped the students: three different trajectories from one seed and one data order
    finals = {r.manifest.checkpoints[-1].sha256 for r in (half, snapshot, plain)}
    assert len(finals) == 3

    analysis = analyze(tmp_path / "teacher", quiet=True, seeds=2, plots=False)
    assert [c["epoch"] for c in analysis["checkpoints"]] == [2, 3]
    assert analysis["splits"]["train"]["n"] == 18 and analysis["checkpoints"][0]["train"]["n"] == 18
    chosen = select(tmp_path / "teacher")
    assert chosen["t_star"] in (2, 3) and chosen["references"] == [f"{tmp_path / 'teacher'}@epoch={chosen['t_star']}"]


def test_a_bad_image_mid_epoch_is_one_line_naming_it(photos, tmp_path):
    import shutil
    tree = tmp_path / "tree"
    shutil.copytree(photos, tree)
    victim = sorted((tree / "train" / "class001").glob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])  # cut off: the header reads, the pixels do not
    data = streamed(tree, workers=2, val_fraction=0.1, mean=[0.5] * 3, std=[0.25] * 3)  # nothing decoded yet
    with pytest.raises(UserError) as caught:
        for split in ("train", "val", "test"):
            list(data.eval_batches(split, 4))
    assert str(victim) in str(caught.value) and "\n" not in str(caught.value)
    assert "Traceback" not in str(caught.value)


def test_the_teacher_cache_is_refused_with_its_arithmetic_and_auto_runs_online(photos, tmp_path):
    teacher = train(student_config(photos, schedule={"name": "cosine", "epochs": 1},
                                   checkpoints={"fractions": [1.0]}), out=tmp_path / "t", quiet=True)
    cfg = student_config(photos, name="s", schedule={"name": "cosine", "epochs": 1}, kd={"cache": "on"})
    with pytest.raises(UserError, match=r"32 views of 18 images x 3 classes is 0\.01 MiB"):
        distill(cfg, [f"{teacher.path}@1.0"], out=tmp_path / "s", quiet=True)
    cfg["kd"]["cache"] = "auto"
    assert distill(cfg, [f"{teacher.path}@1.0"], out=tmp_path / "s2", quiet=True).manifest.status == "complete"


def test_a_padding_is_refused_for_streamed_images_rather_than_ignored(photos, tmp_path):
    cfg = student_config(photos, data={"pad": 4})
    with pytest.raises(UserError, match="data.pad applies to images held in memory.*data.resident: true"):
        train(cfg, out=tmp_path / "t", quiet=True)
    assert not (tmp_path / "t").exists()


def test_tiny_imagenet_layout_streams(tmp_path):
    layout = _write_tiny_imagenet(tmp_path, np.random.default_rng(5), size=20)
    data = data_mod.build(config.resolve({"data": {"name": "tiny-imagenet", "root": str(tmp_path),
                                                   "resident": False, "workers": 0,
                                                   "val_fraction": 0.34}})["data"])
    assert data.streaming and data.image_shape == (3, 64, 64)  # Tiny-ImageNet's default size
    assert data.test_y.tolist() == layout["val_labels"]
    assert data.class_names[0] == "goldfish"
    x, y = next(data.eval_batches("test", 4))
    assert x.shape == (4, 3, 64, 64) and y.tolist() == layout["val_labels"]


def write_shards(folder_root: Path, out: Path, per_shard: int = 7) -> Path:
    """The images of an image tree as WebDataset shards (root/train/*.tar, root/val/*.tar), in the tree's order."""
    classes = sorted(p.name for p in (folder_root / "train").iterdir())
    (out).mkdir(parents=True)
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    for split in ("train", "val"):
        (out / split).mkdir()
        samples = [(path, label) for label, c in enumerate(classes)
                   for path in sorted((folder_root / split / c).iterdir())]
        for s in range(0, len(samples), per_shard):
            with tarfile.open(out / split / f"shard-{s // per_shard:06d}.tar", "w") as tar:
                for j, (path, label) in enumerate(samples[s:s + per_shard]):
                    key = f"{s + j:08d}"
                    for name, payload in ((f"{key}.{path.suffix[1:].lower()}", path.read_bytes()),
                                          (f"{key}.cls", str(label).encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        tar.addfile(info, io.BytesIO(payload))
    return out


def test_webdataset_shards_stream_the_same_images_as_the_folder(photos, tmp_path):
    shards = write_shards(photos, tmp_path / "shards")
    from_shards = data_mod.build(config.resolve({"data": {"name": "webdataset", "root": str(shards),
                                                          "image_size": 24, "workers": 2, "val_fraction": 0.25,
                                                          "hflip": True}})["data"])
    from_folder = streamed(photos, hflip=True)
    assert from_shards.class_names == from_folder.class_names
    assert torch.equal(from_shards.mean, from_folder.mean)
    for a, b in zip(_epoch(from_shards, 0, 1), _epoch(from_folder, 0, 1)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    for split in ("val", "test"):
        for (xa, ya), (xb, yb) in zip(from_shards.eval_batches(split, 4), from_folder.eval_batches(split, 4)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_webdataset_errors_are_one_line(photos, tmp_path):
    def build(root, **data):
        return data_mod.build(config.resolve({"data": {"name": "webdataset", "root": str(root), **data}})["data"])

    with pytest.raises(UserError, match="no train shards"):
        build(tmp_path)
    shards = write_shards(photos, tmp_path / "shards")
    with pytest.raises(UserError, match="always streamed"):
        build(shards, resident=True)
    broken = tmp_path / "broken"
    (broken / "train").mkdir(parents=True)
    (broken / "val").mkdir()
    with tarfile.open(broken / "train" / "a.tar", "w") as tar:
        info = tarfile.TarInfo("x1.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(UserError, match="sample 'x1' has an image but no .cls label"):
        build(broken)
    (broken / "train" / "a.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(UserError, match="not a readable uncompressed tar shard"):
        build(broken)


def test_the_cli_trains_on_a_streamed_folder(photos, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config.dump(student_config(photos, schedule={"name": "cosine", "epochs": 1},
                                              checkpoints={"fractions": [1.0]})))
    result = run_cli("train", str(cfg), "--out", str(tmp_path / "r"), "--set", "data.workers=1")
    assert result.returncode == 0, result.stderr
    assert math.isfinite(manifest_json(tmp_path / "r")["final"]["test_acc"])


def test_images_rewritten_in_place_change_the_fingerprint_and_a_resume_onto_them_is_refused(photos, tmp_path,
                                                                                        monkeypatch):
    """Streamed data is named by its files' paths and sizes and a sample of their bytes: rotating every image in
    place (same paths, same sizes for most) is other data, and a run interrupted on the old images does not resume
    onto the new ones."""
    import shutil

    from ckptkd.data import _INDEX_CACHE

    tree = tmp_path / "tree"
    shutil.copytree(photos, tree)
    cfg = student_config(tree, schedule={"name": "cosine", "epochs": 2}, checkpoints={"fractions": [1.0]},
                         data={"workers": 0})
    before = streamed(tree).fingerprint
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "run", quiet=True)
    undo()
    for image in sorted(tree.rglob("*.*")):
        with Image.open(image) as im:
            turned = im.rotate(180)
        turned.save(image, format=Image.open(image).format)
    _INDEX_CACHE.clear()  # a new process would list the folder afresh
    assert streamed(tree).fingerprint != before
    with pytest.raises(UserError, match=r"--resume: .* was trained on data \w+ but its data config gives \w+ now"):
        train(cfg, out=tmp_path / "run", resume=True, quiet=True)


def test_the_number_of_workers_is_not_part_of_a_runs_identity(photos, tmp_path, monkeypatch):
    """Batches do not depend on data.workers, so neither does a task's identity, and a run resumes under another
    count (a laptop run continued on a node with more cores)."""
    two, none = (config.resolve(student_config(photos, data={"workers": w})) for w in (2, 0))
    assert config.identity(two) == config.identity(none)
    assert config.identity(two) != config.identity(config.resolve(student_config(photos, data={"image_size": 16})))
    undo = stop_after_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(two, out=tmp_path / "run", quiet=True)
    undo()
    assert train(none, out=tmp_path / "run", resume=True, quiet=True).manifest.status == "complete"


def test_imagenet_takes_its_labelled_val_split_beside_an_unlabelled_test_folder(photos, tmp_path):
    import shutil

    tree = tmp_path / "ilsvrc"
    shutil.copytree(photos, tree)
    (tree / "test").mkdir()  # ILSVRC's test set: images without class folders
    shutil.copy(next((tree / "val" / "class000").iterdir()), tree / "test" / "ILSVRC2012_test_00000001.JPEG")
    data = streamed(tree, mean=[0.5] * 3, std=[0.25] * 3)
    assert data.index.test.count == 9 and "/val/" in data.index.test.where(0)


def test_webdataset_names_members_and_refuses_compressed_or_doubled_samples(photos, tmp_path):
    import gzip

    shards = write_shards(photos, tmp_path / "shards")
    first = sorted((shards / "train").iterdir())[0]
    # a member that is not an image: named by shard and member, with no Python object in the message
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(first, "w") as tar:
        for info, payload in members:
            payload = b"not an image" * 10 if info.name.endswith(("jpeg", "png")) and not members.index(
                (info, payload)) else payload
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    data = data_mod.build(config.resolve({"data": {"name": "webdataset", "root": str(shards), "workers": 0,
                                                   "val_fraction": 0.25, "mean": [0.5] * 3,
                                                   "std": [0.25] * 3}})["data"])
    with pytest.raises(UserError) as caught:
        list(data.eval_batches("train", 8)) + list(data.eval_batches("val", 8))
    assert f"{first}:{members[0][0].name}: cannot read image" in str(caught.value)
    assert "BytesIO" not in str(caught.value) and "0x" not in str(caught.value)
    first.write_bytes(gzip.compress(first.read_bytes()))
    with pytest.raises(UserError, match="is gzip-compressed; shards are read by offset: gunzip it"):
        data_mod._INDEX_CACHE.clear()
        data_mod.build(config.resolve({"data": {"name": "webdataset", "root": str(shards)}})["data"])
    doubled = tmp_path / "doubled"
    (doubled / "train").mkdir(parents=True)
    with tarfile.open(doubled / "train" / "a.tar", "w") as tar:
        for name in ("x1.jpg", "x1.png", "x1.cls"):
            info = tarfile.TarInfo(name)
            info.size = 1
            tar.addfile(info, io.BytesIO(b"0"))
    with pytest.raises(UserError, match=r"sample 'x1' has two images \(x1.jpg, x1.png\)"):
        data_mod.build(config.resolve({"data": {"name": "webdataset", "root": str(doubled)}})["data"])
