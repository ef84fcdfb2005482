"""What `ckptkd analyze` costs relative to training the run it analyses, measured side by side in one process.

    python benchmarks/analysis_cost.py [--only digits|fashion] [--json]

digits:  configs/digits_teacher.yaml with a checkpoint every 5 epochs (target: analysis <= 50% of training)
fashion: configs/fashion_teacher.yaml as in the Fashion-MNIST study, no augmentation (target: <= 20%)
Analysis time is a cold `analyze` (empty cache, plots included); a second, cached call is reported too.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ckptkd

REPO = Path(__file__).resolve().parents[1]
CASES = {
    "digits": (REPO / "configs" / "digits_teacher.yaml", {"checkpoints.every": 5}, 0.5),
    "fashion": (REPO / "configs" / "fashion_teacher.yaml", {"data.augment": False}, 0.2),
}


def measure(name: str) -> dict:
    config, overrides, target = CASES[name]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / name
        overrides = {**overrides, "log.progress": False, "log.tensorboard": False}
        started = time.perf_counter()
        ckptkd.train(config, overrides=overrides, out=run, quiet=True)
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        analysis = ckptkd.analyze(run, quiet=True)
        analyze_s = time.perf_counter() - started
        started = time.perf_counter()
        ckptkd.analyze(run, quiet=True)
        cached_s = time.perf_counter() - started
    return {"case": name, "checkpoints": len(analysis["checkpoints"]), "train_s": round(train_s, 1),
            "analyze_s": round(analyze_s, 1), "analyze_cached_s": round(cached_s, 2),
            "ratio": round(analyze_s / train_s, 3), "target": target, "met": analyze_s / train_s <= target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(CASES))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    for name in [args.only] if args.only else list(CASES):
        result = measure(name)
        print(json.dumps(result) if args.json else
              f"{name:8s} {result['checkpoints']:3d} checkpoints  train {result['train_s']:7.1f} s  analyze "
              f"{result['analyze_s']:6.1f} s (cached {result['analyze_cached_s']:.2f} s)  ratio {result['ratio']:.3f}"
              f"  target <= {result['target']}  {'met' if result['met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
