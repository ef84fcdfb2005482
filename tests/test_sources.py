"""Raw data-set readers: real small data plus fixture files written in each source's real format."""

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ckptkd.data.sources import FASHION_MNIST_DIR, SOURCES, RawData, load_raw
from ckptkd.errors import UserError

from conftest import tiny_config
from fixtures import write_py2_pickle


def _check_layout(raw: RawData, n_train: int, n_test: int, shape: tuple[int, int, int]):
    assert raw.train_x.dtype == torch.uint8 and raw.test_x.dtype == torch.uint8
    assert raw.train_y.dtype == torch.int64 and raw.test_y.dtype == torch.int64
    assert raw.train_x.shape == (n_train, *shape) and raw.test_x.shape == (n_test, *shape)
    assert raw.train_y.shape == (n_train,) and raw.test_y.shape == (n_test,)
    assert raw.train_x.is_contiguous() and raw.test_x.is_contiguous()
    assert raw.image_shape == shape
    assert len(raw.class_names) == raw.num_classes


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(UserError, match="mnist-typo") as err:
        load_raw("mnist-typo", None)
    assert all(name in str(err.value) for name in SOURCES)


# --- digits -------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_fixed():
    raw = load_raw("digits", None)
    _check_layout(raw, 1438, 359, (1, 8, 8))
    assert raw.name == "digits" and raw.class_names == [str(c) for c in range(10)] and not raw.hflip
    assert raw.train_x.max() == 255 and raw.train_x.min() == 0
    test_counts = torch.bincount(raw.test_y, minlength=10)
    all_counts = test_counts + torch.bincount(raw.train_y, minlength=10)
    assert torch.all((test_counts - 0.2 * all_counts).abs() <= 0.5)

    again = load_raw("digits", "/ignored")
    for a, b in ((raw.train_x, again.train_x), (raw.train_y, again.train_y),
                 (raw.test_x, again.test_x), (raw.test_y, again.test_y)):
        assert torch.equal(a, b)


