"""Raw data-set readers: each turns files on disk into uint8 NCHW tensors with int64 labels.

Nothing is ever downloaded; every missing or unreadable file becomes a one-line UserError that
names the path and says how to get the data.
"""

from __future__ import annotations

import functools
import gzip
import math
import pickle
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .. import memory
from ..config import MAX_CLASSES
from ..errors import UserError
from .images import load_folder, load_imagenet, load_tiny_imagenet
from .raw import RawData, raw_data

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # numpy < 2 only has the old module path
    from numpy.core.multiarray import _reconstruct


# --- digits -------------------------------------------------------------------------------------


def load_digits_source(root: str | None) -> RawData:
    """scikit-learn's bundled 8x8 digits with a fixed stratified 80/20 split; `root` is ignored."""
    # Imported here: sklearn takes a second to import and only this source needs it.
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * 255 / 16).astype(np.uint8)[:, None]
    y = bunch.target.astype(np.int64)

    # sklearn ships no test split; this one must never change, so it depends only on RandomState(0).
    rng = np.random.RandomState(0)
    is_test = np.zeros(len(y), dtype=bool)
    for c in range(10):
        members = np.flatnonzero(y == c)
        n_test = int(round(0.2 * len(members)))
        is_test[members[rng.permutation(len(members))[:n_test]]] = True

    names = [str(c) for c in range(10)]
    return raw_data("digits", x[~is_test], y[~is_test], x[is_test], y[is_test], names, False, "digits")


# --- fashion-mnist (idx files) ------------------------------------------------------------------

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
_IDX_STEMS = (
    "train-images-idx3-ubyte", "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte",
)
_FASHION_HINT = "install the Debian package dataset-fashion-mnist or set data.root to a folder holding the idx files"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an idx file of unsigned bytes (magic 0x0000080<ndim>, then <ndim> big-endian uint32 sizes)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            buf = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError; a cut-off .gz is an EOFError
        raise UserError(f"{path}: cannot read idx file ({e})") from e
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise UserError(f"{path}: truncated idx file ({len(buf)} bytes, shorter than its header)")
    magic = struct.unpack(">I", buf[:4])[0]
    if magic != 0x800 + ndim:
        raise UserError(f"{path}: not an idx{ndim} ubyte file (magic {magic:#010x}, expected {0x800 + ndim:#010x})")
    dims = struct.unpack(f">{ndim}I", buf[4:header])
    expected = header + math.prod(dims)
    if len(buf) != expected:
        raise UserError(f"{path}: truncated or corrupt idx file ({len(buf)} bytes, its header says {expected})")
    return np.frombuffer(buf, np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: str | None) -> RawData:
    """Fashion-MNIST (or anything in MNIST's idx layout) from a folder of idx files, optionally gzipped."""
    folder = Path(root if root is not None else FASHION_MNIST_DIR).expanduser()
    if not folder.is_dir():
        raise UserError(f"fashion-mnist: folder {folder} does not exist ({_FASHION_HINT})")

    paths = {}
    for stem in _IDX_STEMS:
        found = [folder / name for name in (stem, stem + ".gz") if (folder / name).is_file()]
        paths[stem] = found[0] if found else None
    if not any(paths.values()):
        expected = ", ".join(f"{stem}[.gz]" for stem in _IDX_STEMS)
        raise UserError(f"fashion-mnist: no idx files in {folder} (expected {expected}; {_FASHION_HINT})")
    for stem, path in paths.items():
        if path is None:
            raise UserError(f"fashion-mnist: {folder / stem}[.gz] is missing ({_FASHION_HINT})")

    splits = []
    for images_stem, labels_stem in ((_IDX_STEMS[0], _IDX_STEMS[1]), (_IDX_STEMS[2], _IDX_STEMS[3])):
        x = _read_idx(paths[images_stem], 3)
        y = _read_idx(paths[labels_stem], 1)
        if len(x) != len(y):
            raise UserError(
                f"fashion-mnist: {paths[images_stem]} holds {len(x)} images "
                f"but {paths[labels_stem]} holds {len(y)} labels"
            )
        splits.append((x[:, None], y.astype(np.int64)))
    (train_x, train_y), (test_x, test_y) = splits
    return raw_data("fashion-mnist", train_x, train_y, test_x, test_y, FASHION_MNIST_CLASSES, True, str(folder))


# --- CIFAR-10 / CIFAR-100 (python pickle batches) -----------------------------------------------

