"""results.csv: every run of the study, one line each, in the database's order (empty fields for missing values)."""

from __future__ import annotations

import csv
import dataclasses
import io

from .model import Report, RunRecord

COLUMNS = tuple(f.name for f in dataclasses.fields(RunRecord))


def render(report: Report) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for run in report.runs:
        values = {**dataclasses.asdict(run), "health": " ".join(run.health)}
        writer.writerow(["" if values[k] is None else values[k] for k in COLUMNS])
    return buffer.getvalue()