# --- fashion-mnist ------------------------------------------------------------------------------


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason=f"{FASHION_MNIST_DIR} absent (Debian package dataset-fashion-mnist)")
def test_fashion_mnist_real_files():
    raw = load_raw("fashion-mnist", None)
    _check_layout(raw, 60000, 10000, (1, 28, 28))
    assert raw.num_classes == 10 and raw.class_names[9] == "Ankle boot" and raw.hflip
    assert torch.equal(torch.bincount(raw.train_y), torch.full((10,), 6000))


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx_folder(folder: Path, gz: bool, rng) -> dict[str, np.ndarray]:
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 4, 3)),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 5),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 4, 3)),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 2),
    }
    folder.mkdir()
    for stem, array in arrays.items():
        data = _idx_bytes(array)
        if gz:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / stem).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_fixture_round_trip(tmp_path, gz):
    arrays = _write_idx_folder(tmp_path / "idx", gz, np.random.default_rng(1))
    raw = load_raw("fashion-mnist", str(tmp_path / "idx"))
    _check_layout(raw, 5, 2, (1, 4, 3))
    assert np.array_equal(raw.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(raw.train_y.numpy(), arrays["train-labels-idx1-ubyte"])
    assert np.array_equal(raw.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(raw.test_y.numpy(), arrays["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_idx_file_is_named(tmp_path, gz):
    folder = tmp_path / "idx"
    _write_idx_folder(folder, gz, np.random.default_rng(2))
    victim = folder / ("train-images-idx3-ubyte" + (".gz" if gz else ""))
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(UserError, match="train-images-idx3-ubyte") as err:
        load_raw("fashion-mnist", str(folder))
    assert "\n" not in str(err.value)


def test_idx_label_count_mismatch(tmp_path):
    folder = tmp_path / "idx"
    _write_idx_folder(folder, False, np.random.default_rng(3))
    (folder / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(4)))
    with pytest.raises(UserError, match="5 images .* 4 labels"):
        load_raw("fashion-mnist", str(folder))


def test_missing_idx_folder_and_files(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nowhere'}.*dataset-fashion-mnist"):
        load_raw("fashion-mnist", str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=f"no idx files in {tmp_path}"):
        load_raw("fashion-mnist", str(tmp_path))


# --- CIFAR --------------------------------------------------------------------------------------


def _write_cifar10(folder: Path, rng) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    write_py2_pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": 3, b"num_vis": 3072})
    batches = {}
    for file in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, 3)]
        batches[file] = (data, labels)
        write_py2_pickle(folder / file, {
            b"batch_label": file.encode(), b"data": data, b"labels": labels,
            b"filenames": [f"img_{i}.png".encode() for i in range(3)],
        })
    return batches


def test_cifar10_round_trip(tmp_path):
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(4))
    first = batches["data_batch_1"][0]
    first[1, 1024 * 2 + 32 * 5 + 7] = 201  # image 1, blue, row 5, column 7
    write_py2_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_1", {b"data": first, b"labels": batches["data_batch_1"][1]})

    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        raw = load_raw("cifar10", str(root))
        _check_layout(raw, 15, 3, (3, 32, 32))
        assert raw.class_names[1] == "automobile" and raw.num_classes == 10 and raw.hflip
        assert raw.train_x[1, 2, 5, 7] == 201
        train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
        assert np.array_equal(raw.train_x.numpy().reshape(15, 3072), np.concatenate([d for d, _ in train]))
        assert raw.train_y.tolist() == sum((labels for _, labels in train), [])
        assert np.array_equal(raw.test_x.numpy().reshape(3, 3072), batches["test_batch"][0])
        assert raw.test_y.tolist() == batches["test_batch"][1]


def test_cifar100_round_trip(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class_{i}".encode() for i in range(100)]
    write_py2_pickle(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    written = {}
    for file, n in (("train", 4), ("test", 2)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 100, n)]
        written[file] = (data, labels)
        write_py2_pickle(folder / file, {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * n})

    raw = load_raw("cifar100", str(tmp_path))
    _check_layout(raw, 4, 2, (3, 32, 32))
    assert raw.num_classes == 100 and raw.class_names[42] == "class_42"
    data, labels = written["train"]
    assert raw.train_x[3, 0, 31, 0] == data[3, 31 * 32] and raw.train_x[2, 1, 0, 31] == data[2, 1024 + 31]
    assert np.array_equal(raw.train_x.numpy().reshape(4, 3072), data) and raw.train_y.tolist() == labels
    assert np.array_equal(raw.test_x.numpy().reshape(2, 3072), written["test"][0])


def test_cifar_needs_a_root(tmp_path):
    with pytest.raises(UserError, match="data.root.*cifar-10-batches-py.*cs.toronto.edu"):
        load_raw("cifar10", None)
    with pytest.raises(UserError, match=f"no cifar-100-python in {tmp_path}"):
        load_raw("cifar100", str(tmp_path))


class _Payload:
    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("kind", ["os.system", "builtins.open"])
def test_malicious_cifar_pickle_is_refused(tmp_path, kind):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(6))
    canary = tmp_path / "pwned"
    payload = _Payload(os.system, (f"touch {canary}",)) if kind == "os.system" else _Payload(open, (str(canary), "w"))
    (folder / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=2))

    with pytest.raises(UserError, match="data_batch_1.*refusing to unpickle global") as err:
        load_raw("cifar10", str(folder))
    assert ("system" if kind == "os.system" else "open") in str(err.value)
    assert not canary.exists()


def test_corrupt_cifar_pickle_is_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar10(folder, np.random.default_rng(7))
    (folder / "test_batch").write_bytes((folder / "test_batch").read_bytes()[:500])
    with pytest.raises(UserError, match="test_batch"):
        load_raw("cifar10", str(folder))


# --- npz ----------------------------------------------------------------------------------------


