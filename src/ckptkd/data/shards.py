"""WebDataset shards indexed for random access: root/train/*.tar and root/test/*.tar (or root/val/*.tar, or shards
named train-*.tar and test-*.tar / val-*.tar in root itself). A sample is the tar members that share a key (the name
up to its first dot): one image (.jpg, .jpeg, .png, .bmp, .webp) and its label (.cls: the class index as text).
Class names come from root/classes.txt (one per line) where present, else they are the indices.

Each shard's member headers are read once (uncompressed tar: a seek per member, no image is read), so a sample is
one seek and one read by byte offset. That keeps the streaming source's guarantees (any order per (seed, epoch), a
rank's slice, an exact resume) that a sequential shard reader cannot give. Compressed shards (.tar.gz) cannot be
read by offset and are refused."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .raw import MAX_CLASSES

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "bmp", "webp")
MAX_LABEL_BYTES = 64  # a .cls member is one integer: anything longer is not a label


@dataclass(frozen=True)
class Member:
    """Where one sample's image bytes lie: `offset` and `size` within the shard file `path`; `name` the member's."""
    path: str
    offset: int
    size: int
    name: str = ""

    def __str__(self) -> str:  # named in errors as the shard and the member
        return f"{self.path}:{self.name}"


def _split_shards(base: Path, split: str) -> list[Path]:
    if (base / split).is_dir():
        return sorted(p for p in (base / split).iterdir() if p.suffix == ".tar" and p.is_file())
    return sorted(p for p in base.glob(f"{split}-*.tar") if p.is_file())


def _samples(shard: Path) -> list[tuple[Member, int]]:
    """(image member, label) of every complete sample of one shard, in the shard's order."""
    images: dict[str, Member] = {}
    labels: dict[str, int] = {}
    try:
        with open(shard, "rb") as f:
            if f.read(2) == b"\x1f\x8b":
                raise UserError(f"webdataset: {shard} is gzip-compressed; shards are read by offset: gunzip it "
                                "(keeping the .tar name)")
        with tarfile.open(shard, "r:") as tar:  # "r:": uncompressed only, so that members can be read by offset
            for info in tar:
                if not info.isfile():
                    continue
                name = info.name.rsplit("/", 1)[-1]
                folder = info.name[:len(info.name) - len(name)]
                key, _, ext = name.partition(".")
                key = folder + key
                if ext.lower() in IMAGE_EXTENSIONS:
                    if key in images:
                        raise UserError(f"webdataset: {shard}: sample {key!r} has two images ({images[key].name}, "
                                        f"{info.name}); a sample holds one")
                    images[key] = Member(str(shard), info.offset_data, info.size, info.name)
                elif ext.lower() == "cls":
                    if info.size > MAX_LABEL_BYTES:
                        raise UserError(f"webdataset: {shard}: {info.name} is {info.size:,} bytes; a .cls member "
                                        "holds one class index")
                    text = tar.extractfile(info).read().decode("utf-8", errors="replace").strip()
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise UserError(f"webdataset: {shard}: {info.name} holds {text[:40]!r}, not a class "
                                        "index") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"webdataset: {shard}: not a readable uncompressed tar shard ({e})") from e
    missing = sorted(set(images) - set(labels))
    if missing:
        raise UserError(f"webdataset: {shard}: sample {missing[0]!r} has an image but no .cls label"
                        f"{f' ({len(missing) - 1} more)' if len(missing) > 1 else ''}")
    return [(images[k], labels[k]) for k in images]


def list_shards(root: str | None) -> tuple[dict[str, list[tuple[Member, int]]], list[str], Path]:
    """Every (member, label) per split ("train", "test"), the class names and the root."""
    layout = "root/train/*.tar and root/test/*.tar (or root/val/*.tar), or root/train-*.tar and root/test-*.tar"
    if root is None:
        raise UserError(f"webdataset: data.root is not set (set it to a folder of shards laid out as {layout})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise UserError(f"webdataset: {base} is not a folder (expected {layout})")
    samples: dict[str, list[tuple[Member, int]]] = {}
    for split, names in (("train", ("train",)), ("test", ("test", "val"))):
        shards = next((found for name in names if (found := _split_shards(base, name))), [])
        if not shards:
            compressed = sorted(base.rglob("*.tar.gz"))[:1]
            hint = f"; {compressed[0]} is compressed: unpack it with gunzip" if compressed else ""
            raise UserError(f"webdataset: no {'/'.join(names)} shards in {base} (expected {layout}){hint}")
        samples[split] = [s for shard in shards for s in _samples(shard)]
        if not samples[split]:
            raise UserError(f"webdataset: the {split} shards in {base} hold no samples with an image and a .cls "
                            "label")
    top = max(label for split in samples.values() for _, label in split)
    low = min(label for split in samples.values() for _, label in split)
    if low < 0:
        raise UserError(f"webdataset: {base}: a .cls label is {low}; labels are 0..K-1")
    classes_file = base / "classes.txt"
    if classes_file.is_file():
        class_names = [line.strip() for line in classes_file.read_text(encoding="utf-8", errors="replace")
                       .splitlines() if line.strip()]
        if top >= len(class_names):
            raise UserError(f"webdataset: a .cls label is {top} but {classes_file} names {len(class_names)} classes")
    else:
        if top + 1 > MAX_CLASSES:
            raise UserError(f"webdataset: {base}: a .cls label is {top:,}, which would make {top + 1:,} classes (at "
                            f"most {MAX_CLASSES:,})")
        class_names = [str(c) for c in range(top + 1)]
    return samples, class_names, base


def read_member(member: Member, handles: dict[str, object]) -> bytes:
    """One image's bytes, through a per-process cache of open shard files (`handles`)."""
    handle = handles.get(member.path)
    if handle is None:
        handle = handles[member.path] = open(member.path, "rb")
    handle.seek(member.offset)
    return handle.read(member.size)
