"""Tensor-resident data: each split is one uint8 tensor on the training device, batched by index permutation.

Every later choice (best-val, T*, the study's comparisons) uses the validation split carved here from the training
set; the test set is only ever reported.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .. import memory
from ..errors import UserError, note
from .augment import apply_views, identity_views, normalize, sample_views
from .images import image_size_of, list_folder, list_tiny_imagenet
from .shards import list_shards
from .sources import SOURCES, RawData, load_raw
from .streaming import StreamIndex, StreamingData, Sources, Views, estimate_statistics
from .streaming import fingerprint as stream_fingerprint

__all__ = ["Data", "StreamingData", "Batch", "EpochPlan", "build", "SOURCES", "STREAMED", "RawData", "load_raw",
           "epoch_generator", "channel_statistics"]

# Data sets read once per process (a study worker, a notebook), keyed by source and root, each kept with the
# signature of the files it was read from: a root whose files changed since is read anew.
_RAW_CACHE: dict[tuple[str, str | None], tuple[object, RawData]] = {}
_INDEX_CACHE: dict[tuple[str, str | None], tuple[object, StreamIndex]] = {}
_AUTO_STREAMS: dict[tuple[str, str | None], tuple[object, bool]] = {}
_NOTED_NO_VALIDATION: set[str] = set()  # `data.resident: auto`'s verdict, found (and said) once


@dataclass
class Batch:
    x: torch.Tensor        # normalised float images [B, C, H, W]
    y: torch.Tensor        # labels [B]
    # The rest lives on the data's device too.
    index: torch.Tensor    # positions in the training split (int64 [B]), so per-image caches can be looked up
    views: torch.Tensor    # the augmentation views applied (int16 [B, 3])
    view_ids: torch.Tensor | None = None  # which of each image's banked views was drawn (int64 [B])

    def member(self, i: int) -> "Batch":
        """Run i's own batch of a batch stacked for a group ([N, B, ...] in every field)."""
        return Batch(self.x[i], self.y[i], self.index[i], self.views[i],
                     None if self.view_ids is None else self.view_ids[i])

    def chunks(self, k: int, dim: int = 0) -> list["Batch"]:
        """The batch in k consecutive pieces along its batch dimension (`dim`: 0 for a run's own batch, 1 for a
        group's stacked one), as gradient accumulation computes one step: piece sizes differ by at most one."""
        if k == 1:
            return [self]
        fields = [torch.tensor_split(t, k, dim) if t is not None else [None] * k
                  for t in (self.x, self.y, self.index, self.views, self.view_ids)]
        return [Batch(*parts) for parts in zip(*fields) if parts[1].shape[dim] > 0]


@dataclass
class EpochPlan:
    """One run's epoch: the order of the training images and each one's view, on the data's device."""
    order: torch.Tensor                # int64 [n]
    views: torch.Tensor                # int16 [n, 3], indexed by image (not by position in `order`)
    view_ids: torch.Tensor | None      # int64 [n]: which banked view each image shows, with a view bank
    plain: bool                        # every view is the identity: images go in as they are