def test_npz_gray_and_channels_last(tmp_path):
    rng = np.random.default_rng(8)
    gray = rng.integers(0, 256, (4, 5, 6), dtype=np.uint8)
    np.savez(tmp_path / "gray.npz", x_train=gray, y_train=np.array([0, 1, 2, 1]),
             x_test=gray[:2], y_test=np.array([2, 0]))
    raw = load_raw("npz", str(tmp_path / "gray.npz"))
    _check_layout(raw, 4, 2, (1, 5, 6))
    assert np.array_equal(raw.train_x[:, 0].numpy(), gray) and raw.class_names == ["0", "1", "2"] and not raw.hflip

    color = rng.integers(0, 256, (3, 5, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "color.npz", x_train=color, y_train=np.array([[0], [1], [0]]),
             x_test=color[:1].astype(np.float32) / 255, y_test=np.array([[1]]),
             class_names=np.array(["cat", "dog"]))
    raw = load_raw("npz", str(tmp_path / "color.npz"))
    _check_layout(raw, 3, 1, (3, 5, 6))
    assert raw.train_x[2, 1, 4, 5] == color[2, 4, 5, 1]
    assert np.array_equal(raw.test_x.numpy(), color[:1].transpose(0, 3, 1, 2))
    assert raw.train_y.tolist() == [0, 1, 0] and raw.class_names == ["cat", "dog"]


def test_npz_errors(tmp_path):
    x = np.zeros((2, 3, 3), dtype=np.uint8)
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=np.array([0, 1]), x_test=x)
    with pytest.raises(UserError, match="partial.npz.*'y_test'"):
        load_raw("npz", str(tmp_path / "partial.npz"))

    np.savez(tmp_path / "ints.npz", x_train=x.astype(np.int64), y_train=np.array([0, 1]), x_test=x, y_test=np.array([0]))
    with pytest.raises(UserError, match="'x_train' has dtype int64"):
        load_raw("npz", str(tmp_path / "ints.npz"))

    np.savez(tmp_path / "names.npz", x_train=x, y_train=np.array([0, 3]), x_test=x, y_test=np.array([0, 1]),
             class_names=np.array(["a", "b"]))
    with pytest.raises(UserError, match="train label 3 is outside 0..1"):
        load_raw("npz", str(tmp_path / "names.npz"))

    (tmp_path / "junk.npz").write_bytes(b"not an archive at all")
    with pytest.raises(UserError, match="junk.npz"):
        load_raw("npz", str(tmp_path / "junk.npz"))
    with pytest.raises(UserError, match="missing.npz"):
        load_raw("npz", str(tmp_path / "missing.npz"))


# --- folder -------------------------------------------------------------------------------------


def _write_tree(root: Path, mode: str, rng, size=(6, 4)) -> dict[str, dict[str, np.ndarray]]:
    """Two classes, PNG only (lossless) so pixels read back exactly; size is (width, height)."""
    shape = (size[1], size[0]) + (() if mode == "L" else (3,))
    tree = {}
    for split, per_class in (("train", 2), ("test", 1)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / cls / f"{i}.png")
                tree[f"{split}/{cls}/{i}.png"] = pixels
    return tree


def _as_pil_layout(image: torch.Tensor) -> np.ndarray:
    """[C, H, W] back to PIL's [H, W] (grayscale) or [H, W, 3]."""
    return image[0].numpy() if image.shape[0] == 1 else image.numpy().transpose(1, 2, 0)


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_folder_round_trip(tmp_path, mode):
    tree = _write_tree(tmp_path, mode, np.random.default_rng(9))
    raw = load_raw("folder", str(tmp_path))
    channels = 1 if mode == "L" else 3
    _check_layout(raw, 4, 2, (channels, 4, 6))
    assert raw.class_names == ["cat", "dog"] and not raw.hflip
    assert raw.train_y.tolist() == [0, 0, 1, 1] and raw.test_y.tolist() == [0, 1]
    assert np.array_equal(_as_pil_layout(raw.train_x[3]), tree["train/dog/1.png"])
    assert np.array_equal(_as_pil_layout(raw.test_x[0]), tree["test/cat/0.png"])


