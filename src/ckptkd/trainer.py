"""One training loop for teachers and students alike: a student is a model trained with an extra loss term.

A run writes, after every epoch and in this order: the checkpoint (if one is due), the resume state, metrics.jsonl and
the manifest. The resume state is the source of truth, and the other two are rewritten from it, so a run killed at
any moment resumes to weights bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import config as config_mod
from . import data as data_mod
from . import distributed
from .checkpoints import MANIFEST, MANIFEST_FORMAT, build_model, checkpoint_path, epoch_at_fraction, load_manifest
from .errors import UserError
from .losses import kd_terms
from .schedules import cycle_ends, lr_at
from .storage import (atomic_write_json, atomic_write_text, load_tensors, read_metadata, remove_stale_temporaries,
                      save_tensors)

STATE_FILE = "state/last.safetensors"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config: device={name!r} but CUDA is not available here (use device: auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("config: device='mps' but MPS is not available here (use device: auto or cpu)")
    return torch.device(name)


def checkpoint_epochs(cfg: dict) -> list[int]:
    epochs = cfg["schedule"]["epochs"]
    chosen = {epoch_at_fraction(f, epochs) for f in cfg["checkpoints"]["fractions"]}
    chosen.update(cfg["checkpoints"]["epochs"])
    every = cfg["checkpoints"]["every"]
    if every:
        chosen.update(range(every, epochs + 1, every))
    if cfg["schedule"]["name"] == "snapshot":
        chosen.update(cycle_ends(epochs, cfg["schedule"]["cycles"]))
    chosen.add(epochs)  # the last weights are always kept: `RUN@last` must exist
    return sorted(chosen)


def use_teacher_cache(cfg: dict, data: data_mod.Data) -> bool:
    """`kd.cache: auto` caches when building the bank costs no more teacher forwards than one student run online
    (views <= epochs): every later student, seed or epoch then reuses it."""
    mode = cfg["kd"]["cache"]
    if mode != "auto":
        return mode == "on"
    return min(cfg["kd"]["views"], data.distinct_views()) <= cfg["schedule"]["epochs"]


def model_spec(cfg: dict, data: data_mod.Data) -> dict:
    m = cfg["model"]
    num_classes = m["num_classes"] or data.num_classes
    in_channels = m["in_channels"] or data.image_shape[0]
    if num_classes < data.num_classes:
        raise UserError(f"config: model.num_classes={num_classes} but {data.name} has {data.num_classes} classes")
    if in_channels != data.image_shape[0]:
        raise UserError(f"config: model.in_channels={in_channels} but {data.name} images have "
                        f"{data.image_shape[0]} channels")
    kwargs = {k: v for k, v in m.items() if k not in config_mod.MODEL_FIXED_KEYS}
    return {"name": m["name"], "num_classes": num_classes, "in_channels": in_channels,
            "image_size": list(data.image_shape[1:]), "kwargs": kwargs}


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    # Weight decay on BatchNorm scales and biases is what the paper's recipes do; keep one group for fidelity.
    if o["name"] == "sgd":
        return torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=o["momentum"],
                               nesterov=o["nesterov"] and o["momentum"] > 0, weight_decay=o["weight_decay"])
    return torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data: data_mod.Data, split: str, batch_size: int) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.train_x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.train_x.device)
    count = 0
    for x, y in data.eval_batches(split, batch_size):
        logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    return {"loss": float(loss_sum) / count, "acc": float(correct) / count}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: data_mod.Batch, teacher=None,
               kd: dict | None = None, autocast_dtype: torch.dtype | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimisation step: CE alone, or the paper's alpha * CE + (1 - alpha) * tau^2 * KL under a teacher.

    With `autocast_dtype` the student's forward runs under autocast; the losses are computed in float32 either way.
    Returns (logits, loss, ce, kd) for the caller's running sums."""
    if autocast_dtype is None:
        logits = model(batch.x)
    else:
        with torch.autocast(device_type=batch.x.device.type, dtype=autocast_dtype):
            logits = model(batch.x).float()
    if teacher is None:
        ce = F.cross_entropy(logits, batch.y)
        loss, kd_part = ce, torch.zeros((), device=logits.device)
    else:
        terms = kd_terms(logits, teacher.logits(batch), batch.y, temperature=kd["temperature"],
                         ensemble=kd["ensemble"])
        ce, kd_part = terms["ce"], terms["kd"]
        loss = kd["alpha"] * ce + (1.0 - kd["alpha"]) * kd_part
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits, loss, ce, kd_part