@dataclass
class Data:
    name: str
    class_names: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    pad: int
    hflip: bool
    augment: bool
    fingerprint: str
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self._place_statistics()

    def _place_statistics(self) -> None:
        # `mean`/`std` stay on the CPU (they are described and compared there); normalising uses copies that live
        # where the images do, because a copy per batch would make a GPU wait for the host every step.
        self._device_mean, self._device_std = self.mean.to(self.train_x.device), self.std.to(self.train_x.device)

    streaming = False

    @property
    def device(self) -> torch.device:
        return self.train_x.device

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def to(self, device: torch.device) -> "Data":
        for name in ("train_x", "train_y", "val_x", "val_y", "test_x", "test_y"):
            setattr(self, name, getattr(self, name).to(device))
        self._place_statistics()
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Images in 0..255 on the data's device -> normalised with the training split's statistics."""
        return normalize(x, self._device_mean, self._device_std)

    def epoch_views(self, epoch_gen: torch.Generator, n: int) -> torch.Tensor:
        if self.augment:
            return sample_views(n, pad=self.pad, hflip=self.hflip, generator=epoch_gen)
        return identity_views(n, pad=self.pad)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.train_x.shape[0] // batch_size)  # the ragged tail is dropped

    def distinct_views(self) -> int:
        if not self.augment:
            return 1
        return (2 * self.pad + 1) ** 2 * (2 if self.hflip else 1)

    def view_bank(self, views: int, seed: int = 0) -> torch.Tensor:
        """A fixed bank of augmented views per training image: int16 [N, V, 3].

        When the augmentation has at most `views` distinct outcomes, the bank enumerates all of them (so a cache of
        teacher outputs on it is exact); otherwise each image gets `views` random ones, drawn with a fixed seed.
        """
        n = self.train_x.shape[0]
        if not self.augment:
            return identity_views(n, pad=self.pad)[:, None, :].contiguous()
        if self.distinct_views() <= views:
            offsets = torch.arange(2 * self.pad + 1)
            flips = torch.arange(2 if self.hflip else 1)
            grid = torch.cartesian_prod(offsets, offsets, flips).to(torch.int16)  # [V, 3]
            return grid[None].expand(n, -1, -1).contiguous()
        gen = torch.Generator().manual_seed(seed + 424_242)
        return sample_views(n * views, pad=self.pad, hflip=self.hflip, generator=gen).view(n, views, 3)

    def epoch_plan(self, *, seed: int, epoch: int, view_bank: torch.Tensor | None = None) -> EpochPlan:
        """The epoch's order and augmentation, drawn from (seed, epoch) alone, so resuming at an epoch boundary
        replays exactly. With a `view_bank`, each image's view is drawn from its banked ones (so cached teacher
        outputs apply)."""
        n = self.train_x.shape[0]
        gen = epoch_generator(seed, epoch)
        order = torch.randperm(n, generator=gen)
        view_ids = None
        if view_bank is None:
            views = self.epoch_views(gen, n)
        else:
            view_ids = torch.randint(0, view_bank.shape[1], (n,), generator=gen)
            views = view_bank[torch.arange(n), view_ids]
        # Nothing to crop or flip this epoch: the views are all the identity.
        plain = not bool(views[:, 2].any()) and bool((views[:, :2] == self.pad).all())
        # The epoch's draws go to the device once: a copy per batch would make a GPU wait for the host every step.
        device = self.train_x.device
        return EpochPlan(order.to(device), views.to(device), None if view_ids is None else view_ids.to(device), plain)

    def train_batches(self, *, seed: int, epoch: int, batch_size: int, view_bank: torch.Tensor | None = None
                      ) -> Iterator[Batch]:
        """One run's epoch of augmented, normalised training batches (`epoch_plan`)."""
        plan = self.epoch_plan(seed=seed, epoch=epoch, view_bank=view_bank)
        return (batch.member(0) for batch in self.group_batches([plan], batch_size))

    def group_batches(self, plans: list[EpochPlan], batch_size: int, *, rank: int = 0,
                      world_size: int = 1) -> Iterator[Batch]:
        """One epoch for N runs trained together: batch b of each run's own plan, stacked ([N, B, ...] for every
        field; a run whose plan draws from no view bank has view ids 0, which nothing reads). Each run sees exactly
        the batches it would see alone, built in one gather for all N. Under torchrun every rank draws the same
        global batches and takes its own slice of each (`world_size` equal slices)."""
        order = torch.stack([p.order for p in plans])
        views = torch.stack([p.views for p in plans])
        view_ids = None
        if any(p.view_ids is not None for p in plans):
            view_ids = torch.stack([torch.zeros_like(p.order) if p.view_ids is None else p.view_ids for p in plans])
        plain = all(p.plain for p in plans)
        n = len(plans)
        per_rank = batch_size // world_size
        for b in range(self.steps_per_epoch(batch_size)):  # drop the ragged tail (a different one each epoch)
            idx = order[:, b * batch_size:(b + 1) * batch_size][:, rank * per_rank:(rank + 1) * per_rank]
            chosen = views.gather(1, idx[..., None].expand(-1, -1, 3))
            x = self.images(idx.reshape(-1), chosen.reshape(-1, 3), plain)
            yield Batch(x.unflatten(0, (n, -1)), self.train_y[idx], idx, chosen,
                        None if view_ids is None else view_ids.gather(1, idx))

    def images(self, idx: torch.Tensor, views: torch.Tensor, plain: bool) -> torch.Tensor:
        """Training images `idx` with their views applied, normalised."""
        x = self.train_x[idx].float() if plain else apply_views(self.train_x[idx], views, pad=self.pad)
        return self.normalize(x)

    def eval_batches(self, split: str, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        x_all, y_all = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
        for start in range(0, x_all.shape[0], batch_size):
            x = x_all[start:start + batch_size].float()
            yield self.normalize(x), y_all[start:start + batch_size]

    def inputs(self, split: str, positions: torch.Tensor) -> torch.Tensor:
        """Images `positions` of a split as the models are evaluated on them: normalised, un-augmented."""
        return self.normalize(getattr(self, f"{split}_x")[positions].float())

    def describe(self) -> dict:
        return {"name": self.name, "fingerprint": self.fingerprint, "num_classes": self.num_classes,
                "image_shape": list(self.image_shape), "train": int(self.train_x.shape[0]),
                "val": int(self.val_x.shape[0]), "test": int(self.test_x.shape[0]),
                "mean": [round(float(v), 6) for v in self.mean], "std": [round(float(v), 6) for v in self.std],
                "class_names": self.class_names, "label": self.info.get("label", self.name),
                **_validation_note(self.info)}


def _validation_note(info: dict) -> dict:
    # data.val_fraction: 0 (only then, so that other manifests stay as they were): "val" numbers are training images'.
    return {"val_is_train": True} if info.get("val_is_train") else {}


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 7_919 + 17)