def test_folder_mixing_gray_and_rgb_reads_rgb(tmp_path):
    tree = _write_tree(tmp_path, "RGB", np.random.default_rng(10))
    gray = np.arange(24, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(gray, "L").save(tmp_path / "test" / "dog" / "0.png")
    raw = load_raw("folder", str(tmp_path))
    assert raw.image_shape == (3, 4, 6)
    assert all(np.array_equal(raw.test_x[1, c].numpy(), gray) for c in range(3))
    assert np.array_equal(_as_pil_layout(raw.train_x[0]), tree["train/cat/0.png"])


def test_folder_reads_webp_tiff_and_gif_and_notes_files_it_skips(tmp_path, capsys):
    from ckptkd import errors

    tree = _write_tree(tmp_path, "RGB", np.random.default_rng(12))
    pixels = tree["train/cat/0.png"]
    (tmp_path / "train" / "cat" / "0.png").unlink()
    Image.fromarray(pixels).save(tmp_path / "train" / "cat" / "0.webp", lossless=True)
    Image.fromarray(pixels).save(tmp_path / "train" / "dog" / "2.tiff")
    (tmp_path / "train" / "dog" / "labels.csv").write_text("not an image")
    (tmp_path / "train" / "dog" / ".DS_Store").write_bytes(b"\0")
    errors._noted.clear()
    raw = load_raw("folder", str(tmp_path))
    assert raw.train_y.tolist() == [0, 0, 1, 1, 1]
    assert np.array_equal(_as_pil_layout(raw.train_x[0]), pixels)  # lossless WebP, read back exactly
    assert np.array_equal(_as_pil_layout(raw.train_x[4]), pixels)  # dog/2.tiff
    err = capsys.readouterr().err
    assert f"skipped (first: {tmp_path / 'train' / 'dog' / 'labels.csv'})" in err and ".DS_Store" not in err


def test_folder_errors(tmp_path):
    _write_tree(tmp_path, "RGB", np.random.default_rng(11))
    Image.new("RGB", (5, 4)).save(tmp_path / "test" / "dog" / "odd.png")
    with pytest.raises(UserError, match="odd.png is 5x4 .* 6x4"):
        load_raw("folder", str(tmp_path))

    (tmp_path / "test" / "dog" / "odd.png").unlink()
    (tmp_path / "test" / "bird").mkdir()
    with pytest.raises(UserError, match="bird"):
        load_raw("folder", str(tmp_path))

    with pytest.raises(UserError, match=f"{tmp_path / 'nothing' / 'train'}"):
        load_raw("folder", str(tmp_path / "nothing"))


def test_npz_contents_that_would_exhaust_memory_or_divide_by_zero_are_named(tmp_path, capsys):
    x = np.zeros((2, 3, 3), dtype=np.uint8)

    def save(name, **arrays):
        np.savez(tmp_path / name, **{"x_train": x, "y_train": np.array([0, 1]), "x_test": x,
                                     "y_test": np.array([0, 1]), **arrays})
        return str(tmp_path / name)

    # One label of 2**40 used to make 2**40 class names (memory ran out); 3,000,000 trained a 3M-class model.
    with pytest.raises(UserError, match=r"'y_train' holds label 1,099,511,627,776.*at most 100,000"):
        load_raw("npz", save("huge.npz", y_train=np.array([0, 2 ** 40])))
    with pytest.raises(UserError, match=r"'y_test' holds label 3,000,000"):
        load_raw("npz", save("big.npz", y_test=np.array([0, 3_000_000])))
    with pytest.raises(UserError, match="empty.npz: the test split holds no images"):
        load_raw("npz", save("empty.npz", x_test=np.zeros((0, 3, 3), np.uint8), y_test=np.zeros(0, np.int64)))
    nan = np.full((2, 3, 3), 0.5, dtype=np.float32)
    nan[1, 2, 2] = np.nan
    with pytest.raises(UserError, match="'x_test' holds 1 NaN or infinite pixel values"):
        load_raw("npz", save("nan.npz", x_test=nan))
    # A test class the training images never show: loaded, with a note naming it.
    raw = load_raw("npz", save("unseen.npz", y_train=np.array([0, 1]), y_test=np.array([2, 1]),
                               class_names=np.array(["a", "b", "c"])))
    assert raw.num_classes == 3
    assert "test class c never appears in the training images" in capsys.readouterr().err


def test_a_16_bit_image_is_refused_and_an_alpha_channel_is_dropped_with_a_note(tmp_path, capsys):
    _write_tree(tmp_path, "RGB", np.random.default_rng(12))
    rgba = np.random.default_rng(13).integers(0, 256, (4, 6, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "train" / "cat" / "alpha.png")
    raw = load_raw("folder", str(tmp_path))
    assert np.array_equal(_as_pil_layout(raw.train_x[2]), rgba[..., :3])  # sorted: 0.png, 1.png, alpha.png
    assert "images with an alpha channel (first: " in capsys.readouterr().err
    Image.fromarray(np.full((4, 6), 40_000, dtype=np.uint16)).save(tmp_path / "test" / "dog" / "wide.png")
    with pytest.raises(UserError, match=r"wide.png: a I;16\S* image \(16-bit or float\)"):
        load_raw("folder", str(tmp_path))


# --- tiny-imagenet --------------------------------------------------------------------------------


def _write_tiny_imagenet(root: Path, rng, size: int = 16) -> dict:
    """Tiny-ImageNet-200's layout with 3 classes: wnids.txt, words.txt, train/WNID/images/WNID_i.JPEG (one of them
    grayscale, as some of the real ones are) with the boxes file beside, val/images/val_i.JPEG with
    val_annotations.txt, and the unlabelled test/images/ the loader leaves alone."""
    wnids = ["n01443537", "n01629819", "n01641577"]
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                                    "n09999999\tnot in this set\n")
    for wnid in wnids:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t10\t10\n")
        for i in range(3):
            mode = "L" if (wnid, i) == (wnids[1], 2) else "RGB"
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(images / f"{wnid}_{i}.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    annotations = []
    for i, wnid in enumerate([wnids[2], wnids[0], wnids[1], wnids[2]]):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "val" / "images" /
                                                                                   f"val_{i}.JPEG")
        annotations.append(f"val_{i}.JPEG\t{wnid}\t0\t1\t15\t15")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    Image.new("RGB", (size, size)).save(root / "test" / "images" / "test_0.JPEG")
    return {"wnids": wnids, "val_labels": [2, 0, 1, 2]}


def test_tiny_imagenet_layout_loads_with_val_as_test_and_class_names_from_words(tmp_path):
    layout = _write_tiny_imagenet(tmp_path, np.random.default_rng(21))
    raw = load_raw("tiny-imagenet", str(tmp_path))
    _check_layout(raw, 9, 4, (3, 16, 16))
    assert raw.class_names == ["goldfish", "European fire salamander", "n01641577"] and raw.hflip
    assert raw.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and raw.test_y.tolist() == layout["val_labels"]
    with Image.open(tmp_path / "val" / "images" / "val_1.JPEG") as im:
        assert np.array_equal(_as_pil_layout(raw.test_x[1]), np.asarray(im))
    gray = raw.train_x[5]  # n01629819_2, grayscale: the same plane in all three channels
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    from ckptkd import train

    run = train(tiny_config(data={"name": "tiny-imagenet", "root": str(tmp_path), "val_fraction": 0.34},
                            model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1}), out=tmp_path / "run",
                quiet=True)
    assert run.manifest.data["num_classes"] == 3 and run.manifest.final is not None


