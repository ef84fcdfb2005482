"""Streamed images, for sets too large to hold or of mixed sizes: only the list of files (or WebDataset members) and
labels stays in memory; DataLoader worker processes decode, crop and resize each batch as it is needed.

`StreamingData` answers the trainer, the teachers and the analysis as the resident `Data` does (epoch plans, stacked
group batches, rank slices, evaluation batches) with the same guarantees:
- each run's order and augmentation come from (seed, epoch) alone: an epoch's plan is a permutation and one 62-bit
  augmentation key per image, and an image's crop and flip are a function of its key, computed in whichever worker
  decodes it, so the batches do not depend on the number of workers and a resume replays them exactly;
- under torchrun every rank draws the same global batches and decodes only its own slice.

Training views are the usual ImageNet ones: RandomResizedCrop (area `data.scale`, aspect 3/4..4/3, torchvision's
algorithm with a fallback centre crop) to `data.image_size`, then a horizontal flip where the source allows it.
Evaluation resizes the shorter side to `data.resize` (default image_size / 0.875: 256 for 224) and takes the centre
crop. JPEGs are decoded at a reduced DCT scale wherever the crop still has at least image_size pixels (Pillow's draft
mode), which is most of the decoding cost saved on large photos. Every image is read as RGB: grayscale, palette and
CMYK images are converted, an alpha channel is dropped, and 16-bit or float images are refused as in memory.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .augment import normalize
from .images import WIDE_MODES
from .shards import Member, read_member

# An image file larger than this is refused before it is read (a 16k x 16k JPEG is ~100 MB; ImageNet's largest few).
MAX_IMAGE_BYTES = 512 * 2**20
RATIO = (3 / 4, 4 / 3)
DIGEST_SAMPLES = 64  # images whose bytes the data's fingerprint hashes whole (`Sources.digest`)
KEY_BITS = 62


@dataclass(frozen=True)
class Views:
    """How images become tensors: training crops (when `augment`) and evaluation's resize + centre crop."""
    size: int
    resize: int
    scale: tuple[float, float]
    hflip: bool
    augment: bool

    def random_resized(self, width: int, height: int, key: int) -> tuple[tuple[float, float, float, float], bool]:
        """Crop box (left, top, right, bottom) and flip for an image of width x height, drawn from `key` alone."""
        rng = random.Random(key)
        area = width * height
        log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
        box = None
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                box = (left, top, left + w, top + h)
                break
        if box is None:  # torchvision's fallback: the whole image, its aspect clamped into RATIO, centred
            aspect = width / height
            w, h = ((width, int(round(width / RATIO[0]))) if aspect < RATIO[0] else
                    (int(round(height * RATIO[1])), height) if aspect > RATIO[1] else (width, height))
            w, h = min(w, width), min(h, height)
            left, top = (width - w) // 2, (height - h) // 2
            box = (left, top, left + w, top + h)
        flip = self.hflip and rng.random() < 0.5
        return tuple(float(v) for v in box), flip

    def centre(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The centre crop of image_size after the shorter side is resized to `resize`, in the image's pixels."""
        side = min(width, height) * self.size / self.resize
        left, top = (width - side) / 2, (height - side) / 2
        return (left, top, left + side, top + side)


def decode(data: bytes | str, where: str, views: Views, key: int | None) -> np.ndarray:
    """One image -> uint8 [size, size, 3]: a training view when `key` is given, else the evaluation view."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
            if im.mode in WIDE_MODES:
                raise UserError(f"{where}: a {im.mode} image (16-bit or float); ckptkd reads 8-bit images, convert "
                                "it first")
            width, height = im.size
            if key is None:
                box, flip = views.centre(width, height), False
            else:
                box, flip = views.random_resized(width, height, key)
            if im.format == "JPEG":  # decode at the smallest DCT scale that keeps the crop >= size pixels
                shrink = min(box[2] - box[0], box[3] - box[1]) / views.size
                if shrink >= 2:
                    im.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))
                    sx, sy = im.size[0] / width, im.size[1] / height
                    box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            out = rgb.resize((views.size, views.size), Image.Resampling.BILINEAR, box=box)
            if flip:
                out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            return np.asarray(out)
    except UserError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        # Pillow names an in-memory file by its object ("<_io.BytesIO object at 0x...>"); `where` names it already
        reason = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
        raise UserError(f"{where}: cannot read image ({reason})") from e


def _file_size(path) -> int:
    try:
        return os.stat(path).st_size
    except OSError as e:
        raise UserError(f"{path}: cannot read image ({e.strerror or e})") from e


class Sources:
    """Where every image of a split lies, as flat arrays (a million entries cost a few dozen MB, shared by forked
    workers without a per-object copy): file paths, or WebDataset members (shard, offset, size)."""

    def __init__(self, entries: list):
        self.count = len(entries)
        if entries and isinstance(entries[0], Member):
            self.shards = sorted({m.path for m in entries})
            number = {p: i for i, p in enumerate(self.shards)}
            self.shard = np.array([number[m.path] for m in entries], dtype=np.int32)
            self.offset = np.array([m.offset for m in entries], dtype=np.int64)
            self.size = np.array([m.size for m in entries], dtype=np.int64)
            self.names = np.array([m.name.encode() for m in entries])
            self.paths = None
        else:
            self.paths = np.array([os.fsencode(str(p)) for p in entries])
            self.shards = None
            self.size = np.array([_file_size(p) for p in entries], dtype=np.int64)

    def where(self, i: int) -> str:
        if self.paths is not None:
            return os.fsdecode(self.paths[i])
        return str(self._member(i))

    def _member(self, i: int) -> Member:
        return Member(self.shards[self.shard[i]], int(self.offset[i]), int(self.size[i]),
                      self.names[i].decode(errors="replace"))

    def read(self, i: int, handles: dict) -> bytes | str:
        """Image i's bytes (a shard member) or its path (a file, opened by Pillow itself)."""
        if self.paths is None:
            member = self._member(i)
            if member.size > MAX_IMAGE_BYTES:
                raise UserError(f"{member}: an image of {member.size / 2**20:,.0f} MiB; at most "
                                f"{MAX_IMAGE_BYTES // 2**20} MiB are read")
            return read_member(member, handles)
        path = os.fsdecode(self.paths[i])
        try:
            size = os.stat(path).st_size
        except OSError as e:
            raise UserError(f"{path}: cannot read image ({e.strerror or e})") from e
        if size > MAX_IMAGE_BYTES:
            raise UserError(f"{path}: an image of {size / 2**20:,.0f} MiB; at most {MAX_IMAGE_BYTES // 2**20} MiB "
                            "are read")
        return path

    def digest(self, update) -> None:
        """Feed what identifies the images to a hash's `update`: every file's path (or member's place) and size, and
        the whole bytes of DIGEST_SAMPLES files spread evenly over the list. Reading every image would take a pass
        over the data set; sizes and a sample catch images added, removed, re-encoded or rewritten in place."""
        if self.paths is not None:
            for p in self.paths.tolist():
                update(p)
                update(b"\0")
        else:
            for name in self.shards:
                update(os.fsencode(Path(name).name))
            for array in (self.shard, self.offset):
                update(array.tobytes())
        update(self.size.tobytes())
        handles: dict = {}
        try:
            for i in np.linspace(0, self.count - 1, min(DIGEST_SAMPLES, self.count)).round().astype(int).tolist():
                data = self.read(i, handles)
                if isinstance(data, str):
                    with open(data, "rb") as f:
                        data = f.read()
                update(hashlib.sha256(data).digest())
        except OSError as e:
            raise UserError(f"{self.where(i)}: cannot read image ({e.strerror or e})") from e
        finally:
            for handle in handles.values():
                handle.close()


class _Batches(torch.utils.data.Dataset):
    """What a worker decodes: one request (split, indices, keys or None) -> (uint8 [B, 3, S, S], error or None). A
    bad image becomes an error line returned with the batch (an exception raised in a worker reaches the caller
    wrapped in a traceback)."""

    def __init__(self, splits: dict[str, Sources], views: Views):
        self.splits, self.views = splits, views
        self._handles: dict = {}

    def __len__(self) -> int:  # requests come from the sampler; this only satisfies the Dataset protocol
        return 0

    def __getitem__(self, request):
        split, indices, keys = request
        sources = self.splits[split]
        out = np.empty((len(indices), self.views.size, self.views.size, 3), dtype=np.uint8)
        try:
            for j, i in enumerate(indices.tolist()):
                out[j] = decode(sources.read(i, self._handles), sources.where(i), self.views,
                                None if keys is None else int(keys[j]))
        except UserError as e:
            return torch.empty(0, dtype=torch.uint8), str(e)
        return torch.from_numpy(out).permute(0, 3, 1, 2), None


def _as_is(item):
    return item


def decoded(index: "StreamIndex", views: Views, requests: list, workers: int, *, pin: bool = False
            ) -> Iterator[torch.Tensor]:
    """The uint8 batches of `requests` ((split, listed indices, keys or None) each), in order, decoded by `workers`
    processes (none: here); a worker's error line is raised here as the UserError it is."""
    loader = torch.utils.data.DataLoader(
        _Batches({"train": index.train, "test": index.test}, views), batch_size=None, sampler=requests,
        num_workers=workers, collate_fn=_as_is, pin_memory=pin, prefetch_factor=4 if workers else None)
    for images, error in loader:
        if error is not None:
            raise UserError(error)
        yield images


@dataclass
class StreamIndex:
    """A source listed but not decoded: every image's location per split, labels and class names."""
    name: str
    train: Sources
    train_y: torch.Tensor
    test: Sources
    test_y: torch.Tensor
    class_names: list[str]
    hflip: bool
    root: Path


@dataclass
class StreamingData:
    """The streamed counterpart of `Data` (see the module's docstring); `train_idx`/`val_idx` index the listed
    training images."""
    name: str
    class_names: list[str]
    index: StreamIndex
    train_idx: torch.Tensor
    train_y: torch.Tensor
    val_idx: torch.Tensor
    val_y: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    views: Views
    workers: int
    fingerprint: str
    info: dict = field(default_factory=dict)
    device: torch.device = torch.device("cpu")

    streaming = True
    pad = 0

    @property
    def hflip(self) -> bool:
        return self.views.hflip

    @property
    def augment(self) -> bool:
        return self.views.augment

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.views.size, self.views.size)

    def to(self, device: torch.device) -> "StreamingData":
        self.device = torch.device(device)
        for name in ("train_y", "val_y", "test_y"):
            setattr(self, name, getattr(self, name).to(self.device))
        # As in `Data`: normalising uses copies that live where the batches go.
        self._device_mean, self._device_std = self.mean.to(self.device), self.std.to(self.device)
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x, self._device_mean, self._device_std)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.train_idx) // batch_size)  # the ragged tail is dropped

    def distinct_views(self) -> int:
        # A random-resized crop has more outcomes than any bank of views could hold: no teacher cache is exact.
        return 2**31 if self.augment else 1

    def view_bank(self, views: int, seed: int = 0) -> torch.Tensor:
        raise UserError(cache_refusal(self, views))

    def epoch_plan(self, *, seed: int, epoch: int, view_bank: torch.Tensor | None = None):
        from . import EpochPlan, epoch_generator
        if view_bank is not None:
            raise UserError(cache_refusal(self, view_bank.shape[1]))
        n = len(self.train_idx)
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=gen)
        keys = torch.randint(0, 2**KEY_BITS, (n, 1), generator=gen)  # one augmentation key per image
        return EpochPlan(order.to(self.device), keys.to(self.device), None, not self.augment)

    def train_batches(self, *, seed: int, epoch: int, batch_size: int, view_bank: torch.Tensor | None = None):
        plan = self.epoch_plan(seed=seed, epoch=epoch, view_bank=view_bank)
        return (batch.member(0) for batch in self.group_batches([plan], batch_size))

    def group_batches(self, plans: list, batch_size: int, *, rank: int = 0, world_size: int = 1):
        """As `Data.group_batches`: batch b of each run's plan, stacked [N, B, ...]; this rank's slice only is
        decoded."""
        from . import Batch
        order = torch.stack([p.order for p in plans]).cpu()
        keys = torch.stack([p.views for p in plans]).cpu()
        n = len(plans)
        per_rank = batch_size // world_size
        picks, requests = [], []
        for b in range(self.steps_per_epoch(batch_size)):
            idx = order[:, b * batch_size:(b + 1) * batch_size][:, rank * per_rank:(rank + 1) * per_rank]
            chosen = keys.gather(1, idx[..., None].expand(-1, -1, 1))
            picks.append((idx, chosen))
            images = self.train_idx[idx.reshape(-1)].numpy()
            requests.append(("train", images, chosen.reshape(-1).numpy() if self.augment else None))
        for (idx, chosen), x in zip(picks, self._stream(requests)):
            x = self.normalize(x.to(self.device, non_blocking=True).float())
            idx = idx.to(self.device)
            yield Batch(x.unflatten(0, (n, -1)), self.train_y[idx], idx, chosen.to(self.device), None)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        labels = {"train": self.train_y, "val": self.val_y, "test": self.test_y}[split]
        for start, x in zip(range(0, len(labels), batch_size), self._evaluated(split, None, batch_size)):
            yield x, labels[start:start + batch_size]

    def inputs(self, split: str, positions: torch.Tensor) -> torch.Tensor:
        """Images `positions` of a split as the models are evaluated on them: normalised, un-augmented."""
        return torch.cat(list(self._evaluated(split, positions.cpu().numpy(), 256)))

    def _evaluated(self, split: str, positions: np.ndarray | None, batch_size: int) -> Iterator[torch.Tensor]:
        """Evaluation views of a split's images (`positions` of it, else all), normalised, in batches."""
        listed = (np.arange(self.index.test.count) if split == "test" else
                  (self.train_idx if split == "train" else self.val_idx).numpy())
        if positions is not None:
            listed = listed[positions]
        source = "test" if split == "test" else "train"
        requests = [(source, listed[s:s + batch_size], None) for s in range(0, len(listed), batch_size)]
        for x in self._stream(requests):
            yield self.normalize(x.to(self.device, non_blocking=True).float())

    def _stream(self, requests: list) -> Iterator[torch.Tensor]:
        return decoded(self.index, self.views, requests, self.workers, pin=self.device.type == "cuda")

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "train": len(self.train_idx), "val": len(self.val_idx),
                "test": int(self.index.test.count), "mean": [round(float(v), 6) for v in self.mean],
                "std": [round(float(v), 6) for v in self.std], "class_names": self.class_names,
                "label": self.info.get("label", self.name), "streamed": True,
                **({"val_is_train": True} if self.info.get("val_is_train") else {}),
                "views": {"image_size": self.views.size, "resize": self.views.resize,
                          "scale": list(self.views.scale)}}


