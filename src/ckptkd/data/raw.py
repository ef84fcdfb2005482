"""What every source reader returns (`RawData`) and the checks every one of them passes through (`raw_data`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import MAX_CLASSES
from ..errors import UserError, note


@dataclass
class RawData:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    class_names: list[str]
    hflip: bool  # whether a horizontal flip keeps the label

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (c, h, w)




def raw_data(name, train_x, train_y, test_x, test_y, class_names, hflip, where) -> RawData:
    """Check labels and image shapes, then wrap numpy arrays as RawData; `where` names the source in errors."""
    k = len(class_names)
    if k > MAX_CLASSES:
        raise UserError(f"{where}: {k:,} classes; at most {MAX_CLASSES:,} are supported")
    seen: dict[str, int] = {}
    for i, class_name in enumerate(class_names):  # a teacher's outputs are matched to classes by name
        if seen.setdefault(str(class_name), i) != i:
            raise UserError(f"{where}: class name {str(class_name)!r} is given twice (classes {seen[str(class_name)]} "
                            f"and {i}); each class needs its own name")
    for split, y in (("training", train_y), ("test", test_y)):
        if len(y) == 0:
            raise UserError(f"{where}: the {split} split holds no images")
    present = np.unique(train_y)
    if k < 2 or len(present) < 2:
        raise UserError(f"{where}: the training images hold {len(present)} class"
                        f"{'es' if len(present) != 1 else ''} ({k} named); classification needs at least 2")
    for split, y in (("train", train_y), ("test", test_y)):
        bad = y[(y < 0) | (y >= k)]
        if bad.size:
            raise UserError(f"{where}: {split} label {bad[0]} is outside 0..{k - 1} ({k} classes)")
    unseen = sorted(set(np.unique(test_y).tolist()) - set(present.tolist()))
    if unseen:
        shown = ", ".join(class_names[c] for c in unseen[:5]) + (f" and {len(unseen) - 5} more" if len(unseen) > 5
                                                                 else "")
        note(f"{where}: test class{'es' if len(unseen) > 1 else ''} {shown} never appear{'s' if len(unseen) == 1 else ''}"
             " in the training images (the model cannot learn them)")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise UserError(
            f"{where}: train images are {tuple(train_x.shape[1:])} (C, H, W) "
            f"but test images are {tuple(test_x.shape[1:])}"
        )

    # np.require copies read-only arrays (np.frombuffer results): torch cannot share those.
    def images(x):
        return torch.from_numpy(np.require(x, np.uint8, ["C", "W"]))

    def labels(y):
        return torch.from_numpy(np.require(y, np.int64, ["C", "W"]))

    return RawData(name, images(train_x), labels(train_y), images(test_x), labels(test_y), list(class_names), hflip)
