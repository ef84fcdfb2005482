"""`ckptkd bench --workload folder`: the streaming image path against its own limits, side by side in one run.

A generated ImageNet-layout folder (`data.photos`: crops of scikit-learn's two photos, 128-256 px, JPEG) is trained
on through the training loop's epoch routine, and compared with:
  decode_limit      the same workers decoding, cropping, resizing and flipping the same epoch's batches, and the
                    main process normalising them, with no model: what streaming can feed at most
  streamed_train    the student trained on the streamed batches (`loop.train_epoch`, the real path)
  resident_train    the same student trained on the same images held in memory (decoded once at image_size, then
                    cropped and flipped on the device): what the model costs without any decoding
Target: streamed_train >= 0.8 x decode_limit. On a CPU the decoders and the model share the cores: were they to take
turns on the whole CPU, training would run at 1 / (1/decode_limit + 1/resident_train) (`cpu_shared_limit`, reported
beside it; overlapping a model step that leaves cores idle with decoding beats it).
"""

from __future__ import annotations

import itertools
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .. import config as config_mod
from .. import data as data_mod
from ..data.images import image_size_of
from ..errors import UserError
from ..data.photos import write_photo_folder
from ..models import from_spec
from ..training.recipe import make_optimizer, model_spec, pick_device
from .bench import engine_for, sync, timed_steps

MAX_IMAGES = 50_000  # generated JPEGs of 128-256 px: about 0.6 GB on disk at most
FOLDER_WORKLOAD = {"images": 2000, "classes": 10, "sizes": (128, 256), "image_size": 64, "batch": 64,
                   # A student light enough that decoding, not the model, bounds a 2-core CPU (what the bench is about);
                   # resident_train shows what the model alone costs.
                   "student": {"name": "mlp", "widths": [16]}, "steps": 12, "rounds": 2}


def _decode_seconds(data, seed: int, steps: int, batch: int) -> float:
    """Seconds for `steps` streamed batches with no model: decode, crop, resize, flip (workers), normalise (here)."""
    sync(data.device)
    started = time.perf_counter()
    done, epoch = 0, 1
    while done < steps:  # across epochs, as `timed_steps` trains, when an epoch has fewer steps
        for _ in itertools.islice(data.train_batches(seed=seed, epoch=epoch, batch_size=batch), steps - done):
            done += 1
        epoch += 1
    sync(data.device)
    return time.perf_counter() - started


def _resident_copy(data, folder: Path) -> Path:
    """The listed training images (the streamed training and validation splits) and the test images at image_size
    (their evaluation views), as an npz the resident path reads and splits the same way."""
    def pixels(split):
        x = torch.cat([x for x, _ in data.eval_batches(split, 256)])
        x = (x * data.std.view(1, -1, 1, 1) + data.mean.view(1, -1, 1, 1)).mul(255).round().clamp(0, 255)
        return x.byte().permute(0, 2, 3, 1).numpy()

    path = folder / "resident.npz"
    np.savez(path, x_train=np.concatenate([pixels("train"), pixels("val")]),
             y_train=torch.cat([data.train_y, data.val_y]).cpu().numpy(), x_test=pixels("test"),
             y_test=data.test_y.cpu().numpy())
    return path


