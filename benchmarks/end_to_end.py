"""Wall time of distilling from a 4-checkpoint snapshot ensemble vs training the same student alone, through the CLI.

    python benchmarks/end_to_end.py [--json]

A resnet20 teacher is trained on digits (`configs/digits_teacher.yaml` with model.name=resnet20; checkpoints at 0.3,
0.5, 0.7 and 1.0 of training: `TEACHER@all` is the 4-checkpoint snapshot ensemble). The student is the resnet8 recipe
of the same file (30 epochs, batch 64, crop augmentation: 9 distinct views per image). Each student is one
`ckptkd distill` process, timed from launch to exit (start-up, data, evaluation and checkpoint writes included):

  alone      no teacher (cross-entropy only)
  cold       the ensemble with `kd.cache: auto`, its cache not built yet (the first student of a study pays for it)
  warm       the ensemble with the cache already built (every later student, seed and variant)
  online     the ensemble run on every batch (`kd.cache: off`)

Runs alternate between the modes and each mode's time is the least disturbed of --rounds rounds (a fresh teacher
cache for every cold run). Target: cold and warm <= 1.3x alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "digits_teacher.yaml"
QUIET = ["--set", "log.progress=false", "--set", "log.tensorboard=false"]


def ckptkd(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ckptkd", *args], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def measure(rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="ckptkd-e2e-") as tmp:
        tmp = Path(tmp)
        teacher = tmp / "teacher"
        ckptkd("train", str(CONFIG), "--out", str(teacher), "--set", "model.name=resnet20", *QUIET)
        ensemble = f"{teacher}@all"
        seconds: dict[str, list[float]] = {"alone": [], "cold": [], "warm": [], "online": []}
        for r in range(rounds):
            shutil.rmtree(teacher / "cache", ignore_errors=True)
            for mode, extra in (("alone", []), ("cold", ["--teacher", ensemble]), ("warm", ["--teacher", ensemble]),
                                ("online", ["--teacher", ensemble, "--set", "kd.cache=off"])):
                seconds[mode].append(ckptkd("distill", str(CONFIG), "--out", str(tmp / f"{mode}-{r}"), *extra,
                                            *QUIET))
    best = {mode: min(times) for mode, times in seconds.items()}
    return {"teacher": "resnet20 (digits, 4 checkpoints)", "student": "resnet8", "rounds": rounds,
            "seconds": {mode: round(s, 2) for mode, s in best.items()},
            "all_seconds": {mode: [round(s, 2) for s in times] for mode, times in seconds.items()},
            "ratio_to_alone": {mode: round(best[mode] / best["alone"], 3) for mode in ("cold", "warm", "online")},
            "target": 1.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.rounds)
    if args.json:
        print(json.dumps(result))
        return
    for mode, s in result["seconds"].items():
        ratio = result["ratio_to_alone"].get(mode)
        verdict = "" if ratio is None or mode == "online" else ("  met" if ratio <= result["target"] else "  NOT met")
        print(f"{mode:7s} {s:7.2f} s" + (f"   {ratio:.3f}x alone{verdict}" if ratio is not None else ""))


if __name__ == "__main__":
    main()
