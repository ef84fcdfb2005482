"""An older commit against this tree, side by side on one machine: `ckptkd demo` end to end, or the fused bench.

    python benchmarks/demo_speed.py --old 76b0704 [--rounds 2] [--json]                  # demo wall time
    python benchmarks/demo_speed.py --old 2cffec7 --what fused [--rounds 3] [--json]     # bench --workload fused

Each side runs `python -m ckptkd ...` as `make demo` does (OMP_WAIT_POLICY=PASSIVE, the machine's threads), with
PYTHONPATH pointing at that side's `src/`: the older commit's sources are exported with `git archive` into a
temporary folder (nothing in this checkout changes), the newer side is this tree. The sides take turns within each
round; the best round of each counts. Prints old / new: wall seconds for the demo (above 1: this tree is faster),
and for the fused bench each workload's images per second one at a time and as one group (below 1: this tree is
faster) with both sides' fused_over_sequential.
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


def ckptkd(src: Path, *args: str) -> tuple[float, str]:
    """Wall seconds and stdout of `python -m ckptkd ARGS` with the sources in `src`."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_WAIT_POLICY": "PASSIVE"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ckptkd", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"ckptkd {' '.join(args)} failed with {src}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="the older commit (e.g. 76b0704)")
    parser.add_argument("--what", choices=["demo", "fused"], default="demo")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckptkd-side-by-side-") as tmp:
        tmp = Path(tmp)
        sides = {"old": export(args.old, tmp / "old"), "new": REPO / "src"}
        measured = {side: [] for side in sides}
        for r in range(args.rounds):
            for side, src in sides.items():
                if args.what == "demo":
                    seconds, _ = ckptkd(src, "demo", "--out", str(tmp / f"{side}-{r}"))
                    measured[side].append(seconds)
                    print(f"round {r + 1}: {side} {seconds:.1f} s", file=sys.stderr, flush=True)
                else:
                    _, out = ckptkd(src, "bench", "--workload", "fused", "--rounds", "1", "--json")
                    measured[side].append(json.loads(out)["results"])
                    print(f"round {r + 1}: {side} {measured[side][-1]}", file=sys.stderr, flush=True)
    if args.what == "demo":
        best = {side: min(v) for side, v in measured.items()}
        result = {"old": args.old, "seconds": measured, "best_s": best,
                  "old_over_new": round(best["old"] / best["new"], 3)}
        text = (f"ckptkd demo: {args.old} {best['old']:.1f} s, this tree {best['new']:.1f} s (best of {args.rounds}); "
                f"old / new = {result['old_over_new']:.2f}")
    else:
        result, lines = {"old": args.old, "workloads": {}}, []
        for name in measured["old"][0]:
            best = {side: {k: max(r[name][k] for r in rounds) for k in ("sequential_img_s", "fused_img_s")}
                    for side, rounds in measured.items()}
            row = {side: {**best[side], "fused_over_sequential": round(best[side]["fused_img_s"]
                                                                       / best[side]["sequential_img_s"], 3)}
                   for side in best}
            row["old_over_new"] = {k: round(best["old"][k] / best["new"][k], 3)
                                   for k in ("sequential_img_s", "fused_img_s")}
            result["workloads"][name] = row
            lines.append(f"{name}: one at a time {best['old']['sequential_img_s']:.0f} -> "
                         f"{best['new']['sequential_img_s']:.0f} img/s, as one group {best['old']['fused_img_s']:.0f}"
                         f" -> {best['new']['fused_img_s']:.0f} img/s (old / new {row['old_over_new']['fused_img_s']:.2f}"
                         f"); fused_over_sequential {row['old']['fused_over_sequential']:.2f} -> "
                         f"{row['new']['fused_over_sequential']:.2f}")
        text = f"ckptkd bench --workload fused, {args.old} -> this tree (best of {args.rounds}):\n" + "\n".join(lines)
    print(json.dumps(result) if args.json else text)


if __name__ == "__main__":
    main()
