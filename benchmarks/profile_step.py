"""Where the time of one KD step goes: the ordinary loop vs ckptkd's, phase by phase, on the bench's workload.

    python benchmarks/profile_step.py [--workload cifar|fashion|digits] [--steps 6] [--teachers 4]

"before": a torch DataLoader with per-sample transforms and the teachers run on every batch (what common KD code
bases do); "after": ckptkd's tensor-resident batches and the teachers answered from the view-bank cache.
Each phase is timed with perf_counter around synchronous CPU work, summed over the steps.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from ckptkd import config as config_mod
from ckptkd import data as data_mod
from ckptkd.cli.bench import WORKLOADS, PerSampleDataset, fake_teacher_run, synthetic_npz
from ckptkd.losses import kd_terms
from ckptkd.teachers import Teacher
from ckptkd.training.recipe import make_optimizer, model_spec
from ckptkd.models import from_spec as build_model


def profile(workload: str, steps: int, teachers: int) -> dict[str, dict[str, float]]:
    w = WORKLOADS[workload]
    kd = {"temperature": 4.0, "ensemble": "probs"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = {"device": "cpu", "data": {"name": "npz", "root": str(synthetic_npz(tmp, w)), "batch_size": w["batch"],
                                          "hflip": w["shape"][0] == 3}}
        teacher_cfg = config_mod.resolve({**base, "model": {"name": w["teacher"], **w.get("teacher_kwargs", {})}})
        student_cfg = config_mod.resolve({**base, "model": {"name": w["student"], **w.get("student_kwargs", {})}})
        data = data_mod.build(student_cfg["data"])
        run = fake_teacher_run(tmp / "t", teacher_cfg, data, seeds=list(range(1, teachers + 1)))
        online = Teacher.from_references([f"{run}@all"], quiet=True)
        cached = Teacher.from_references([f"{run}@all"], quiet=True)
        for t in (online, cached):
            t.prepare(data)
        cached.attach_cache(data, views=w["views"], cache_dir=tmp / "cache")
        results = {}
        for mode in ("before", "after"):
            torch.manual_seed(0)
            student = build_model(model_spec(student_cfg, data))
            optimizer = make_optimizer(student_cfg, student)
            phases: dict[str, float] = defaultdict(float)
            if mode == "before":
                loader = torch.utils.data.DataLoader(
                    PerSampleDataset(data.train_x, data.train_y, data.mean, data.std, data.pad, data.hflip),
                    batch_size=w["batch"], shuffle=True, drop_last=True)
                batches = iter(loader)
            else:
                batches = data.train_batches(seed=0, epoch=1, batch_size=w["batch"], view_bank=cached.view_bank)
            for _ in range(steps + 1):  # the first step warms up and is not counted
                clock = time.perf_counter()
                marks = {}
                batch = next(batches)
                x, y = (batch if mode == "before" else (batch.x, batch.y))
                marks["data"] = time.perf_counter()
                if mode == "before":
                    with torch.no_grad():
                        t = torch.stack([m(x) for m in online.models])
                else:
                    t = cached.logits(batch)
                marks["teacher"] = time.perf_counter()
                s = student(x)
                marks["student forward"] = time.perf_counter()
                terms = kd_terms(s, t, y, **kd)
                loss = 0.1 * terms["ce"] + 0.9 * terms["kd"]
                marks["loss"] = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                marks["student backward"] = time.perf_counter()
                optimizer.step()
                marks["optimizer"] = time.perf_counter()
                if _ > 0:
                    for name, end in marks.items():
                        phases[name] += end - clock
                        clock = end
            total = sum(phases.values())
            results[mode] = {"ms_per_step": 1000 * total / steps,
                             **{name: round(100 * value / total, 1) for name, value in phases.items()}}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cifar", choices=sorted(WORKLOADS))
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--teachers", type=int, default=4)
    args = parser.parse_args()
    results = profile(args.workload, args.steps, args.teachers)
    phases = [p for p in results["after"] if p != "ms_per_step"]
    print(f"{'phase':<18}" + "".join(f"{mode:>12}" for mode in results))
    for phase in phases:
        print(f"{phase:<18}" + "".join(f"{results[mode][phase]:>11.1f}%" for mode in results))
    print(f"{'ms per step':<18}" + "".join(f"{results[mode]['ms_per_step']:>12.1f}" for mode in results))


if __name__ == "__main__":
    main()