def _stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (keep, carve): `fraction` of every class carved out, chosen by a fixed seed."""
    gen = torch.Generator().manual_seed(seed)
    keep, carve = [], []
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=gen)]
        k = int(round(fraction * len(members)))
        carve.append(members[:k])
        keep.append(members[k:])
    return torch.cat(keep).sort().values, torch.cat(carve).sort().values


def _balanced_subset(labels: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """`size` indices spread evenly over the classes (as evenly as the class counts allow)."""
    gen = torch.Generator().manual_seed(seed + 1)
    classes = torch.unique(labels).tolist()
    pools = {c: torch.nonzero(labels == c).flatten() for c in classes}
    pools = {c: p[torch.randperm(len(p), generator=gen)] for c, p in pools.items()}
    chosen: list[torch.Tensor] = []
    remaining = size
    for i, c in enumerate(sorted(classes, key=lambda c: len(pools[c]))):
        share = min(len(pools[c]), remaining // (len(classes) - i))
        chosen.append(pools[c][:share])
        remaining -= share
    return torch.cat(chosen).sort().values


def _flip_labels(labels: torch.Tensor, rate: float, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """Each label replaced, with probability `rate`, by one of the other classes drawn uniformly."""
    flip = torch.rand(len(labels), generator=gen) < rate
    shift = torch.randint(1, num_classes, (len(labels),), generator=gen)
    return torch.where(flip, (labels + shift) % num_classes, labels)


def _fingerprint(raw: RawData, settings: dict) -> str:
    digest = hashlib.sha256()
    digest.update(repr(sorted(settings.items())).encode())
    for t in (raw.train_x, raw.train_y, raw.test_x, raw.test_y):
        digest.update(t.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def channel_statistics(images: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation (at least 1e-3) of uint8 images [N, C, H, W], scaled to [0, 1]: two
    passes over chunks of images in float64, so the memory taken is a chunk's, not 8 times the set's."""
    channels, count = images.shape[1], images.shape[0] * images.shape[2] * images.shape[3]

    def pixels(part):
        return part.transpose(0, 1).reshape(channels, -1).double() / 255.0

    total = torch.zeros(channels, dtype=torch.float64)
    for part in images.split(chunk):
        total += pixels(part).sum(dim=1)
    mean = total / count
    squares = torch.zeros(channels, dtype=torch.float64)
    for part in images.split(chunk):
        squares += (pixels(part) - mean[:, None]).square().sum(dim=1)
    std = (squares / max(count - 1, 1)).sqrt()
    return mean.float(), std.clamp_min(1e-3).float()


