"""A teacher's output cache: each model's logits on a bank of augmented views of every training image.

For every training image the bank holds V views (all of them when the augmentation has at most V outcomes), and each
model's logits on them are stored as float16 safetensors, one file per checkpoint, keyed by the checkpoint's sha256
and everything that decides the outputs: the data (its fingerprint), the augmentation (crop padding, flip, views)
and how the model computes (layout, autocast, mode). Students then draw each image's view from the bank, so a student
trains on exactly the image the teacher saw (cf. Shen & Xing, ECCV 2022), and an ensemble costs a table lookup
instead of M forwards per batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..data import Data
from ..data.augment import apply_views
from ..errors import UserError
from ..run.storage import ensure_writable, read_tensors, remove_stale_temporaries, save_tensors

# Bump when the bank or the stored logits change meaning, so old cache files are not reused.
CACHE_VERSION = 2


def cache_settings(data: Data, bank: torch.Tensor, numerics: dict) -> dict:
    """Everything besides the checkpoint itself that decides the cached outputs; part of each file's key."""
    return {"version": CACHE_VERSION, "data": data.fingerprint, "pad": data.pad, "hflip": data.hflip,
            "augment": data.augment, "views": int(bank.shape[1]), "images": int(bank.shape[0]),
            "classes": data.num_classes, **numerics}


def cache_path(folder: Path, teacher_sha256: str, settings: dict) -> Path:
    key = hashlib.sha256((teacher_sha256 + json.dumps(settings, sort_keys=True)).encode()).hexdigest()[:32]
    return folder / f"logits-{key}.safetensors"


def read_cache(path: Path, settings: dict, teacher_sha256: str) -> torch.Tensor | None:
    """A cache file's table if it exists and was built for exactly this teacher and these settings, else None (it
    is then built). A damaged file is refused, naming it: a teacher's outputs are never read from one."""
    if not path.is_file():
        return None
    tensors, meta = read_tensors(path, what="teacher cache", remedy="delete it; it is built again on the next run")
    if meta.get("teacher_sha256") != teacher_sha256 or any(meta.get(k) != v for k, v in settings.items()):
        return None  # built for other settings (an older cache version): build it anew
    table = tensors.get("logits")
    if table is None:
        return None
    if table.dtype != torch.float16 or tuple(table.shape) != (settings["images"], settings["views"],
                                                              settings["classes"]):
        return None
    return table


def build_tables(forward: Callable[[torch.Tensor], torch.Tensor], data: Data, bank: torch.Tensor, models: int,
                 batch_size: int, quiet: bool) -> list[torch.Tensor]:
    """`models` tables [N, V, C] float16: `forward(x)` ([models, B, C] logits of normalised images) on every view of
    the bank."""
    n, v = bank.shape[:2]
    tables = torch.empty(models, n, v, data.num_classes, dtype=torch.float16)
    bar = tqdm(total=n * v, desc="teacher cache", unit="img", leave=False, disable=True if quiet else None,
               file=sys.stderr)
    for view in range(v):
        for start in range(0, n, batch_size):
            end = min(n, start + batch_size)
            x = apply_views(data.train_x[start:end], bank[start:end, view], pad=data.pad)
            tables[:, start:end, view] = forward(data.normalize(x)).to("cpu", torch.float16)
            bar.update(end - start)
    bar.close()
    return list(tables)


def default_batch_size(data: Data) -> int:
    # Large batches amortise per-layer overhead, which dominates on small images (a folded, channels-last resnet20 on
    # 8x8: 1.6x faster per image at 2048 than at 64); ~2M input values per batch keeps activations to tens of MB.
    return max(256, min(4096, (1 << 21) // max(1, data.train_x[0].numel())))


def load_or_build(teacher, data: Data, *, views: int, cache_dir: str | Path | None,
                  batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, list[Path], int]:
    """The logits [M, N, V, C] of `teacher`'s models on a bank of `views` views of every training image, read from
    the cache files or built for those missing and saved; returns (logits, bank, files, how many were built).

    Files go to `cache_dir`, or beside each checkpoint in its run's cache/ folder."""
    bank = data.view_bank(views)
    settings = cache_settings(data, bank, teacher.numerics)
    folders = [Path(cache_dir) if cache_dir is not None else ckpt.run / "cache" for ckpt in teacher.checkpoints]
    for folder in dict.fromkeys(folders):  # once each
        remove_stale_temporaries(folder, shared=True)  # what a killed build left; others may be building now
    paths = [cache_path(folder, ckpt.sha256, settings) for ckpt, folder in zip(teacher.checkpoints, folders)]
    tables = [read_cache(path, settings, ckpt.sha256) for path, ckpt in zip(paths, teacher.checkpoints)]
    missing = [i for i, table in enumerate(tables) if table is None]
    if missing:
        for folder in dict.fromkeys(folders[i] for i in missing):  # before the teachers' forwards are spent
            try:
                ensure_writable(folder)
            except OSError as e:
                raise UserError(f"cannot write the teacher cache into {folder} ({e.strerror or e}): set "
                                "kd.cache_dir to a folder you can write, or kd.cache: off") from e
        forward = teacher.forward_of(missing)
        built = build_tables(forward, data, bank, len(missing), batch_size or default_batch_size(data), teacher.quiet)
        for i, table in zip(missing, built):
            ckpt = teacher.checkpoints[i]
            save_tensors(paths[i], {"logits": table},
                         metadata={**settings, "teacher_sha256": ckpt.sha256, "teacher": ckpt.reference})
            tables[i] = table
    return torch.stack(tables).to(data.train_x.device), bank, paths, len(missing)
