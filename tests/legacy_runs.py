"""Single runs that must come out bit-identical from every version of the training loop since 0.3.

    python tests/legacy_runs.py OUT          # run the scenarios with the ckptkd on sys.path; print their fingerprints

Each scenario trains or distills one run with the public API that 0.3 and later share (`ckptkd.train`,
`ckptkd.distill`), so the same file drives the code of any commit (tests/test_one_loop.py runs it against 0.3's
sources, exported from git, and against this tree). A fingerprint is every checkpoint's sha256 and every epoch's
record except its wall time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BASE = {
    "name": "legacy", "seed": 3, "device": "cpu",
    "data": {"name": "digits", "batch_size": 64},
    "model": {"name": "resnet8"},
    "optim": {"lr": 0.05},
    "schedule": {"name": "multistep", "epochs": 3, "milestones": [0.5, 0.75]},
    "checkpoints": {"fractions": [0.3, 0.5, 0.7, 1.0]},
    "log": {"progress": False, "tensorboard": False},
}
STUDENT = {"model": {"name": "mlp", "widths": [32], "dropout": 0.2}, "checkpoints": {"fractions": [0.5, 1.0]}}


def config(**sections) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for key, value in sections.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


# name -> (kind, config, teacher references relative to OUT)
SCENARIOS = {
    "teacher": ("train", config(), None),
    # dropout draws from the global RNG, AdamW keeps two buffers, the schedule warms up
    "dropout_adamw": ("train", config(**STUDENT, optim={"name": "adamw", "lr": 0.003},
                                      schedule={"name": "cosine", "epochs": 3, "warmup_epochs": 1}), None),
    "kd_online": ("distill", config(**STUDENT, kd={"cache": "off", "temperature": 4.0, "alpha": 0.5}),
                  ["teacher@0.5"]),
    "kd_cached": ("distill", config(**STUDENT, kd={"cache": "on", "views": 4, "alpha": 0.3}), ["teacher@0.7"]),
    "kd_snapshot_logits": ("distill", config(**STUDENT, kd={"cache": "off", "ensemble": "logits"}),
                           ["teacher@0.3,0.5,1.0"]),
    "kd_alpha_one": ("distill", config(**STUDENT, kd={"alpha": 1.0}), ["teacher"]),
}


def fingerprint(run: Path) -> dict:
    manifest = json.loads((run / "manifest.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"checkpoints": [c["sha256"] for c in manifest["checkpoints"]],
            "records": [{k: v for k, v in r.items() if k != "time_s"} for r in records],
            "final": {k: v for k, v in manifest["final"].items() if k != "train_time_s"}}


def main(out: Path) -> dict:
    import torch

    import ckptkd

    torch.set_num_threads(1)
    results = {}
    for name, (kind, cfg, teachers) in SCENARIOS.items():
        if kind == "train":
            ckptkd.train(cfg, out=out / name, quiet=True)
        else:
            ckptkd.distill(cfg, teachers=[str(out / t) for t in teachers], out=out / name, quiet=True)
        results[name] = fingerprint(out / name)
    return results


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
