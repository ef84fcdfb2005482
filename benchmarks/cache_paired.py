"""Is the teacher-output cache neutral? Paired students that see exactly the same augmented images.

    python benchmarks/cache_paired.py TEACHER_REFERENCE [--seeds 0 1 2] [--json]
    e.g. python benchmarks/cache_paired.py results/fashion/cache-check/runs/teacher-cnn-9a3404-s0@0.5

The study's cached-vs-online comparison (configs/fashion_cache_check.yaml) lets cached and online students draw
their augmentations independently, so their difference mixes the cache's effect with augmentation luck. Here both
students of a seed draw each image's view from the same bank with the same random stream: the only difference is
where the teacher's logits come from (float16 cache vs the teacher run on the batch in float32). The student is
configs/fashion_student.yaml with the cache check's data settings (crop 2 px + flip: 50 views, all banked).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import ckptkd
from ckptkd import config as config_mod
from ckptkd.teachers import Teacher
from ckptkd.training.loop import Member, fit_one

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"data.augment": True, "data.pad": 2, "data.subset": 5000, "data.val_fraction": 0.0834,
            "kd.cache": "on", "kd.views": 50, "log.progress": False, "log.tensorboard": False}


class _OnlineOnBankViews(Teacher):
    """Draws views from the bank like a cached teacher, but computes every batch's logits online."""

    def logits(self, batch):
        return self._forward(batch.x)


def student(reference: str, seed: int, online: bool, out: Path) -> float:
    cfg = config_mod.resolve(REPO / "configs" / "fashion_student.yaml", {**SETTINGS, "seed": seed})
    cfg["kd"]["teachers"] = [reference]
    kind = _OnlineOnBankViews if online else Teacher
    teacher = kind.from_references([reference], quiet=True)
    return fit_one(Member(cfg, out, teacher, "distill"), quiet=True).final.test_acc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ckptkd-paired-") as tmp:
        for seed in args.seeds:
            cached = student(args.teacher, seed, False, Path(tmp) / f"cached-{seed}")
            online = student(args.teacher, seed, True, Path(tmp) / f"online-{seed}")
            rows.append({"seed": seed, "cached": cached, "online": online, "diff_points": 100 * (cached - online)})
            if not args.json:
                print(f"seed {seed}: cached {100 * cached:.2f}  online {100 * online:.2f}  "
                      f"diff {100 * (cached - online):+.2f}", flush=True)
    diffs = [r["diff_points"] for r in rows]
    summary = {"teacher": args.teacher, "rows": rows, "mean_diff_points": statistics.mean(diffs),
               "max_abs_diff_points": max(map(abs, diffs))}
    print(json.dumps(summary) if args.json else
          f"mean cached - online: {summary['mean_diff_points']:+.2f} points, largest |diff| "
          f"{summary['max_abs_diff_points']:.2f} ({ckptkd.__version__})")


if __name__ == "__main__":
    main()
