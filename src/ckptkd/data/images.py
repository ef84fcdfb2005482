"""Image trees read into memory: `folder` (root/{train,test}/CLASS/*.png|jpg|jpeg|bmp, equal sizes) and
`tiny-imagenet` (Tiny-ImageNet-200 as distributed: train/WNID/images/*.JPEG, val/images/*.JPEG labelled by
val/val_annotations.txt; its val split is the test split, as in the paper's code, since the test labels were never
published). Every image's size is read from its header before any is decoded, and the whole set is checked against
the memory available."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .. import memory
from ..config import MAX_CLASSES
from ..errors import UserError, note
from .raw import RawData, raw_data

# What Pillow reads here without plugins; a file of another type in a class folder is skipped with a note.
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_KINDS = "/".join(_IMAGE_SUFFIXES)


WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}  # converting these to 8 bits clips them silently
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


def _read_image(path: Path, size: tuple[int, int] | None = None, first: Path | None = None) -> np.ndarray:
    """[H, W] for a grayscale image, [H, W, 3] for anything else (converted to RGB). A 16-bit or float image is
    refused (8-bit conversion would clip it); an alpha channel is dropped with a note. With `size` (width, height:
    that of `first`), an image of another size is refused from its header, before it is decoded."""
    try:
        with Image.open(path) as im:
            if size is not None and im.size != size:
                raise UserError(f"folder: {path} is {im.size[0]}x{im.size[1]} but {first} is {size[0]}x{size[1]}; "
                                "all images must share one size")
            if im.mode in WIDE_MODES:
                raise UserError(f"{path}: a {im.mode} image (16-bit or float); ckptkd reads 8-bit images, convert "
                                "it first")
            if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
                note(f"folder: images with an alpha channel (first: {path}); it is dropped")
            return np.asarray(im if im.mode in ("L", "RGB") else im.convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise UserError(f"{path}: cannot read image ({e})") from e


def image_size_of(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from e


def _image_files(class_dir: Path, name: str) -> list[Path]:
    images, others = [], []
    for path in class_dir.iterdir():
        if path.is_file() and not path.name.startswith("."):  # hidden files (.DS_Store) are tool litter
            (images if path.suffix.lower() in _IMAGE_SUFFIXES else others).append(path)
    if others:
        note(f"{name}: files of other types than {_KINDS} are skipped (first: {min(others)})")
    return sorted(images)


def _class_dirs(split_dir: Path) -> list[str]:
    # Hidden folders (.ipynb_checkpoints, .git) are tool litter, not classes.
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_folder(root: str | None) -> RawData:
    """An image tree root/{train,test}/CLASS/*.png|jpg|jpeg|bmp|webp|tif|tiff|gif; classes are the sorted train
    subfolders."""
    files, class_names, base = list_folder(root)
    return _decoded("folder", files, class_names, hflip=False, where=f"folder: {base}")


def list_folder(root: str | None, name: str = "folder") -> tuple[dict[str, list[tuple[Path, int]]], list[str], Path]:
    """The (path, label) of every image of an image tree root/train/CLASS/* and root/test/CLASS/* (or, as ImageNet
    ships it, root/val/CLASS/*: its validation set is the test split here), the class names (the sorted train
    subfolders) and the root; nothing is opened. `name` is the source named in errors."""
    # ImageNet's labelled held-out set is val/ (ILSVRC's test/ is a flat folder without labels); a user's own tree
    # names it test/ or val/. The first of the two that holds class folders is the test split.
    order = ("val", "test") if name == "imagenet" else ("test", "val")
    layout = (f"root/train/CLASS/*.JPEG and root/{order[0]}/CLASS/*.JPEG" if name == "imagenet" else
              "root/train/CLASS/*.png and root/test/CLASS/*.png (or root/val/CLASS/*)")
    if root is None:
        raise UserError(f"{name}: data.root is not set (set it to a folder laid out as {layout})")
    base = Path(root).expanduser()
    labelled = [base / d for d in order if (base / d).is_dir() and _class_dirs(base / d)]
    test_dir = labelled[0] if labelled else next((base / d for d in order if (base / d).is_dir()), base / order[0])
    for needed in (base / "train", test_dir):
        if not needed.is_dir():
            raise UserError(f"{name}: {needed} is not a folder (expected {layout.replace('root', str(base))})")

    class_names = _class_dirs(base / "train")
    if not class_names:
        raise UserError(f"{name}: no class folders in {base / 'train'}")
    if len(class_names) > MAX_CLASSES:  # before a single image is read
        raise UserError(f"{name}: {len(class_names):,} class folders in {base / 'train'}; at most {MAX_CLASSES:,} "
                        "are supported")
    for cls in _class_dirs(test_dir):
        if cls not in class_names:
            raise UserError(f"{name}: test class folder {test_dir / cls} has no match in {base / 'train'}")

    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for split, split_dir in (("train", base / "train"), ("test", test_dir)):
        for label, cls in enumerate(class_names):
            class_dir = split_dir / cls
            found = _image_files(class_dir, name) if class_dir.is_dir() else []
            if split == "train" and not found:
                raise UserError(f"{name}: no {_KINDS} images in {class_dir}")
            files[split] += [(path, label) for path in found]
    if not files["test"]:
        raise UserError(f"{name}: no {_KINDS} images under {test_dir}")
    return files, class_names, base


def load_imagenet(root: str | None) -> RawData:
    """ImageNet as unpacked for torchvision's ImageFolder (root/train/WNID/*.JPEG, root/val/WNID/*.JPEG), read into
    memory: only where every image shares one size and the set fits (a resized copy); the real one streams."""
    files, class_names, base = list_folder(root, "imagenet")
    return _decoded("imagenet", files, class_names, hflip=True, where=f"imagenet: {base}")


def _decoded(name: str, files: dict[str, list[tuple[Path, int]]], class_names: list[str], *, hflip: bool,
             where: str) -> RawData:
    """Every (path, label) of the train and test lists decoded into one uint8 array per split."""
    # Every image is held in memory as RGB (at most): what that needs is known from one header, before decoding.
    first = files["train"][0][0]
    width, height = image_size_of(first)
    count = len(files["train"]) + len(files["test"])
    memory.check_fits(where, count * width * height * 3, f"{count:,} images of {width}x{height}")
    arrays: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    for split, entries in files.items():
        for path, _ in entries:
            arrays[split].append(_read_image(path, (width, height), first))

    # Grayscale converts to RGB without loss, so a tree mixing both is read as RGB throughout.
    rgb = any(a.ndim == 3 for split in arrays.values() for a in split)

    def stack(images: list[np.ndarray]) -> np.ndarray:
        if not rgb:
            return np.stack(images)[:, None]
        images = [np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in images]
        return np.stack(images).transpose(0, 3, 1, 2)

    def labels(entries: list[tuple[Path, int]]) -> np.ndarray:
        return np.array([label for _, label in entries], dtype=np.int64)

    return raw_data(name, stack(arrays["train"]), labels(files["train"]), stack(arrays["test"]),
                    labels(files["test"]), class_names, hflip, where.removeprefix(f"{name}: "))


_TINY_HINT = ("set data.root to the folder tiny-imagenet-200 as unpacked from "
              "http://cs231n.stanford.edu/tiny-imagenet-200.zip")


def load_tiny_imagenet(root: str | None) -> RawData:
    """Tiny-ImageNet-200 read into memory (`list_tiny_imagenet`)."""
    files, class_names, base = list_tiny_imagenet(root)
    return _decoded("tiny-imagenet", files, class_names, hflip=True, where=f"tiny-imagenet: {base}")


def list_tiny_imagenet(root: str | None) -> tuple[dict[str, list[tuple[Path, int]]], list[str], Path]:
    """Tiny-ImageNet-200's own layout: classes from wnids.txt (else the train folders, sorted), their names from
    words.txt where present, train/WNID/images/*, and val/images/* labelled by val/val_annotations.txt (the test
    split here). Returns every (path, label) per split, the class names and the root; nothing is opened."""
    if root is None:
        raise UserError(f"tiny-imagenet: data.root is not set ({_TINY_HINT})")
    base = Path(root).expanduser()
    for needed in (base / "train", base / "val" / "images", base / "val" / "val_annotations.txt"):
        if not needed.exists():
            raise UserError(f"tiny-imagenet: {needed} is missing ({_TINY_HINT})")
    wnids_file = base / "wnids.txt"
    wnids = (wnids_file.read_text(encoding="utf-8", errors="replace").split() if wnids_file.is_file()
             else _class_dirs(base / "train"))
    if len(wnids) != len(set(wnids)) or not wnids:
        raise UserError(f"tiny-imagenet: {wnids_file} names {len(wnids)} classes, {len(set(wnids))} distinct")
    if len(wnids) > MAX_CLASSES:
        raise UserError(f"tiny-imagenet: {len(wnids):,} classes; at most {MAX_CLASSES:,} are supported")
    label_of = {w: i for i, w in enumerate(wnids)}
    files: dict[str, list[tuple[Path, int]]] = {"train": [], "test": []}
    for wnid, label in label_of.items():
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise UserError(f"tiny-imagenet: class {wnid} of {wnids_file.name} has no folder {folder}")
        found = _image_files(folder, "tiny-imagenet")
        if not found:
            raise UserError(f"tiny-imagenet: no images in {folder} (class {wnid} of {wnids_file.name})")
        files["train"] += [(path, label) for path in found]
    annotations = base / "val" / "val_annotations.txt"
    left_out = set(_class_dirs(base / "train")) - set(label_of)  # a wnids.txt cut down to a subset of the classes
    for number, line in enumerate(annotations.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        fields = line.split("\t")
        if not line.strip():
            continue
        if len(fields) < 2:
            raise UserError(f"tiny-imagenet: {annotations}, line {number}: expected FILE<tab>WNID, got {line[:80]!r}")
        if fields[1] in left_out:
            continue
        if fields[1] not in label_of:
            raise UserError(f"tiny-imagenet: {annotations}, line {number}: class {fields[1]} is not among the "
                            f"{len(wnids)} classes of {wnids_file.name if wnids_file.is_file() else base / 'train'}")
        path = base / "val" / "images" / fields[0]
        if not path.is_file():
            raise UserError(f"tiny-imagenet: {annotations}, line {number}: {path} does not exist")
        files["test"].append((path, label_of[fields[1]]))
    if not files["test"]:
        raise UserError(f"tiny-imagenet: {annotations} labels no images")
    return files, _class_names(base / "words.txt", wnids), base


def _class_names(words: Path, wnids: list[str]) -> list[str]:
    """Each class' first WordNet lemma from words.txt ("n01443537<tab>goldfish, Carassius auratus"), else its
    WNID; a name two classes share keeps its WNID beside it."""
    lemma = {}
    if words.is_file():
        for line in words.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            lemma[wnid] = text.split(",")[0].strip()
    names = [lemma.get(w) or w for w in wnids]
    return [f"{n} ({w})" if names.count(n) > 1 else n for n, w in zip(names, wnids)]
