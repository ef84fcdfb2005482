"""The study's vocabulary of teacher variants, shared by planning (`plan`) and reporting (`report`).

A variant name is a base, optionally followed by modifiers:

    base       none | T<fraction> (T0.5) | Tfull | Tstar | snapshot | full_ensemble | epoch<N> (epoch12)
    modifiers  @online (teachers run on every batch instead of the cache) | @tau=<t> (another temperature)

e.g. `Tfull@tau=10`, the softness control: the full teacher made softer by temperature alone. Adding a variant is
one entry in `_BASES` (how to name its teachers, its label and meaning, and which table it belongs to).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import epoch_at_fraction


@dataclass(frozen=True)
class Context:
    """What a variant's teachers are chosen from, for one student seed."""
    lead: str                 # the trajectory teacher's run folder (relative to the study folder)
    members: list[str]        # the independent teachers of the full ensemble, lead first
    lead_id: str              # task ids the student then depends on
    member_ids: list[str]
    analysis_id: str
    snapshot: list | str      # study.snapshot: fractions or "top-info"
    ensemble_size: int
    epochs: int               # the teacher's epochs: fixed checkpoints are named by epoch, so students that use
                              # the same checkpoint (T0.5 and epoch30 of 60) have the same config and run once


@dataclass(frozen=True)
class Variant:
    name: str
    base: str                          # none, fraction, Tfull, Tstar, snapshot, full_ensemble, epoch
    fraction: float | None = None
    epoch: int | None = None
    online: bool = False
    temperature: float | None = None
    modifiers: tuple = field(default=())

    @property
    def label(self) -> str:
        text = {"none": "no KD", "Tfull": "T^full", "Tstar": "T*", "snapshot": "snapshot ensemble",
                "full_ensemble": "full ensemble"}.get(self.base)
        if self.base == "fraction":
            text = f"T^{self.fraction:g}"
        elif self.base == "epoch":
            text = f"T@{self.epoch}"
        if self.temperature is not None:
            text += f" (tau {self.temperature:g})"
        if self.online:
            text += " (online)"
        return text

    @property
    def order(self) -> tuple:
        rank = {"none": 0, "fraction": 1, "epoch": 1, "Tfull": 2, "Tstar": 3, "snapshot": 4, "full_ensemble": 5}
        return (rank[self.base], self.fraction or float(self.epoch or 0), self.temperature or 0.0, self.online,
                self.name)

    @property
    def table(self) -> str:
        """Where the report shows it: table3 (single teachers), ensembles, cache (online twins), curve (epoch N)."""
        if self.online:
            return "cache"
        if self.base == "epoch":
            return "curve"
        if self.base in ("snapshot", "full_ensemble"):
            return "ensembles"
        return "table3"

    @property
    def plain(self) -> "Variant":
        """The same variant without @online: the cached twin an online student is compared with."""
        return parse(self.name.replace("@online", ""))

    def needs_analysis(self, snapshot: list | str) -> bool:
        return self.base == "Tstar" or (self.base == "snapshot" and snapshot == "top-info")

    def teachers(self, ctx: Context) -> tuple[list[str], list[str]]:
        """(teacher references, task ids the student depends on) for one student."""
        at = lambda path, epoch: f"{path}@epoch={epoch}"
        if self.base == "none":
            return [], []
        if self.base == "fraction":
            return [at(ctx.lead, epoch_at_fraction(self.fraction, ctx.epochs))], [ctx.lead_id]
        if self.base == "epoch":
            return [at(ctx.lead, self.epoch)], [ctx.lead_id]
        if self.base == "Tfull":
            return [at(ctx.lead, ctx.epochs)], [ctx.lead_id]
        if self.base == "Tstar":
            return [f"{ctx.lead}@best-info"], [ctx.lead_id, ctx.analysis_id]
        if self.base == "snapshot":
            if ctx.snapshot == "top-info":
                return [f"{ctx.lead}@top-info:{ctx.ensemble_size}"], [ctx.lead_id, ctx.analysis_id]
            # Fractions of a short run can round to one epoch: each checkpoint is a member once (an ensemble refuses
            # a checkpoint named twice); for distinct epochs the references are what they always were.
            epochs = dict.fromkeys(epoch_at_fraction(f, ctx.epochs) for f in ctx.snapshot)
            return [at(ctx.lead, epoch) for epoch in epochs], [ctx.lead_id]
        return [at(path, ctx.epochs) for path in ctx.members], list(ctx.member_ids)  # full_ensemble

    def meaning(self, study: dict) -> str:
        m = study.get("ensemble_size", "M")
        snapshot = study.get("snapshot")
        if isinstance(snapshot, list):
            members = f"the checkpoints at {', '.join(f'{f:g}' for f in snapshot)} of training"
        else:
            members = f"the top {m} checkpoints by the information criterion"
        text = {
            "none": "no teacher: the student trained with cross-entropy only (the baseline)",
            "fraction": f"KD from the teacher's checkpoint at {self.fraction or 0:g} of its training",
            "epoch": f"KD from the teacher's checkpoint at epoch {self.epoch}",
            "Tfull": "KD from the fully trained teacher (last epoch)",
            "Tstar": "KD from T*, the checkpoint the information criterion selects (`ckptkd select`)",
            "snapshot": f"KD from a snapshot ensemble of one teacher's trajectory: {members}",
            "full_ensemble": f"KD from an ensemble of M = {m} fully trained teachers from independent seeds",
        }[self.base]
        if self.temperature is not None:
            text += f", at temperature tau = {self.temperature:g} instead of the study's"
        if self.online:
            text += "; teachers run on every batch instead of the output cache (checks the cache)"
        return text