# ---- the resume state: one safetensors file holding weights, optimizer buffers, RNG and the run's history ----

def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(run: Path, model, optimizer, progress: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    save_tensors(run / STATE_FILE, tensors, metadata={"progress": progress, "optimizer": opt_meta})


def load_state(run: Path, model, optimizer) -> dict:
    path = run / STATE_FILE
    meta = read_metadata(path)
    tensors = load_tensors(path)
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    _restore_optimizer(optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
    return meta["progress"]


# ---- the run ----

@dataclass
class Run:
    """A finished (or interrupted) run folder."""
    path: Path

    @property
    def manifest(self) -> dict:
        return load_manifest(self.path)

    @property
    def final(self) -> dict:
        return self.manifest["final"]

    def ref(self, selector: str = "last") -> str:
        return f"{self.path}@{selector}"

    def __str__(self) -> str:
        return str(self.path)


def _want_progress(setting) -> bool | None:
    # tqdm's disable=None hides the bar when output is not a terminal.
    return {"auto": None, True: False, False: True}[setting]


def write_run_views(run: Path, manifest: dict, history: list[dict]) -> None:
    atomic_write_text(run / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    atomic_write_json(run / MANIFEST, manifest)


def fit(cfg: dict, out: str | Path, *, resume: bool = False, kind: str = "train", teacher=None,
        quiet: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train `cfg` into the run folder `out` (a student when `teacher` is given).

    `on_epoch(record)` is called after each epoch's files are written (a study uses it as a heartbeat).
    Under torchrun every rank calls this; rank 0 alone writes (see `ckptkd.distributed`).
    """
    run = Path(out)
    device = distributed.setup(pick_device(cfg["device"]))
    main = distributed.is_main()
    if resume:
        _check_resumable(run, cfg)
        if (run / MANIFEST).is_file() and load_manifest(run)["status"] == "complete":
            return Run(run)
    elif run.exists() and any(run.iterdir()):
        raise UserError(f"run folder {run} already exists; use --resume to continue it or choose another --out")
    distributed.check_batch(cfg["data"]["batch_size"])
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it
    quiet = quiet or not main

    data = data_mod.build(cfg["data"], device)
    spec = model_spec(cfg, data)
    if teacher is not None:
        teacher.check_compatible(data)
        teacher.quiet = teacher.quiet or quiet
        teacher.to(device)
        teacher.prepare(data)
        if use_teacher_cache(cfg, data):
            if main:  # rank 0 builds the cache files; the others read them
                teacher.attach_cache(data, views=cfg["kd"]["views"], cache_dir=cfg["kd"]["cache_dir"])
            distributed.barrier()
            if not main:
                teacher.attach_cache(data, views=cfg["kd"]["views"], cache_dir=cfg["kd"]["cache_dir"])
    seed = cfg["seed"]
    torch.manual_seed(seed)
    model = build_model(spec).to(device)
    optimizer = make_optimizer(cfg, model)
    net = distributed.wrap(model, device)  # what the training step calls; `model` is what is evaluated and saved
    sched = cfg["schedule"]
    epochs, batch_size = sched["epochs"], cfg["data"]["batch_size"]
    steps_per_epoch = max(1, data.train_x.shape[0] // batch_size)
    base_lr = cfg["optim"]["lr"]
    save_at = checkpoint_epochs(cfg)
    kd = cfg["kd"]
    autocast_dtype = torch.bfloat16 if cfg["precision"] == "bf16" else None

    progress: dict[str, Any] = {"epoch": 0, "step": 0, "history": [], "checkpoints": [], "elapsed_s": 0.0,
                                "best_val_acc": -1.0, "best_val_epoch": 0}
    if resume and (run / STATE_FILE).is_file():
        progress = load_state(run, model, optimizer)
        if main:  # the run's own writer was killed; nothing else writes to these folders
            for folder in (run, run / "checkpoints", run / "state"):
                remove_stale_temporaries(folder)
    elif main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", config_mod.dump(cfg))

    manifest = {
        "format": MANIFEST_FORMAT, "kind": kind, "status": "running", "name": cfg["name"],
        "model": spec, "data": data.describe(), "seed": seed, "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
        "teachers": teacher.describe() if teacher is not None else [],
        "teacher_ensemble": teacher.summary() if teacher is not None else None,
        "checkpoints": progress["checkpoints"], "final": None,
        "device": str(device), "precision": cfg["precision"], "torch": torch.__version__,
        "threads": torch.get_num_threads(),  # CPU results are bit-identical only at the same thread count
    }
    if (world := distributed.describe()) is not None:
        manifest["distributed"] = world
    if main:
        write_run_views(run, manifest, progress["history"])
    writer = _tensorboard(cfg, run) if main else None
    bar_off = True if quiet else _want_progress(cfg["log"]["progress"])
    say = (lambda *_: None) if quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))

    try:
        for epoch in range(progress["epoch"] + 1, epochs + 1):
            started = time.perf_counter()
            model.train()
            sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, correct, ce, kd (weighted by batch)
            seen = 0
            batches = data.train_batches(seed=seed, epoch=epoch, batch_size=batch_size, rank=distributed.rank(),
                                         world_size=distributed.world_size(),
                                         view_bank=teacher.view_bank if teacher is not None else None)
            bar = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch}/{epochs}", leave=False,
                       disable=bar_off, dynamic_ncols=True, file=sys.stderr)
            for batch in bar:
                lr = lr_at(sched, base_lr, progress["step"], steps_per_epoch)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits, loss, ce, kd_part = train_step(net, optimizer, batch, teacher, kd, autocast_dtype)
                progress["step"] += 1
                n = len(batch.y)
                with torch.no_grad():
                    sums += torch.stack([loss.detach().double() * n, (logits.argmax(1) == batch.y).sum().double(),
                                         ce.detach().double() * n, kd_part.detach().double() * n])
                seen += n
                if not bar.disable and progress["step"] % 16 == 1:  # reading the loss makes a GPU wait: not every step
                    bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{lr:.3g}")
            totals = distributed.all_sum(torch.cat([sums, sums.new_tensor([seen])]))
            sums = (totals[:4] / totals[4]).tolist()
            if not main:
                progress["epoch"] = epoch
                continue
            val = evaluate(model, data, "val", cfg["data"]["eval_batch_size"])
            record = {"epoch": epoch, "step": progress["step"], "lr": lr, "train_loss": sums[0], "train_acc": sums[1],
                      "val_loss": val["loss"], "val_acc": val["acc"]}
            if teacher is not None:
                record.update(train_ce=sums[2], train_kd=sums[3])
            if val["acc"] > progress["best_val_acc"]:
                progress["best_val_acc"], progress["best_val_epoch"] = val["acc"], epoch
            if epoch in save_at:
                record["test_acc"] = evaluate(model, data, "test", cfg["data"]["eval_batch_size"])["acc"]
                sha = save_tensors(run / checkpoint_path(epoch), model.state_dict(),
                                   metadata={"epoch": epoch, "model": spec["name"]})
                progress["checkpoints"] = [c for c in progress["checkpoints"] if c["epoch"] != epoch] + [{
                    "epoch": epoch, "step": progress["step"], "fraction": round(epoch / epochs, 6), "lr": lr,
                    "path": checkpoint_path(epoch), "sha256": sha,
                    "metrics": {k: record[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "test_acc")}}]
                say(f"epoch {epoch:>4}/{epochs}  loss {sums[0]:.4f}  train {sums[1]:.4f}  val {val['acc']:.4f}  "
                    f"test {record['test_acc']:.4f}  -> {run / checkpoint_path(epoch)}")
            record["time_s"] = time.perf_counter() - started
            progress["elapsed_s"] += record["time_s"]
            progress["history"] = [h for h in progress["history"] if h["epoch"] < epoch] + [record]
            progress["epoch"] = epoch
            save_state(run, model, optimizer, progress)
            manifest["checkpoints"] = progress["checkpoints"]
            write_run_views(run, manifest, progress["history"])
            if writer is not None:
                for key, value in record.items():
                    if key not in ("epoch", "step"):
                        writer.add_scalar(key, value, epoch)
            if on_epoch is not None:
                on_epoch(record)
    except BaseException as error:
        if not main:
            raise
        manifest["status"] = "failed"
        manifest["error"] = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
        write_run_views(run, manifest, progress["history"])
        raise
    finally:
        if writer is not None:
            writer.close()

    if not main:
        distributed.barrier()  # returns once rank 0 has written the finished run
        return Run(run)
    last = progress["history"][-1]
    manifest["status"] = "complete"
    manifest["final"] = {"epoch": epochs, "train_acc": last["train_acc"], "val_acc": last["val_acc"],
                         "test_acc": last["test_acc"], "best_val_acc": progress["best_val_acc"],
                         "best_val_epoch": progress["best_val_epoch"], "train_time_s": round(progress["elapsed_s"], 3)}
    write_run_views(run, manifest, progress["history"])
    distributed.barrier()
    return Run(run)


def _check_resumable(run: Path, cfg: dict) -> None:
    if (run / "config.yaml").is_file():
        saved = config_mod.flatten(config_mod.read_yaml(run / "config.yaml"))
        wanted = config_mod.flatten(cfg)
        changed = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        if changed:
            raise UserError(f"--resume: the config differs from the one {run} was started with "
                            f"(changed: {', '.join(changed[:5])})")
    if not (run / STATE_FILE).is_file() and not (run / MANIFEST).is_file() and run.exists() and any(run.iterdir()):
        raise UserError(f"--resume: {run} holds no ckptkd run state ({STATE_FILE}); it cannot be continued")


def _tensorboard(cfg: dict, run: Path):
    setting = cfg["log"]["tensorboard"]
    if setting is False:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if setting is True:
            raise UserError("config: log.tensorboard=true but the tensorboard package is not installed") from None
        return None
    return SummaryWriter(log_dir=str(run / "tensorboard"))


def default_out(cfg: dict) -> Path:
    return Path("runs") / cfg["name"]


def train(config: str | Path | dict, overrides: dict | list | None = None, out: str | Path | None = None, *,
          resume: bool = False, quiet: bool = False, on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train a model and keep its trajectory. `config` is a YAML path or dict; `overrides` maps dotted keys to values."""
    cfg = config_mod.resolve(config, overrides)
    if cfg["kd"]["teachers"]:
        raise UserError("config: kd.teachers is set; use `ckptkd distill` to train a student")
    return fit(cfg, out if out is not None else default_out(cfg), resume=resume, quiet=quiet, on_epoch=on_epoch)


def distill(config: str | Path | dict, teachers: list[str] | None = None, overrides: dict | list | None = None,
            out: str | Path | None = None, *, resume: bool = False, quiet: bool = False,
            on_epoch: Callable[[dict], None] | None = None) -> Run:
    """Train a student under teachers given as checkpoint references (none: the CE-only baseline)."""
    from .teachers import Teacher

    cfg = config_mod.resolve(config, overrides)
    if teachers:
        cfg["kd"]["teachers"] = list(teachers)
    kd = cfg["kd"]
    # Teachers compute at the run's precision unless kd.autocast says otherwise.
    autocast = kd["autocast"] if kd["autocast"] != "auto" else {"fp32": "none", "bf16": "bf16"}[cfg["precision"]]
    teacher = (Teacher.from_references(kd["teachers"], quiet=quiet, channels_last=kd["channels_last"],
                                       autocast=autocast) if kd["teachers"] else None)
    return fit(cfg, out if out is not None else default_out(cfg), resume=resume, kind="distill",
               teacher=teacher, quiet=quiet, on_epoch=on_epoch)

