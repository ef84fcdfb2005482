"""`ckptkd report STUDY`: the study's results as the paper presents them, with the statistics it lacks, in
report.md, results.csv, report.json and plots/.

Everything is rebuilt from results.sqlite (opened read-only) and study.yaml; the teacher trajectories from the
analysis summaries the database keeps (or the teachers' run folders). A trajectory section that cannot be rebuilt
because its run folders are not here (they are not committed with a study) is carried over from the previous
report.json, marked as such, never dropped. The report has no timestamps and every resampling is seeded, so the
same results give the same files.

The parts: `loading` reads every input; `model.build` turns them into the report as data (with `comparisons`,
`verdicts`, `selection` and `trajectories`), reading no file; `markdown`, `csv`, `report_json`, `terminal` and
`plots` render it.

Accuracy: the mean test accuracy of each student's last k epochs (the run's `eval.last_k`, default 5), or the
last-epoch accuracy for studies run before it was recorded; never the best test epoch, which would select on the
test set (the paper reports the best of the last 10). Students are paired by (trajectory, seed).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ...errors import UserError
from ...formatting import terminal_console
from ...run.storage import atomic_write_text, remove_stale_temporaries, write_sealed_json
from . import csv, markdown, plots, report_json, terminal
from .loading import load
from .markdown import CARRIED
from .model import Report, build

__all__ = ["CARRIED", "Report", "build", "write_report"]


def write_report(study: str | Path, *, console: Console | None = None, quiet: bool = False,
                 replace: bool = False) -> dict[str, str | list[str]]:
    """Write STUDY/report.md, STUDY/results.csv, STUDY/report.json and STUDY/plots/*.png; print the findings and
    the main tables (unless `quiet`).

    A report is never replaced by one written from fewer completed runs (a database restored from an older copy,
    or emptied) unless `replace`: the report it would overwrite may be the only record of those runs.

    Returns {"report": path, "csv": path, "plots": [paths], "carried_over": [headings], "verdicts": {pair: ...}}.
    """
    study = Path(study)
    inputs = load(study)
    for leftovers in (study, study / "plots"):  # of a killed report
        remove_stale_temporaries(leftovers, shared=True)
    report = build(inputs.config, inputs.rows, inputs.blocked, inputs.trajectories)
    complete = report.header.status["complete"]
    if inputs.previous_complete is not None and complete < inputs.previous_complete and not replace:
        raise UserError(f"report: {study / 'results.sqlite'} holds {complete} completed runs, but the report in "
                        f"{study} was written from {inputs.previous_complete}; the report was not changed (is the "
                        "database an older copy?). Pass --replace to write it from this database anyway")
    report.carry_over(inputs.previous)
    headings = [markdown.trajectory_heading(pair, t) for pair in report.pairs for t in pair.trajectories
                if t.carried]
    figures = plots.write_figures(report, study)
    paths = {"report": study / "report.md", "csv": study / "results.csv"}
    atomic_write_text(paths["report"], markdown.render(report, figures))
    atomic_write_text(paths["csv"], csv.render(report))
    write_sealed_json(study / "report.json", report_json.to_json(report))
    if not quiet:
        terminal.show(report, console or terminal_console(), str(paths["report"]), headings)
    return {"report": str(paths["report"]), "csv": str(paths["csv"]), "plots": figures.paths(),
            "carried_over": headings, "verdicts": {pair.name: str(pair.finding.verdict) for pair in report.pairs}}