_BASE = re.compile(r"none|Tfull|Tstar|snapshot|full_ensemble|T(?P<fraction>0?\.\d+)|epoch(?P<epoch>[1-9]\d*)")
_MODIFIER = re.compile(r"online|tau=(?P<tau>\d+(\.\d+)?)")
GRAMMAR = ("none, T<fraction> (e.g. T0.5), Tfull, Tstar, snapshot, full_ensemble or epoch<N>, optionally followed "
           "by @online and/or @tau=<temperature>")


def parse(name: str) -> Variant:
    """A variant name -> Variant; ValueError (naming the grammar) for anything else."""
    if not isinstance(name, str):
        raise ValueError(f"{name!r} is not a variant ({GRAMMAR})")
    base_text, *mods = name.split("@")
    m = _BASE.fullmatch(base_text)
    if m is None:
        raise ValueError(f"{name!r} is not a variant ({GRAMMAR})")
    fields = {"name": name, "modifiers": tuple(mods)}
    if m.group("fraction"):
        fraction = float(m.group("fraction"))
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name!r}: the fraction must be between 0 and 1 (use Tfull for the last checkpoint)")
        fields.update(base="fraction", fraction=fraction)
    elif m.group("epoch"):
        fields.update(base="epoch", epoch=int(m.group("epoch")))
    else:
        fields["base"] = base_text
    for mod in mods:
        mm = _MODIFIER.fullmatch(mod)
        if mm is None or (mm.group("tau") and "temperature" in fields) or (mod == "online" and "online" in fields):
            raise ValueError(f"{name!r}: unknown or repeated modifier @{mod} ({GRAMMAR})")
        if mm.group("tau"):
            if float(mm.group("tau")) <= 0:
                raise ValueError(f"{name!r}: the temperature must be > 0")
            fields["temperature"] = float(mm.group("tau"))
        else:
            fields["online"] = True
    if fields["base"] == "none" and mods:
        raise ValueError(f"{name!r}: a student without a teacher takes no modifiers")
    return Variant(**fields)


def check(name) -> str | None:
    """For config validation: None when `name` is a variant, else what was expected."""
    try:
        parse(name)
    except ValueError:
        return f"a variant name ({GRAMMAR})"
    return None


def ordered(names) -> list[str]:
    return sorted(set(names), key=lambda n: parse(n).order)
