"""An ImageNet-layout folder cut from the two photos that ship with scikit-learn (no download): the streaming
source's test fixture and the `bench --workload folder` data set.

Class c is crops of one photo, china, flower, or one of them with its colour channels permuted (more classes cycle
through further permutations), so a small model can learn the classes from a few images. Each image is a crop at a
random position and size, scaled to a random side in `sizes`, saved as JPEG or (every `png_every`-th) PNG; a few are
saved in other modes (grayscale, palette, RGBA) so a reader meets what real folders hold."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from PIL import Image

_PERMUTATIONS = [p for p in itertools.permutations(range(3))]


def _photos() -> list[np.ndarray]:
    from sklearn.datasets import load_sample_images  # imported here: sklearn takes a second to import
    return list(load_sample_images().images)


def write_photo_folder(root: Path, *, classes: int = 3, train_per_class: int = 8, test_per_class: int = 3,
                       sizes: tuple[int, int] = (40, 96), png_every: int = 3, modes: bool = True,
                       seed: int = 0, test_dir: str = "val") -> Path:
    """root/train/CLASS/*.JPEG|png and root/<test_dir>/CLASS/*; returns root."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    count = 0
    for split, per_class in (("train", train_per_class), (test_dir, test_per_class)):
        for c in range(classes):
            photo = photos[c % len(photos)][..., list(_PERMUTATIONS[c // len(photos)])]
            folder = root / split / f"class{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = photo.shape[:2]
                side = int(rng.integers(min(h, w) // 3, min(h, w)))
                top, left = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
                out_w, out_h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
                image = Image.fromarray(photo[top:top + side, left:left + side]).resize((out_w, out_h),
                                                                                         Image.Resampling.BILINEAR)
                if modes and count % 7 == 3:
                    image = image.convert(("L", "P", "RGBA")[(count // 7) % 3])
                png = count % png_every == png_every - 1 or image.mode in ("P", "RGBA")
                image.save(folder / f"{split}_{c}_{i}.{'png' if png else 'JPEG'}", quality=90)
                count += 1
    return root