# Unpickling can run arbitrary code, and these files come from wherever the user got them.
# A real CIFAR batch needs only the globals that rebuild one numpy array.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,  # as written by numpy < 2, i.e. the real files
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,  # as written by numpy >= 2
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path):
        # The batches were pickled by Python 2: its str must stay bytes, not be decoded as text.
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module, name):
        try:
            return _PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(
                f"{self._path}: refusing to unpickle global {module}.{name} "
                "(a CIFAR batch holds only dicts, lists, bytes and numpy arrays)"
            ) from None


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArrayOnlyUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # a corrupt pickle can fail with almost any exception type
        raise UserError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR pickle (holds a {type(batch).__name__}, expected a dict)")
    return batch


def _field(batch: dict, key: bytes, path: Path):
    if key not in batch:
        raise UserError(f"{path}: missing key {key!r} (found {sorted(batch, key=repr)})")
    return batch[key]


@dataclass(frozen=True)
class _CifarLayout:
    name: str
    folder: str  # what the official tarball extracts to
    tarball: str
    meta: str
    names_key: bytes
    labels_key: bytes
    train: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def how_to_get(self) -> str:
        return f"download {self.tarball} from https://www.cs.toronto.edu/~kriz/cifar.html and extract it"


_CIFAR10 = _CifarLayout(
    "cifar10", "cifar-10-batches-py", "cifar-10-python.tar.gz", "batches.meta", b"label_names", b"labels",
    tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
)
_CIFAR100 = _CifarLayout(
    "cifar100", "cifar-100-python", "cifar-100-python.tar.gz", "meta", b"fine_label_names", b"fine_labels",
    ("train",), ("test",),
)


def _cifar_folder(layout: _CifarLayout, root: str | None) -> Path:
    """Accept the extracted folder itself or the folder that holds it."""
    if root is None:
        raise UserError(f"{layout.name}: set data.root to the folder holding {layout.folder} ({layout.how_to_get})")
    base = Path(root).expanduser()
    for folder in (base, base / layout.folder):
        if (folder / layout.meta).is_file():
            return folder
    files = ", ".join((layout.meta,) + layout.train + layout.test)
    raise UserError(
        f"{layout.name}: no {layout.folder} in {base} (expected {files} there or in "
        f"{base / layout.folder}; {layout.how_to_get})"
    )