def default_pad(height: int) -> int:
    # The usual "random crop with padding": 4 px at CIFAR's 32, 2 px at (Fashion-)MNIST's 28, 1 px at digits' 8.
    return 4 if height >= 32 else 2 if height >= 16 else 1


# Sources that can stream (`StreamingData`), each listed without decoding: (splits of (location, label), class
# names, root). webdataset only streams; the others are read into memory when they fit (`data.resident`).
STREAMED = {
    "folder": list_folder,
    "imagenet": lambda root: list_folder(root, "imagenet"),
    "tiny-imagenet": list_tiny_imagenet,
    "webdataset": list_shards,
}
_FLIPS = {"folder": False, "imagenet": True, "tiny-imagenet": True, "webdataset": True}
_DEFAULT_SIZE = {"tiny-imagenet": 64}  # the rest: ImageNet's 224
RESIDENT_SHARE = 0.5  # `data.resident: auto` holds a set in memory when it takes at most this share of what is free
_STREAM_KEYS = ("image_size", "resize", "scale")


def build(data_cfg: dict, device: torch.device | str = "cpu") -> Data | StreamingData:
    """The resolved `data:` section -> splits on `device`, with normalisation statistics from the training split:
    held in memory (`Data`) or streamed from disk (`StreamingData`) as `data.resident` decides."""
    name = data_cfg["name"]
    if name not in SOURCES and name not in STREAMED:
        raise UserError(f"config: data.name {name!r} is not a known data set "
                        f"(available: {', '.join(sorted(set(SOURCES) | set(STREAMED)))})")
    if _streams(data_cfg):
        if data_cfg["pad"] is not None:  # streamed views are random-resized crops: a padding would be ignored
            raise UserError(f"config: data.pad applies to images held in memory (random crops of the padded image); "
                            f"{name} streams here and is cropped by data.scale and data.image_size (remove "
                            "data.pad, or set data.resident: true)")
        return _build_streaming(data_cfg).to(torch.device(device))
    changed = [k for k in _STREAM_KEYS if data_cfg[k] != DATA_STREAM_DEFAULTS[k]]
    if changed:
        remedy = ("set data.resident: false to stream it" if name in STREAMED else
                  f"only {', '.join(sorted(STREAMED))} stream; leave it unset")
        raise UserError(f"config: data.{changed[0]} applies to streamed images; {name} is read into memory at its "
                        f"own size here ({remedy})")
    return _build_resident(data_cfg).to(torch.device(device))


# The streaming options at their defaults (config.DEFAULTS holds the same values).
DATA_STREAM_DEFAULTS = {"image_size": None, "resize": None, "scale": [0.08, 1.0]}


def _streams(data_cfg: dict) -> bool:
    """Whether this data set streams: always for webdataset, never for the array sources, and for image trees as
    `data.resident` says (auto: when the decoded set exceeds RESIDENT_SHARE of the free memory, or its images differ
    in size)."""
    name, resident = data_cfg["name"], data_cfg["resident"]
    if name not in STREAMED:
        if resident is False:
            raise UserError(f"config: data.resident: false streams image trees and shards "
                            f"({', '.join(sorted(STREAMED))}); {name} is held in memory")
        return False
    if name not in SOURCES:
        if resident is True:
            raise UserError(f"config: data.resident: true, but {name} shards are always streamed (set it to auto)")
        return True
    if resident != "auto":
        return not resident
    key = (name, data_cfg["root"])
    return _cached(_AUTO_STREAMS, key, lambda: _too_large_or_mixed(name, _index(*key)))


def _too_large_or_mixed(name: str, index: StreamIndex) -> bool:
    count = index.train.count + index.test.count
    first = index.train.where(0)
    width, height = image_size_of(Path(first))
    needed, budget = count * width * height * 3, memory.available_memory() * RESIDENT_SHARE
    if needed > budget:
        note(f"{name}: streaming {count:,} images ({needed / 2**30:,.1f} GiB decoded at {width}x{height} would "
             f"exceed half of the {budget * 2 / 2**30:,.1f} GiB free)")
        return True
    for sources in (index.train, index.test):
        for i in range(sources.count):
            if image_size_of(Path(sources.where(i))) != (width, height):
                note(f"{name}: streaming: {sources.where(i)} is not {width}x{height} like {first} (images of mixed "
                     "sizes are cropped and resized as they load)")
                return True
    return False


