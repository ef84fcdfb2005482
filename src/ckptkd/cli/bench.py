"""`ckptkd bench`: images per second of KD training, measured side by side in one run on a fixed synthetic workload.

`--workload fused` measures something else (`run_fused_bench`): N students trained one at a time through the training
loop's epoch routine against the same N trained as one group (the engine `training.engines.choose_engine` picks), on
the Fashion study's student and on a CIFAR resnet20.

Modes (all train the same student with the same optimizer on the same data):
  student_alone     our loop, cross-entropy only
  kd_online_1       our loop, one teacher checkpoint run on every batch
  kd_online_4       our loop, a 4-checkpoint ensemble run on every batch
  kd_cached_4       our loop, the same ensemble answered from the view-bank cache (its build: cache_build_s)
  reference_loop_1  the ordinary way: torch DataLoader with per-sample transforms, the checkpoint loaded as it is
                    (eval mode, no_grad) and run on every batch
  compute_limit_1   1 / (1/teacher inference + 1/student training step), each timed alone on tensors in memory;
                    the teacher runs as our loop runs it (BatchNorm folded, channels-last for conv nets)
"""

from __future__ import annotations

import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import config as config_mod
from .. import data as data_mod
from ..errors import UserError
from ..formatting import terminal_console
from ..models import from_spec
from ..run import Manifest, write_run
from ..teachers import Teacher
from ..training.engines import ENGINES, choose_engine
from ..training.loop import epoch_batches, train_epoch
from ..training.objective import Objective
from ..training.recipe import make_optimizer, model_spec, pick_device

WORKLOADS = {
    "cifar": {"shape": [3, 32, 32], "classes": 100, "teacher": "resnet56", "student": "resnet20", "batch": 128,
              "images": 1024, "steps": 6, "views": 2, "rounds": 3},
    "fashion": {"shape": [1, 28, 28], "classes": 10, "teacher": "cnn", "student": "cnn", "batch": 128,
                "images": 4096, "steps": 16, "views": 4, "rounds": 3,
                "teacher_kwargs": {"channels": [16, 32, 64], "hidden": 256},
                "student_kwargs": {"channels": [4, 8], "hidden": 32}},
    "digits": {"shape": [1, 8, 8], "classes": 10, "teacher": "resnet20", "student": "resnet8", "batch": 64,
               "images": 1024, "steps": 12, "views": 9, "rounds": 3},
}


def synthetic_npz(folder: Path, workload: dict) -> Path:
    rng = np.random.default_rng(0)
    c, h, w = workload["shape"]
    n = workload["images"]
    x = rng.integers(0, 256, size=(n + 256, h, w, c), dtype=np.uint8)
    y = rng.integers(0, workload["classes"], size=n + 256)
    y[: workload["classes"]] = np.arange(workload["classes"])  # every class present
    path = folder / "synthetic.npz"
    np.savez(path, x_train=x[:n], y_train=y[:n], x_test=x[n:], y_test=y[n:])
    return path


def fake_teacher_run(folder: Path, cfg: dict, data: data_mod.Data, seeds: list[int]) -> str:
    """A run folder whose checkpoints are randomly initialised teachers (speed does not depend on the weights)."""
    spec = model_spec(cfg, data)
    checkpoints = []
    for epoch, seed in enumerate(seeds, start=1):
        torch.manual_seed(seed)
        checkpoints.append(({"epoch": epoch, "step": 0, "fraction": epoch / len(seeds), "lr": 0.0,
                             "metrics": {"val_acc": 0.0}}, from_spec(spec).state_dict()))
    manifest = Manifest(kind="train", status="complete", name="bench-teacher", model=spec, data=data.describe(),
                        seed=0, epochs=len(seeds))
    return str(write_run(folder, cfg, manifest, checkpoints).path)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock


def timed_steps(engine, objective: Objective, data, cfg: dict, seeds: list[int], *, steps: int, epoch: int = 1
                 ) -> float:
    """Seconds for `steps` training steps of the training loop's epoch routine (`loop.train_epoch`: batches drawn,
    augmented, normalised, teacher targets looked up, one step of every member, inside the timing), across epochs
    from `epoch` on when an epoch has fewer steps."""
    device = data.device
    batch_size = cfg["data"]["batch_size"]
    sync(device)
    started = time.perf_counter()
    done = 0
    while done < steps:
        batches = itertools.islice(epoch_batches(data, objective, seeds, epoch, batch_size), steps - done)
        _, _, step = train_epoch(engine, batches, cfg=cfg, steps_per_epoch=data.steps_per_epoch(batch_size),
                                 start_step=done)
        done, epoch = step, epoch + 1
    sync(device)
    return time.perf_counter() - started


def engine_for(name: str, models: list, optimizers: list, cfgs: list[dict], teachers: list, data, device):
    """An engine of `ENGINES` over the members (the students `models` under `teachers`) and its objective."""
    objective = Objective(teachers, [c["kd"] for c in cfgs], data.num_classes, device)
    return ENGINES[name](models, optimizers, cfgs[0], objective, device), objective


class PerSampleDataset(torch.utils.data.Dataset):
    """What common KD code bases do: one image at a time through Python transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, pad: int, hflip: bool):
        self.images, self.labels, self.pad, self.hflip = images, labels, pad, hflip
        self.mean, self.std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        img = self.images[i].float() / 255.0
        img = F.pad(img, (self.pad,) * 4)
        top, left = np.random.randint(0, 2 * self.pad + 1, size=2)
        img = img[:, top:top + self.images.shape[2], left:left + self.images.shape[3]]
        if self.hflip and np.random.rand() < 0.5:
            img = img.flip(2)
        return (img - self.mean) / self.std, self.labels[i]


def _reference_loop(student, optimizer, teacher_model, data, *, steps, batch, kd) -> float:
    dataset = PerSampleDataset(data.train_x.cpu(), data.train_y.cpu(), data.mean, data.std, data.pad, data.hflip)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, num_workers=0,
                                         pin_memory=data.device.type == "cuda")
    tau, alpha = kd["temperature"], kd["alpha"]
    device = data.device
    sync(device)
    started = time.perf_counter()
    done = 0
    while done < steps:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.no_grad():
                t = teacher_model(x)
            s = student(x)
            loss = alpha * F.cross_entropy(s, y) + (1 - alpha) * tau * tau * F.kl_div(
                F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    sync(device)
    return time.perf_counter() - started


def _compute_limit(student, optimizer, teacher: Teacher, data, *, steps, batch) -> tuple[float, float]:
    """Seconds for `steps` teacher inferences (as our loop runs the teacher) and `steps` bare student steps."""
    x = data.train_x[:batch].float() / 255.0
    y = data.train_y[:batch]
    teacher.logits(x)
    sync(x.device)
    started = time.perf_counter()
    for _ in range(steps):
        teacher.logits(x)
    sync(x.device)
    teacher_s = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(student(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(x.device)
    student_s = time.perf_counter() - started
    return teacher_s, student_s


def run_bench(workload: str = "cifar", *, steps: int | None = None, rounds: int | None = None,
              threads: int | None = None, device: str = "cpu", autocast: str = "none") -> dict:
    """`device` "cpu", "cuda" or "auto"; `autocast` ("none", "bf16", "fp16") is how the teachers compute."""
    if workload not in WORKLOADS:
        raise UserError(f"bench: unknown workload {workload!r} (available: {', '.join(WORKLOADS)})")
    w = dict(WORKLOADS[workload])
    steps = steps or w["steps"]
    rounds = rounds or w["rounds"]
    if threads:
        torch.set_num_threads(threads)
    kd = {"temperature": 4.0, "alpha": 0.1, "ensemble": "probs"}
    dev = pick_device(device)
    with tempfile.TemporaryDirectory(prefix="ckptkd-bench-") as tmp:
        tmp = Path(tmp)
        npz = synthetic_npz(tmp, w)
        base = {"device": str(dev), "data": {"name": "npz", "root": str(npz), "val_fraction": 0.1, "batch_size": w["batch"],
                                          "hflip": w["shape"][0] == 3},
                "log": {"progress": False, "tensorboard": False}}
        teacher_cfg = config_mod.resolve({**base, "model": {"name": w["teacher"], **w.get("teacher_kwargs", {})}})
        student_cfg = config_mod.resolve({**base, "model": {"name": w["student"], **w.get("student_kwargs", {})}})
        data = data_mod.build(student_cfg["data"], dev)
        run = fake_teacher_run(tmp / "teacher", teacher_cfg, data, seeds=[1, 2, 3, 4])
        one, four, cached = (Teacher.from_references([f"{run}@{selector}"], quiet=True, autocast=autocast)
                             for selector in ("epoch=4", "all", "all"))
        kd_cfg = {**student_cfg, "kd": {**student_cfg["kd"], **kd}}
        for t in (one, four, cached):
            t.prepare(data)
        started = time.perf_counter()
        cached.attach_cache(data, views=w["views"], cache_dir=tmp / "cache")
        cache_build_s = time.perf_counter() - started
        # The ordinary way loads the checkpoint as it is: BatchNorm unfolded, default memory format, eval mode.
        plain_teacher = one.checkpoints[0].build_model(dev).eval()

        def fresh_student():
            torch.manual_seed(0)
            student = from_spec(model_spec(student_cfg, data)).to(dev)
            return student, make_optimizer(student_cfg, student)

        seconds: dict[str, list[float]] = {k: [] for k in ("student_alone", "kd_online_1", "kd_online_4",
                                                           "kd_cached_4", "reference_loop_1", "teacher_inference",
                                                           "student_step")}
        for r in range(rounds):
            for name, teacher in (("student_alone", None), ("kd_online_1", one), ("kd_online_4", four),
                                  ("kd_cached_4", cached)):
                student, optimizer = fresh_student()
                engine, objective = engine_for("direct", [student], [optimizer], [kd_cfg], [teacher], data, dev)
                timed_steps(engine, objective, data, kd_cfg, [r], steps=1)  # warm-up
                seconds[name].append(timed_steps(engine, objective, data, kd_cfg, [r], steps=steps))
            student, optimizer = fresh_student()
            seconds["reference_loop_1"].append(_reference_loop(student, optimizer, plain_teacher, data, steps=steps,
                                                               batch=w["batch"], kd=kd))
            student, optimizer = fresh_student()
            teacher_s, student_s = _compute_limit(student, optimizer, one, data, steps=steps, batch=w["batch"])
            seconds["teacher_inference"].append(teacher_s)
            seconds["student_step"].append(student_s)
    images = steps * w["batch"]
    best = {k: min(v) for k, v in seconds.items()}  # least disturbed round of each
    rate = {k: images / v for k, v in best.items()}
    parts = {k: round(rate.pop(k), 1) for k in ("teacher_inference", "student_step")}
    rate["compute_limit_1"] = 1.0 / (1.0 / parts["teacher_inference"] + 1.0 / parts["student_step"])
    img_per_s = {k: round(rate[k], 1) for k in ("student_alone", "kd_online_1", "kd_online_4", "kd_cached_4",
                                                "reference_loop_1", "compute_limit_1")}
    return {
        "workload": {"name": workload, "data_shape": w["shape"], "classes": w["classes"], "images": w["images"],
                     "teacher": w["teacher"], "student": w["student"], "batch": w["batch"], "steps": steps,
                     "rounds": rounds, "cache_views": w["views"], "threads": torch.get_num_threads(),
                     "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                     "teacher_autocast": autocast, "torch": torch.__version__,
                     "machine": platform.processor() or platform.machine()},
        "img_per_s": img_per_s,
        "cache_build_s": round(cache_build_s, 2),
        "compute_limit_parts": parts,
        "ratios": {"kd_cached_4/student_alone": round(img_per_s["kd_cached_4"] / img_per_s["student_alone"], 3),
                   "kd_online_1/compute_limit_1": round(img_per_s["kd_online_1"] / img_per_s["compute_limit_1"], 3),
                   "kd_online_1/reference_loop_1": round(img_per_s["kd_online_1"] / img_per_s["reference_loop_1"], 3)},
    }


TARGETS = {"kd_cached_4/student_alone": 0.8, "kd_online_1/compute_limit_1": 0.9, "kd_online_1/reference_loop_1": 1.0}


def print_bench(result: dict) -> None:
    from rich.table import Table

    w = result["workload"]
    table = Table(title=f"ckptkd bench — {w['name']}: {w['teacher']} -> {w['student']} on {w['data_shape']}, batch "
                        f"{w['batch']}, {w['steps']} steps x best of {w['rounds']} rounds, {w['threads']} threads")
    table.add_column("mode")
    table.add_column("img/s", justify="right")
    for mode, value in result["img_per_s"].items():
        table.add_row(mode, f"{value:.1f}")
    parts = result["compute_limit_parts"]
    table.caption = (f"cache build (4 teachers, {w['cache_views']} views/image): {result['cache_build_s']:.2f} s; "
                     f"compute limit from teacher inference {parts['teacher_inference']:.1f} img/s and student step "
                     f"{parts['student_step']:.1f} img/s")
    console = terminal_console()
    console.print(table)
    for ratio, value in result["ratios"].items():
        target = TARGETS[ratio]
        console.print(f"{ratio:<32} {value:6.3f}   target >= {target}   {'met' if value >= target else 'NOT met'}")


def main_json(result: dict) -> str:
    return json.dumps({k: result[k] for k in ("workload", "img_per_s", "cache_build_s", "compute_limit_parts", "ratios")})


# N students, each with its own seed and cached teacher, trained one at a time (each a group of one: the "direct"
# engine) and as one group, both through the training loop's epoch routine, side by side in one run.
FUSED_WORKLOADS = {
    # The Fashion study's student (results/fashion/study.yaml: a 13k-parameter CNN) on its no-augmentation data.
    "fashion": {"shape": [1, 28, 28], "classes": 10, "images": 5000, "batch": 128, "augment": False,
                "teacher": "cnn", "teacher_kwargs": {"channels": [16, 32, 64], "hidden": 256},
                "student": "cnn", "student_kwargs": {"channels": [4, 8], "hidden": 32}, "steps": 12, "rounds": 3},
    # A CIFAR-shaped resnet20 student (crop + flip), compute-bound on a CPU.
    "cifar_resnet20": {"shape": [3, 32, 32], "classes": 100, "images": 1024, "batch": 128, "augment": True,
                       "teacher": "resnet8", "student": "resnet20", "steps": 4, "rounds": 3},
}


def run_fused_bench(*, members: int = 8, steps: int | None = None, rounds: int | None = None,
                    threads: int | None = None, device: str = "cpu", workloads: list[str] | None = None) -> dict:
    """Aggregate img/s of `members` students trained one at a time and as one group, per workload, with the
    engine the group chose (`engines.choose_engine`) and `fused_over_sequential`. Where the group chose to loop,
    the wide fused model is timed too (`wide_fused_img_s`), to show what it would have cost."""
    from ..training.fusion import fusable

    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    results = {}
    for name in workloads or list(FUSED_WORKLOADS):
        w = FUSED_WORKLOADS[name]
        n_steps, n_rounds = steps or w["steps"], rounds or w["rounds"]
        with tempfile.TemporaryDirectory(prefix="ckptkd-bench-") as tmp:
            tmp = Path(tmp)
            npz = synthetic_npz(tmp, w)
            base = {"device": str(dev), "data": {"name": "npz", "root": str(npz), "val_fraction": 0.1,
                                                "batch_size": w["batch"], "augment": w["augment"],
                                                "hflip": w["shape"][0] == 3},
                    "log": {"progress": False, "tensorboard": False},
                    "kd": {"temperature": 4.0, "alpha": 0.1, "cache": "on", "views": 4}}
            teacher_cfg = config_mod.resolve({**base, "model": {"name": w["teacher"], **w.get("teacher_kwargs", {})}})
            data = data_mod.build(teacher_cfg["data"], dev)
            run = fake_teacher_run(tmp / "teacher", teacher_cfg, data, seeds=[1, 2, 3, 4])
            # Student i learns from checkpoint i % 4 (a study's students name a few teachers between them).
            teachers = [Teacher.from_references([f"{run}@epoch={k}"], quiet=True) for k in (1, 2, 3, 4)]
            for t in teachers:
                t.prepare(data)
                t.attach_cache(data, views=4, cache_dir=tmp / "cache")
            cfgs = [config_mod.resolve({**base, "seed": i, "model": {"name": w["student"],
                                                                     **w.get("student_kwargs", {})}})
                    for i in range(members)]
            students_teachers = [teachers[i % 4] for i in range(members)]
            spec = model_spec(cfgs[0], data)

            def students():
                models = []
                for c in cfgs:
                    torch.manual_seed(c["seed"])
                    models.append(from_spec(spec).to(dev))
                return models, [make_optimizer(c, m) for c, m in zip(cfgs, models)]

            torch.manual_seed(cfgs[0]["seed"])
            probe = from_spec(spec).to(dev)
            engine_name, why = choose_engine(probe, spec, dev)
            engines = [engine_name] + (["fused"] if engine_name != "fused" and fusable(probe)[0] else [])
            seconds = {"sequential": [], **{e: [] for e in engines}}
            for r in range(n_rounds):
                models, optimizers = students()
                alone = [engine_for("direct", [m], [o], [c], [t], data, dev)
                         for m, o, c, t in zip(models, optimizers, cfgs, students_teachers)]
                for (engine, objective), c in zip(alone, cfgs):  # warm-up
                    timed_steps(engine, objective, data, c, [c["seed"]], steps=1)
                seconds["sequential"].append(sum(
                    timed_steps(engine, objective, data, c, [c["seed"]], steps=n_steps, epoch=2)
                    for (engine, objective), c in zip(alone, cfgs)))
                for e in engines:
                    models, optimizers = students()
                    engine, objective = engine_for(e, models, optimizers, cfgs, students_teachers, data, dev)
                    seeds = [c["seed"] for c in cfgs]
                    timed_steps(engine, objective, data, cfgs[0], seeds, steps=1)  # warm-up
                    seconds[e].append(timed_steps(engine, objective, data, cfgs[0], seeds, steps=n_steps, epoch=2))
        images = members * n_steps * w["batch"]
        rate = {k: images / min(v) for k, v in seconds.items()}  # the least disturbed round of each
        results[name] = {"student": w["student"], "shape": w["shape"], "members": members, "steps": n_steps,
                         "rounds": n_rounds, "batch": w["batch"], "engine": engine_name, "engine_reason": why,
                         "sequential_img_s": round(rate["sequential"], 1),
                         "fused_img_s": round(rate[engine_name], 1),
                         "fused_over_sequential": round(rate[engine_name] / rate["sequential"], 3)}
        if engine_name != "fused" and "fused" in rate:
            results[name]["wide_fused_img_s"] = round(rate["fused"], 1)
    return {"workload": "fused", "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(), "results": results}


def print_fused_bench(result: dict) -> None:
    console = terminal_console()
    for name, r in result["results"].items():
        wide = f" (the wide fused model: {r['wide_fused_img_s']:.0f} img/s)" if "wide_fused_img_s" in r else ""
        console.print(f"{name}: {r['student']} x{r['members']} on {r['shape']}: one at a time "
                      f"{r['sequential_img_s']:.0f} img/s, as one group ({r['engine']}) {r['fused_img_s']:.0f} img/s"
                      f"{wide}; fused_over_sequential {r['fused_over_sequential']:.2f}. Engine: {r['engine_reason']}")
