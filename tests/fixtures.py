"""Fixture files in real formats, written by tests (no data is ever downloaded)."""

import io
import pickle
import struct
from pathlib import Path

import numpy as np


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2's cPickle wrote str, exactly as in the real CIFAR batches."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def write_py2_pickle(path: Path, obj) -> None:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    # The real files name numpy's pre-2.0 module path.
    path.write_bytes(buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))




def write_cifar100(root: Path, *, train_per_class: int, test_per_class: int, seed: int = 0) -> Path:
    """A CIFAR-100 folder (`cifar-100-python`: meta, train, test) of random images, every class present."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    write_py2_pickle(folder / "meta", {b"fine_label_names": [f"class_{i}".encode() for i in range(100)],
                                       b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]})
    for file, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(100) for _ in range(per_class)]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        write_py2_pickle(folder / file, {b"data": data, b"fine_labels": labels, b"coarse_labels": [0] * len(labels)})
    return root
