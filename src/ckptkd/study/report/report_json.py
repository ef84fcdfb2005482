"""report.json: the report model as sealed JSON beside report.md, for programs, and for the next report: a section
whose run folders are gone is carried over from here (never parsed back out of report.md).

The file is `{"format": 1, ...the Report's fields}` with every dataclass as an object of its fields, tuples as
lists, integer keys as strings, and dicts keyed by (trajectory, seed) as lists of [trajectory, seed, value].
Accuracies and differences are fractions, as in the model, except where the model says points.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ...errors import UserError
from ...run.storage import read_sealed_json
from .model import Report
from .trajectories import Trajectory

FORMAT = 1
WHAT = "report data"
REMEDY = "delete it to write a new one (what it carried over from run folders that are gone is then lost)"


def _plain(value):
    """`value` as JSON types whose checksum survives a round trip (json.dumps would turn int keys into strings
    after sorting them as ints, so a reread file would sort differently)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        if all(isinstance(k, tuple) for k in value) and value:
            return [[*k, _plain(v)] for k, v in value.items()]
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(report: Report) -> dict:
    return {"format": FORMAT, **_plain(report)}


def completed_runs(path: Path) -> int | None:
    """How many completed runs the report in `path` was written from; None when there is no report.json (or
    one that does not say)."""
    if not path.exists():
        return None
    obj = read_sealed_json(path, WHAT, remedy=REMEDY, required=lambda _obj: True)
    complete = ((obj.get("header") or {}).get("status") or {}).get("complete") if isinstance(obj, dict) else None
    return complete if isinstance(complete, int) else None


def read_trajectories(path: Path) -> dict[tuple[str, int], Trajectory]:
    """(pair, trajectory number) -> Trajectory from an earlier report.json; {} when there is none. A damaged or
    foreign file is refused (UserError naming it): what it carries may be the only copy left."""
    if not path.exists():
        return {}
    obj = read_sealed_json(path, WHAT, remedy=REMEDY, required=lambda _obj: True)
    try:
        if obj.get("format") != FORMAT:
            raise ValueError(f"format {obj.get('format')!r}, not {FORMAT}")
        return {(pair["name"], t.number): t for pair in obj["pairs"]
                for t in map(Trajectory.from_json, pair["trajectories"])}
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        problem = f"{type(error).__name__}: {error}".splitlines()[0]
        raise UserError(f"{WHAT} {path} is not a report.json this ckptkd can read ({problem}); {REMEDY}") from None