# How much of a data root `_signature` looks at: the depth of an image tree (root/train/CLASS/file) and a cap on the
# entries, so that a root holding far more than the data set (a home folder) costs a bounded walk.
SIGNATURE_DEPTH = 3
SIGNATURE_ENTRIES = 100_000


def _signature(root: str | None):
    """What a cached read of `root` stands for: the identity, size and modification time of the files under it (to
    SIGNATURE_DEPTH levels, the first SIGNATURE_ENTRIES in name order), so that a file rewritten, added or removed
    gives another; None for the built-in sets. Beyond the cap, changes to the files not looked at go unseen."""
    if root is None:
        return None
    path = Path(root).expanduser()
    digest, seen = hashlib.sha256(), 0

    def walk(folder: Path, depth: int) -> None:
        nonlocal seen
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                if seen >= SIGNATURE_ENTRIES:
                    return
                seen += 1
                st = entry.stat()
                digest.update(f"{entry.path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                if depth < SIGNATURE_DEPTH and entry.is_dir(follow_symlinks=False):
                    walk(Path(entry.path), depth + 1)

    try:
        if not path.is_dir():
            st = path.stat()
            return (st.st_ino, st.st_size, st.st_mtime_ns)
        walk(path, 1)
        return digest.hexdigest()
    except OSError:
        return object()  # unreadable now: never equal to a cached signature, so the reader says what is wrong


def _cached(cache: dict, key: tuple, read):
    signature = _signature(key[1])
    if key not in cache or cache[key][0] != signature:
        cache[key] = (signature, read())
    return cache[key][1]


def _index(name: str, root: str | None) -> StreamIndex:
    def read() -> StreamIndex:
        splits, class_names, base = STREAMED[name](root)

        def labels(entries):
            return torch.tensor([label for _, label in entries], dtype=torch.int64)

        return StreamIndex(name, Sources([e for e, _ in splits["train"]]), labels(splits["train"]),
                           Sources([e for e, _ in splits["test"]]), labels(splits["test"]), class_names,
                           _FLIPS[name], base)

    return _cached(_INDEX_CACHE, (name, root), read)


def _carve(data_cfg: dict, labels: torch.Tensor, num_classes: int):
    """The training and validation positions of the listed training images, and their labels (noisy where asked).
    `data.val_fraction: 0` trains on every image and "validates" on the training images themselves (un-augmented):
    every choice is then made on a training-split criterion, as the paper's released code trains (it chose on the
    test set instead)."""
    train_idx, val_idx = _stratified_split(labels, data_cfg["val_fraction"], data_cfg["split_seed"])
    if data_cfg["subset"] is not None:
        if data_cfg["subset"] > len(train_idx):
            raise UserError(f"config: data.subset={data_cfg['subset']} is larger than the training split "
                            f"({len(train_idx)} images)")
        train_idx = train_idx[_balanced_subset(labels[train_idx], data_cfg["subset"], data_cfg["split_seed"])]
    if data_cfg["val_fraction"] == 0:
        val_idx = train_idx
        if data_cfg["name"] not in _NOTED_NO_VALIDATION:
            _NOTED_NO_VALIDATION.add(data_cfg["name"])
            note(f"data.val_fraction: 0: {data_cfg['name']} trains on every training image; the \"val\" numbers "
                 "(best-val, T*'s tie-break, criteria on val) are measured on those same training images")
    elif len(val_idx) == 0:
        raise UserError(f"config: data.val_fraction={data_cfg['val_fraction']} leaves no validation images; "
                        "raise it, or set it to 0 to train on every image and choose on the training images")
    train_y, val_y = labels[train_idx], labels[val_idx]
    if data_cfg["label_noise"]:
        # Symmetric noise on every label carved from the training set (the validation split included, as a user's
        # noisy data set would have it); the test set stays clean, so it measures what was really learned.
        gen = torch.Generator().manual_seed(data_cfg["split_seed"] + 9_001)
        train_y, val_y = (_flip_labels(y, data_cfg["label_noise"], num_classes, gen) for y in (train_y, val_y))
        if data_cfg["val_fraction"] == 0:
            val_y = train_y  # one set of images, one set of (noisy) labels
    return train_idx, val_idx, train_y, val_y


def _settings(data_cfg: dict) -> dict:
    settings = {k: data_cfg[k] for k in ("name", "val_fraction", "split_seed", "subset")}
    if data_cfg["label_noise"]:  # only when set, so the fingerprints (and caches) of clean data stay as they were
        settings["label_noise"] = data_cfg["label_noise"]
    return settings


def _build_streaming(data_cfg: dict) -> StreamingData:
    index = _index(data_cfg["name"], data_cfg["root"])
    train_idx, val_idx, train_y, val_y = _carve(data_cfg, index.train_y, len(index.class_names))
    size = data_cfg["image_size"] or _DEFAULT_SIZE.get(index.name, 224)
    resize = data_cfg["resize"] or int(round(size / 0.875))
    if resize < size:
        raise UserError(f"config: data.resize={resize} is smaller than data.image_size={size} (the centre crop is "
                        "taken from the resized image)")
    low, high = data_cfg["scale"]  # checked with the config: 0 < low <= high <= 1
    hflip = data_cfg["hflip"] if data_cfg["hflip"] is not None else index.hflip
    views = Views(size, resize, (float(low), float(high)), hflip, data_cfg["augment"])
    workers = data_cfg["workers"] if data_cfg["workers"] is not None else min(8, os.cpu_count() or 1)
    if data_cfg["mean"] is not None:
        mean = torch.tensor(data_cfg["mean"], dtype=torch.float32)
        std = torch.tensor(data_cfg["std"] if data_cfg["std"] is not None else [1.0] * 3, dtype=torch.float32)
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"config: data.mean/data.std need 3 values for streamed {index.name} (read as RGB)")
    else:
        mean, std = estimate_statistics(index, train_idx, views, workers)
    settings = {**_settings(data_cfg), "image_size": size, "resize": resize, "streamed": True}
    return StreamingData(
        name=index.name, class_names=list(index.class_names), index=index, train_idx=train_idx,
        train_y=train_y.contiguous(), val_idx=val_idx, val_y=val_y.contiguous(), test_y=index.test_y,
        mean=mean, std=std, views=views, workers=workers, fingerprint=stream_fingerprint(index, settings),
        info={"label": Path(data_cfg["root"]).name if index.name in ("folder", "webdataset") else index.name,
              "val_is_train": data_cfg["val_fraction"] == 0})


