"""`ckptkd demo` end to end, an older commit against this tree, side by side on one machine.

    python benchmarks/demo_speed.py --old 76b0704 [--rounds 2] [--json]

Each side runs `python -m ckptkd demo --out TMP` as `make demo` does (OMP_WAIT_POLICY=PASSIVE, the machine's
threads), with PYTHONPATH pointing at that side's `src/`: the older commit's sources are exported with `git archive`
into a temporary folder (nothing in this checkout changes), the newer side is this tree. The sides take turns within
each round; the best round of each counts. Prints each run's wall time and old / new.
"""

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def export(commit: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(REPO), "archive", commit, "src"], check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def run_demo(src: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckptkd", "demo", "--out", str(out)], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"demo failed with {src}:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the older commit (e.g. 76b0704)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptkd-demo-speed-") as tmp:
        tmp = Path(tmp)
        sides = {"old": export(args.old, tmp / "old"), "new": REPO / "src"}
        seconds = {side: [] for side in sides}
        for r in range(args.rounds):
            for side, src in sides.items():
                seconds[side].append(run_demo(src, tmp / f"{side}-{r}"))
                print(f"round {r + 1}: {side} {seconds[side][-1]:.1f} s", file=sys.stderr, flush=True)
    best = {side: min(v) for side, v in seconds.items()}
    result = {"old": args.old, "seconds": seconds, "best_s": best, "old_over_new": round(best["old"] / best["new"], 3)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"ckptkd demo: {args.old} {best['old']:.1f} s, this tree {best['new']:.1f} s (best of {args.rounds}); "
              f"old / new = {result['old_over_new']:.2f}")


if __name__ == "__main__":
    main()
