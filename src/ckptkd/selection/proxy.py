"""A selector that knows the student: `select --by proxy`.

Each saved checkpoint of a run teaches a short distillation of the real student — its config, its KD settings,
`epochs` epochs (10 % of its own by default, the schedule's fractions, warm-up and milestones scaled to them) — and
the checkpoint whose proxy student ends with the best validation accuracy is picked (the later one on equal
accuracy). Never the test split. The proxies train as one group (`training.loop.fit`: they differ only in their
teacher), into RUN/proxy/<settings>/epoch-NNNN, ordinary run folders, resumable; what they found, and what they
cost, is RUN/proxy/<settings>/proxy.json (sealed), read back on the next call with the same settings.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

from .. import config as config_mod
from ..errors import UserError
from ..run import Run, relative_to, resolve
from ..run.storage import read_sealed_json, write_sealed_json

PROXY_SHARE = 0.1  # a proxy trains this share of the student's epochs unless told otherwise
RESULT = "proxy.json"
GROUP_SIZE = 8     # proxies trained together at most, as a study's fused groups on a CPU


def proxy_config(student: dict, epochs: int) -> dict:
    """The student's resolved config, shortened to `epochs` epochs: warm-up scaled alike, milestones given as
    fractions of training kept as they are (absolute ones scaled), one checkpoint at the end."""
    cfg = copy.deepcopy(student)
    schedule = cfg["schedule"]
    scale = epochs / schedule["epochs"]
    schedule["warmup_epochs"] = min(epochs - 1, round(schedule["warmup_epochs"] * scale))
    schedule["milestones"] = [m if isinstance(m, float) else max(1, min(epochs, round(m * scale)))
                              for m in schedule["milestones"]]
    schedule["step_size"] = max(1, round(schedule["step_size"] * scale))
    schedule["cycles"] = min(schedule["cycles"], epochs)
    schedule["epochs"] = epochs
    cfg["checkpoints"] = {"fractions": [1.0], "every": None, "epochs": []}
    cfg["eval"]["last_k"] = 1
    cfg["log"]["progress"] = False
    return cfg


def proxy_select(run: str | Path, student: str | Path | dict, *, overrides: dict | list | None = None,
                 epochs: int | None = None, seed: int | None = None, quiet: bool = False,
                 allow_incomplete: bool = False, analysis: str | Path | None = None) -> dict:
    """The proxy selection of `run`'s checkpoints for the student `student` (a config path or dict, with
    `overrides`). Returns a criterion result as `select` reads it ({"criterion": "proxy", "t_star", "best", "ties",
    "scores": [{"epoch", "score", "se", "tied"}], "flat", "skipped"}) plus "epochs", "seed", "cost_s" (training
    seconds, all proxies together) and "folder" (relative to the analysis home: the run, or `analysis`)."""
    from ..training.api import make_teacher
    from ..training.loop import Member, fit

    folder = Run(run, analysis_dir=analysis)
    checkpoints = resolve(f"{folder.path}@all", allow_incomplete=allow_incomplete)
    cfg = config_mod.resolve(student, overrides)
    if cfg["kd"]["teachers"]:
        raise UserError("select --by proxy: the student config names kd.teachers; the proxies' teachers are the "
                        f"checkpoints of {folder.path}")
    epochs = epochs if epochs is not None else max(1, round(PROXY_SHARE * cfg["schedule"]["epochs"]))
    if not 1 <= epochs <= cfg["schedule"]["epochs"]:
        raise UserError(f"select --by proxy: --proxy-epochs must be between 1 and the student's "
                        f"{cfg['schedule']['epochs']} epochs, got {epochs}")
    cfg["seed"] = cfg["seed"] if seed is None else seed
    proxy = proxy_config(cfg, epochs)
    settings = {"student": config_mod.identity({k: v for k, v in proxy.items() if k != "name"}),
                "checkpoints": [c.sha256 for c in checkpoints]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = folder.proxy_dir / key
    if (root / RESULT).is_file():
        return read_sealed_json(root / RESULT, "proxy selection", required=lambda _obj: True,
                                remedy=f"delete {root} to train the proxies again")
    members = []
    for c in checkpoints:
        member_cfg = copy.deepcopy(proxy)
        member_cfg["name"] = f"proxy-epoch-{c.epoch}"
        member_out = root / f"epoch-{c.epoch:04d}"
        # named relative to the proxy's own folder (inside the teacher's run unless written elsewhere): true
        # wherever the run is moved, with its proxies
        member_cfg["kd"]["teachers"] = [relative_to(f"{folder.path}@epoch={c.epoch}", member_out)]
        members.append(Member(member_cfg, member_out, make_teacher(member_cfg, quiet=True, base=member_out,
                                                                   allow_incomplete=allow_incomplete), "distill"))
    outcomes = []
    count = -(-len(members) // GROUP_SIZE)
    for k in range(count):  # as few groups as GROUP_SIZE allows, as even as possible
        group = members[k * len(members) // count:(k + 1) * len(members) // count]
        outcomes += fit(group, resume=True, quiet=quiet)
    scores, skipped, cost = {}, [], 0.0
    for c, outcome in zip(checkpoints, outcomes):
        if isinstance(outcome, Exception):
            skipped.append({"epoch": c.epoch, "why": f"its proxy student failed: {outcome}"})
            continue
        final = outcome.final
        scores[c.epoch] = final.val_acc
        cost += final.train_time_s
    if not scores:
        raise UserError(f"select --by proxy: every proxy student of {folder.path} failed ({skipped[0]['why']})")
    best = max(scores, key=lambda e: (scores[e], e))
    result = {"criterion": "proxy", "t_star": best, "best": best, "ties": [best],
              "scores": [{"epoch": e, "score": v, "se": None, "tied": e == best} for e, v in sorted(scores.items())],
              "flat": False, "skipped": skipped, "epochs": epochs, "seed": cfg["seed"], "student": cfg["name"],
              "cost_s": round(cost, 3), "folder": f"proxy/{key}"}
    write_sealed_json(root / RESULT, result)
    return result