def cache_refusal(data: StreamingData, views: int) -> str:
    """Why `kd.cache: on` cannot hold for streamed data, with the arithmetic of what the bank would take."""
    n = len(data.train_idx)
    size = n * views * data.num_classes * 4
    shown = f"{size / 2**30:,.1f} GiB" if size >= 2**30 else f"{size / 2**20:,.2f} MiB"
    return (f"config: kd.cache: on cannot serve streamed data: a bank of {views} views of {n:,} images x "
            f"{data.num_classes:,} classes is {shown} of float32 logits and {views} teacher passes over the "
            "training set, and a random-resized crop is drawn afresh each epoch, so no bank is exact; set kd.cache: "
            "off (or auto, which runs the teacher online)")


def fingerprint(index: StreamIndex, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(repr(sorted(settings.items())).encode())
    for sources, labels in ((index.train, index.train_y), (index.test, index.test_y)):
        sources.digest(digest.update)
        digest.update(labels.numpy().tobytes())
    return digest.hexdigest()[:16]


def estimate_statistics(index: StreamIndex, train_idx: torch.Tensor, views: Views, workers: int,
                        count: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of `count` training images spread evenly over the split (evaluation views): the
    resident sets use every pixel; a streamed set would take a pass over all of it."""
    picks = train_idx[torch.linspace(0, len(train_idx) - 1, min(count, len(train_idx))).round().long()].numpy()
    requests = [("train", picks[s:s + 64], None) for s in range(0, len(picks), 64)]
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    pixels = 0
    for images in decoded(index, views, requests, workers):
        x = images.double() / 255.0
        total += x.sum(dim=(0, 2, 3))
        squares += (x * x).sum(dim=(0, 2, 3))
        pixels += x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / pixels
    std = (squares / pixels - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.clamp_min(1e-3).float()