def _build_resident(data_cfg: dict) -> Data:
    key = (data_cfg["name"], data_cfg["root"])
    raw = _cached(_RAW_CACHE, key, lambda: load_raw(*key))

    train_idx, val_idx, train_y, val_y = _carve(data_cfg, raw.train_y, raw.num_classes)
    train_x = raw.train_x[train_idx]
    channels = train_x.shape[1]
    every_image = data_cfg["val_fraction"] == 0

    if data_cfg["mean"] is not None:
        mean = torch.tensor(data_cfg["mean"], dtype=torch.float32)
        std = torch.tensor(data_cfg["std"] if data_cfg["std"] is not None else [1.0] * channels, dtype=torch.float32)
        if len(mean) != channels or len(std) != channels:
            raise UserError(f"config: data.mean/data.std need {channels} values for {raw.name} ({channels} channels)")
    else:
        mean, std = channel_statistics(train_x)

    pad = data_cfg["pad"] if data_cfg["pad"] is not None else default_pad(train_x.shape[2])
    hflip = data_cfg["hflip"] if data_cfg["hflip"] is not None else raw.hflip
    return Data(
        name=raw.name, class_names=list(raw.class_names),
        train_x=train_x.contiguous(), train_y=train_y.contiguous(),
        val_x=train_x if every_image else raw.train_x[val_idx].contiguous(), val_y=val_y.contiguous(),
        test_x=raw.test_x, test_y=raw.test_y,
        mean=mean, std=std, pad=pad, hflip=hflip, augment=data_cfg["augment"],
        fingerprint=_fingerprint(raw, _settings(data_cfg)),
        # Titles name the user's own data by its file or folder, not by the reader ("npz").
        info={"label": Path(data_cfg["root"]).name if data_cfg["name"] in ("npz", "folder") else raw.name,
              "val_is_train": every_image},
    )