def test_tiny_imagenet_errors_name_the_file_and_line(tmp_path):
    _write_tiny_imagenet(tmp_path, np.random.default_rng(22))
    annotations = tmp_path / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_9.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(UserError, match=r"val_annotations.txt, line 5: class n00000000 is not among the 3 classes of wnids.txt"):
        load_raw("tiny-imagenet", str(tmp_path))
    annotations.write_text("val_9.JPEG\tn01443537\n")
    with pytest.raises(UserError, match=r"line 1: .*val_9.JPEG does not exist"):
        load_raw("tiny-imagenet", str(tmp_path))
    for image in (tmp_path / "train" / "n01641577" / "images").iterdir():
        image.unlink()
    with pytest.raises(UserError, match=r"no images in .*n01641577/images \(class n01641577 of wnids.txt\)"):
        load_raw("tiny-imagenet", str(tmp_path))
    with pytest.raises(UserError, match=r"tiny-imagenet: .*nowhere/train is missing \(set data.root to the folder "
                                        r"tiny-imagenet-200"):
        load_raw("tiny-imagenet", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("shape, chunk", [((1437, 1, 8, 8), 333), ((600, 3, 12, 10), 4096), ((7, 3, 5, 7), 2)])
def test_channel_statistics_in_chunks_equal_the_whole_set_formula(shape, chunk):
    from ckptkd.data import channel_statistics

    x = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.uint8)
    pixels = x.transpose(0, 1).reshape(shape[1], -1).double() / 255.0  # the set at 8 bytes a pixel, as it was read
    mean, std = channel_statistics(x, chunk=chunk)
    assert torch.equal(mean, pixels.mean(dim=1).float())
    assert torch.equal(std, pixels.std(dim=1).clamp_min(1e-3).float())
    flat = torch.full((3, 1, 2, 2), 7, dtype=torch.uint8)  # one value: no spread, the floor
    assert channel_statistics(flat)[1].tolist() == pytest.approx([1e-3])


def test_a_process_reads_an_image_folder_again_once_a_file_in_it_changed(tmp_path, monkeypatch):
    from ckptkd import config, data as data_mod

    tree = _write_tree(tmp_path, "RGB", np.random.default_rng(13))
    cfg = config.resolve({"data": {"name": "folder", "root": str(tmp_path), "val_fraction": 0.5}})["data"]
    first = data_mod.build(cfg)
    assert data_mod.build(cfg).fingerprint == first.fingerprint  # unchanged: the cached read
    path = tmp_path / "test" / "dog" / "0.png"
    Image.fromarray(255 - tree["test/dog/0.png"]).save(path)
    os.utime(path, ns=(1, 1))  # whatever the file system's clock resolution, another modification time
    assert data_mod.build(cfg).fingerprint != first.fingerprint
    # the walk is bounded (a root may hold far more than the data set): beyond the cap a change goes unseen
    monkeypatch.setattr(data_mod, "SIGNATURE_ENTRIES", 2)
    before = data_mod._signature(str(tmp_path))
    Image.fromarray(tree["test/dog/0.png"]).save(path)
    assert data_mod._signature(str(tmp_path)) == before