def run_folder_bench(*, images: int | None = None, steps: int | None = None, rounds: int | None = None,
                     workers: int | None = None, threads: int | None = None, device: str = "cpu",
                     folder: str | Path | None = None) -> dict:
    w = dict(FOLDER_WORKLOAD)
    n_images, n_steps, n_rounds = images or w["images"], steps or w["steps"], rounds or w["rounds"]
    if not w["classes"] * 10 <= n_images <= MAX_IMAGES:  # 10 a class: one of them held out for validation
        raise UserError(f"bench: --images {n_images:,}: the folder workload generates {w['classes'] * 10} to "
                        f"{MAX_IMAGES:,} images")
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="ckptkd-bench-") as tmp:
        tmp = Path(tmp)
        root = Path(folder) if folder is not None else write_photo_folder(
            tmp / "photos", classes=w["classes"], train_per_class=n_images // w["classes"], test_per_class=8,
            sizes=w["sizes"], png_every=10**9, modes=False)
        base = {"device": str(dev), "log": {"progress": False, "tensorboard": False},
                "model": w["student"]}
        streamed_cfg = config_mod.resolve({**base, "data": {
            "name": "imagenet", "root": str(root), "resident": False, "image_size": w["image_size"],
            "workers": workers, "batch_size": w["batch"], "val_fraction": 0.1}})
        streamed = data_mod.build(streamed_cfg["data"], dev)
        resident_cfg = config_mod.resolve({**base, "data": {
            "name": "npz", "root": str(_resident_copy(streamed, tmp)), "val_fraction": 0.1,
            "batch_size": w["batch"], "hflip": True, "pad": 4}})
        resident = data_mod.build(resident_cfg["data"], dev)

        def timed(cfg, data, seed):
            torch.manual_seed(0)
            student = from_spec(model_spec(cfg, data)).to(dev)
            engine, objective = engine_for("direct", [student], [make_optimizer(cfg, student)], [cfg], [None], data,
                                        dev)
            return timed_steps(engine, objective, data, cfg, [seed], steps=n_steps)

        seconds: dict[str, list[float]] = {"decode_limit": [], "streamed_train": [], "resident_train": []}
        for r in range(n_rounds):  # each round a fresh epoch (seed r), so no round reads what the page cache kept
            seconds["decode_limit"].append(_decode_seconds(streamed, 100 + r, n_steps, w["batch"]))
            seconds["streamed_train"].append(timed(streamed_cfg, streamed, 200 + r))
            seconds["resident_train"].append(timed(resident_cfg, resident, 300 + r))
        sides = [side for p in sorted((root / "train").rglob("*.*"))[:500] for side in image_size_of(p)]
    rate = {k: round(n_steps * w["batch"] / min(v), 1) for k, v in seconds.items()}
    # On a CPU the workers and the model share the cores: decoding and training taking turns on the whole CPU would
    # give 1 / (1/decode + 1/resident); a model step that leaves cores idle lets the decoders overlap it and beat that.
    shared = 1 / (1 / rate["decode_limit"] + 1 / rate["resident_train"])
    return {"workload": {"name": "folder", "images": streamed.describe()["train"], "classes": w["classes"],
                         "source_sizes_px": [min(sides), max(sides)],
                         "image_size": w["image_size"], "student": w["student"]["name"], "batch": w["batch"],
                         "steps": n_steps, "rounds": n_rounds, "workers": workers,
                         "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                         "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                         "torch": torch.__version__, "machine": platform.processor() or platform.machine()},
            "img_per_s": rate,
            "cpu_shared_limit": round(shared, 1),
            "ratios": {"streamed_train/decode_limit": round(rate["streamed_train"] / rate["decode_limit"], 3),
                       "streamed_train/cpu_shared_limit": round(rate["streamed_train"] / shared, 3)}}


def print_folder_bench(result: dict) -> None:
    from ..formatting import terminal_console
    w = result["workload"]
    console = terminal_console()
    console.print(f"ckptkd bench — folder: {w['images']:,} JPEGs of {w['source_sizes_px'][0]}-"
                  f"{w['source_sizes_px'][1]} px streamed to {w['image_size']} px for {w['student']}, batch "
                  f"{w['batch']}, {w['workers']} workers, {w['threads']} threads, {w['steps']} steps x best of "
                  f"{w['rounds']} rounds ({w['device']})")
    for mode, value in result["img_per_s"].items():
        console.print(f"  {mode:<16} {value:8.1f} img/s")
    value = result["ratios"]["streamed_train/decode_limit"]
    console.print(f"streamed_train/decode_limit {value:.3f}   target >= 0.8   {'met' if value >= 0.8 else 'NOT met'}")
    console.print(f"streamed_train/cpu_shared_limit {result['ratios']['streamed_train/cpu_shared_limit']:.3f}   (the "
                  f"decoders and the model taking turns on {w['cpus']} cores would give "
                  f"{result['cpu_shared_limit']:.1f} img/s; overlap can beat it)")