def _cifar_batches(folder: Path, files: tuple[str, ...], layout: _CifarLayout) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for file in files:
        path = folder / file
        if not path.is_file():
            raise UserError(f"{layout.name}: {path} is missing ({layout.how_to_get})")
        batch = _unpickle(path)
        data = _field(batch, b"data", path)
        labels = _field(batch, layout.labels_key, path)
        if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
            raise UserError(f"{path}: b'data' is not a uint8 array of shape [N, 3072]")
        if not (isinstance(labels, list) and all(type(v) is int for v in labels)):
            raise UserError(f"{path}: {layout.labels_key!r} is not a list of ints")
        if len(labels) != len(data):
            raise UserError(f"{path}: {len(data)} images but {len(labels)} labels")
        # Each 3072-vector is the red, green, then blue 32x32 plane, each row-major.
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.array(labels, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _load_cifar(layout: _CifarLayout, root: str | None) -> RawData:
    folder = _cifar_folder(layout, root)
    meta_path = folder / layout.meta
    names = _field(_unpickle(meta_path), layout.names_key, meta_path)
    if not (isinstance(names, list) and all(isinstance(n, bytes) for n in names)):
        raise UserError(f"{meta_path}: {layout.names_key!r} is not a list of names")
    class_names = [n.decode("utf-8", errors="replace") for n in names]
    train_x, train_y = _cifar_batches(folder, layout.train, layout)
    test_x, test_y = _cifar_batches(folder, layout.test, layout)
    return raw_data(layout.name, train_x, train_y, test_x, test_y, class_names, True, str(folder))


# --- npz (Keras-style arrays) -------------------------------------------------------------------

_NPZ_HINT = "set data.root to a .npz file holding x_train, y_train, x_test, y_test"


def _npz_images(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        x = x.transpose(0, 3, 1, 2)  # channels last, as Keras stores them
    else:
        raise UserError(f"{path}: {key!r} has shape {x.shape}; expected N×H×W or N×H×W×C")
    if x.dtype == np.uint8:
        return x
    if x.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise UserError(f"{path}: {key!r} holds {bad:,} NaN or infinite pixel values")
        if np.all((x >= 0) & (x <= 1)):
            return np.rint(x * 255).astype(np.uint8)
    raise UserError(f"{path}: {key!r} has dtype {x.dtype}; expected uint8, or floats in [0, 1]")


def _npz_labels(y: np.ndarray, key: str, path: Path, n: int) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise UserError(f"{path}: {key!r} has dtype {y.dtype}; expected integer class labels")
    if y.shape not in ((n,), (n, 1)):  # Keras' CIFAR arrays keep labels as [N, 1]
        raise UserError(f"{path}: {key!r} has shape {y.shape}; expected [{n}] to match the images")
    return y.reshape(n).astype(np.int64)


def _check_npz_headers(path: Path) -> None:
    """Read only the archive's directory and each array's .npy header (dtype, shape): refuse Python objects, and
    arrays that would not fit in memory, before any array is decompressed (a few MB of zeros compress from GBs)."""
    if not zipfile.is_zipfile(path):
        return  # np.load says what it is (a single .npy array, or nothing readable)
    needed = 0
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            with archive.open(info) as f:
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                               (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if read_header is None:
                    raise ValueError(f"{info.filename}: .npy format version {version} is not supported")
                shape, _, dtype = read_header(f)
            key = info.filename.removesuffix(".npy")
            if dtype.hasobject:
                raise UserError(f"{path}: {key!r} holds Python objects (a pickle), which ckptkd does not read; save "
                                "numeric arrays (and class_names as strings)")
            needed += math.prod(shape) * dtype.itemsize
    memory.check_fits(str(path), needed, "its arrays")


def load_npz(root: str | None) -> RawData:
    """A Keras-style .npz archive; `root` is the file itself."""
    if root is None:
        raise UserError(f"npz: data.root is not set ({_NPZ_HINT})")
    path = Path(root).expanduser()
    if not path.is_file():
        raise UserError(f"npz: file {path} does not exist ({_NPZ_HINT})")
    try:
        _check_npz_headers(path)
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise UserError(f"{path}: holds a single array, not an .npz archive ({_NPZ_HINT})")
        with loaded:
            arrays = {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: not a readable .npz file ({e})") from e

    for key in ("x_train", "y_train", "x_test", "y_test"):
        if key not in arrays:
            raise UserError(f"{path}: missing array {key!r} (found {sorted(arrays)})")
    train_x = _npz_images(arrays["x_train"], "x_train", path)
    test_x = _npz_images(arrays["x_test"], "x_test", path)
    train_y = _npz_labels(arrays["y_train"], "y_train", path, len(train_x))
    test_y = _npz_labels(arrays["y_test"], "y_test", path, len(test_x))

    if "class_names" in arrays:
        names = arrays["class_names"]
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise UserError(f"{path}: 'class_names' must be a 1-D array of strings")
        class_names = [n.decode("utf-8", errors="replace") if isinstance(n, bytes) else str(n) for n in names.tolist()]
    else:
        k = int(max(train_y.max(initial=-1), test_y.max(initial=-1))) + 1
        if k > MAX_CLASSES:  # before a name is made for each class: one label of 2**40 would exhaust memory
            key = "y_train" if train_y.max(initial=-1) + 1 == k else "y_test"
            raise UserError(f"{path}: {key!r} holds label {k - 1:,}, which would make {k:,} classes (at most "
                            f"{MAX_CLASSES:,}; labels are 0..K-1)")
        class_names = [str(c) for c in range(k)]
    return raw_data("npz", train_x, train_y, test_x, test_y, class_names, False, str(path))


# --- dispatch -----------------------------------------------------------------------------------

SOURCES: dict[str, Callable[[str | None], RawData]] = {
    "digits": load_digits_source,
    "fashion-mnist": load_fashion_mnist,
    "cifar10": functools.partial(_load_cifar, _CIFAR10),
    "cifar100": functools.partial(_load_cifar, _CIFAR100),
    "npz": load_npz,
    "folder": load_folder,
    "tiny-imagenet": load_tiny_imagenet,
    "imagenet": load_imagenet,
}


def load_raw(name: str, root: str | None) -> RawData:
    try:
        loader = SOURCES[name]
    except KeyError:
        raise UserError(f"unknown data source {name!r} (choose one of: {', '.join(SOURCES)})") from None
    return loader(root)
