"""report.md: the report model as Markdown (no timestamps, so the same results give the same file)."""

from __future__ import annotations

from pathlib import Path

from ...formatting import EMPTY
from .. import variants as variants_mod
from .findings import paragraph
from .model import Header, PairReport, Report
from .plots import ACCURACY, Figures
from .tables import TextTable, cache_table, comparison_table, ensemble_table, label, selection_table, table3, \
    table3_in, time_table, trajectory_table
from .trajectories import Trajectory
from .verdicts import GATE_POINTS

CARRIED = "*Carried over from the previous report: the run folders it was built from are not here.*"


def table(t: TextTable) -> list[str]:
    align = ["---"] * t.text_columns + ["---:"] * (len(t.header) - t.text_columns)
    lines = ["| " + " | ".join(t.header) + " |", "|" + "|".join(align) + "|"]
    for row in t.rows:
        lines.append("| " + " | ".join(f"**{text}**" if bold else text for text, bold in row) + " |")
    return lines


def trajectory_heading(pair: PairReport, trajectory: Trajectory) -> str:
    if len(pair.trajectories) == 1:
        return f"### {pair.name}"
    return f"### {pair.name}, trajectory {trajectory.number}"


def _header(h: Header) -> list[str]:
    metric = ("the mean test accuracy of each student's last k epochs (k = `eval.last_k`, default 5)" if h.last_k
              else "last-epoch test accuracy (this study predates the last-k mean)")
    datasets = ", ".join(name + (f" ({100 * noise:g} % label noise)" if noise else "") for name, noise in h.datasets)
    complete = h.status["complete"]
    numbers = lambda values: ", ".join(map(str, values)) or EMPTY  # noqa: E731
    lines = [f"# Study report: {h.name}", "",
             f"- Data set: {datasets or 'unknown'}",
             f"- Teacher trajectories: {len(h.trajectories)} (numbered {numbers(h.trajectories)}); student seeds: "
             f"{numbers(h.seeds)} (students are paired by trajectory and seed: the same teacher run, initial weights "
             "and batch order across variants)",
             f"- Ensemble size M = {h.definitions.get('ensemble_size', EMPTY)}",
             f"- Accuracy: {metric} in %. ± in tables is the sample standard deviation (ddof = 1) over the students "
             "of a cell (over trajectories for teacher accuracy); (n=k) marks a cell with fewer completed runs than "
             "planned, and with n=1 the std is undefined; ⚠k counts students whose run was flagged unhealthy "
             "(see Run health), which are kept in the numbers, not hidden.",
             "- Comparisons are made at the unit that is independent: the trajectory when both variants depend on "
             "the teacher trajectory (one difference per trajectory, the mean over its seeds), the seed when neither "
             "does, and trajectory means against runs when one variant is one run per seed serving every trajectory "
             "(no KD, a full ensemble of the same members). Intervals: 95 %, Student t with n − 1 degrees of "
             "freedom (paired units) or Welch (two samples); p: an exact sign-flip (paired) or permutation (two "
             "samples) test over those units, Holm-corrected over the intermediate teachers; each comparison states "
             "its unit, n and the smallest p its units can reach. Wins / losses count the paired students, which "
             "are not independent.",
             f"- Verdicts: *confirmed* (p < 0.05 and the interval above 0), *worse* (below 0), *no gain larger "
             f"than {h.margin:g} points* (the interval ends below the equivalence margin, the paper's average gain "
             f"of T^0.5 over T^full unless the study sets `margin`), or *inconclusive*, saying why (\"design cannot "
             f"resolve\" when the smallest attainable p is not below 0.05). Gate: unless T^full beats no KD by at "
             f"least {GATE_POINTS:g} points with its interval above 0, no teacher is ranked.",
             f"- Runs: {h.runs} in results.sqlite, {complete} complete.", ""]
    if h.description:
        lines += [str(h.description).strip(), ""]
    if complete < h.runs:
        lines += [f"**{h.runs - complete} of {h.runs} runs are not complete** ("
                  + ", ".join(f"{n} {s}" for s, n in h.status.items() if n and s != "complete")
                  + "); cells use the completed runs only and show — where none completed.", ""]
    lines += ["Variants:", ""] + [f"- **{label(v)}** (`{v}`): {variants_mod.parse(v).meaning(h.definitions)}"
                                  for v in h.variants]
    if h.curve:
        lines.append("- **T@N** (`epoch<N>`): KD from the teacher's checkpoint at epoch N, for every saved "
                     "checkpoint (the selection benchmark)")
    return lines + [""]


def _selection(pair: PairReport, plot: str) -> list[str]:
    lines = [f"## Selection benchmark: {pair.name}", "",
             "Every saved checkpoint of each trajectory taught a student (the `epoch<N>` variants), so the best "
             "teacher in hindsight is known — and is never chosen on the students that score it: for each student "
             "seed, the best epoch is the one whose students of the other seeds have the highest mean accuracy "
             "(cross-fitted). Regret: the accuracy of the student of a selector's pick minus that of the best "
             "epoch's student of the same seed (0: as good as the best in hindsight; negative: lost); gain: minus "
             "T^full's student. In points, mean ± SE over trajectories (a trajectory's students share their "
             "teacher: each trajectory's mean is one unit). Cost: the selector's own wall time per trajectory "
             "(the analysis for the criteria of `ckptkd analyze`; the proxy students for the proxy; nothing for "
             "the fixed rules and best val accuracy, recorded when each checkpoint was saved). "
             "T* is the tie-aware pick a study's `Tstar` variant uses; T*_info the criterion's pure argmax.", ""]
    lines += table(selection_table(pair, pair.selection))
    return lines + ["", f"![Student accuracy against teacher epoch, {pair.name}](plots/{Path(plot).name})", "",
                    "Student accuracy against the epoch of the checkpoint that taught it (mean ± SE over seeds, one "
                    "line per trajectory), with each selector's pick marked on its trajectory's line in its colour "
                    "(picks that would hide one another set side by side); the dashed line is the no-KD "
                    "students' mean, the dotted one T^full, the last checkpoint.", ""]


def _health(report: Report) -> list[str]:
    lines = ["## Run health", ""]
    if report.health.flagged:
        lines += [f"{len(report.health.flagged)} completed runs were flagged (kept in every number above, marked ⚠):",
                  ""]
        for r in report.health.flagged:
            details = "; ".join(f"{f['flag']} at epoch {f['epoch']}: {f['detail']}" for f in r.flags)
            lines.append(f"- `{r.name}` ({r.what}): {details}")
    elif report.health.assessed:
        lines.append("No run was flagged: no training loss rose for several epochs and no training accuracy "
                     "collapsed.")
    else:
        lines.append("This study predates run health checks: its runs were not assessed.")
    return lines + [""]


def _time(report: Report) -> list[str]:
    time = report.time
    span = (f" From the first run's start to the last run's end the study took {time.span_s / 60:.1f} minutes "
            f"on {time.workers} worker process(es)." if time.span_s is not None else "")
    fused = (f" {time.fused_groups} groups of runs were trained together (fused; `fuse` in study.yaml): each run of "
             "a group is given an even share of the group's time." if time.fused_groups else "")
    note = (f"Teacher caches: {time.caches_built} built ({time.cache_seconds:.0f} s, inside the KD-student times "
            f"above) and reused {time.caches_reused} times." if time.caches_built or time.caches_reused
            else "No teacher cache was used.")
    return ["## Compute time", "", "Wall time of each completed run as the study measured it (this machine, "
            "whatever else it was doing), summed by kind of run. A cache is built by the first student that needs "
            f"it and reused by every later one.{fused}{span}", ""] + table(time_table(time)) + ["", note, ""]


def _trajectory(pair: PairReport, t: Trajectory) -> list[str]:
    if t.summary is None:
        return [f"{pair.name}: the teacher of trajectory {t.number} has not been analysed yet."]
    s = t.summary
    rho = lambda key: "undefined" if s.agreement.get(key) is None else f"{s.agreement[key]:.3f}"  # noqa: E731
    argmax = "" if s.argmax is None else (
        f"; T*_info, the criterion's pure argmax, = epoch {s.argmax}"
        + (" too" if s.argmax == s.selected_epoch else ""))
    lines = [f"Trajectory {t.number} (`{t.path}`): T* (the tie-aware pick) = epoch {s.selected_epoch} by "
             f"{s.criterion}, tied with {', '.join(str(e) for e in s.ties if e != s.selected_epoch) or 'none'}"
             f"{argmax}. Train %: the un-augmented "
             f"training images in eval mode; confidence, p_t@τ (the tempered probability of the true class), "
             f"non-target entropy (nats, at τ) and NC1 on the {s.split} split; I(X;F), I(Y;F) and the score: "
             "mean ± SE over split seeds.", ""]
    lines += table(trajectory_table(s))
    lines += ["", f"Spearman rank agreement of the probe/decoder and kNN estimators across checkpoints: I(X;F) "
                  f"{rho('spearman_i_xf')}, I(Y;F) {rho('spearman_i_yf')}, score {rho('spearman_score')}."]
    return ([CARRIED, ""] if t.carried else []) + lines


def render(report: Report, figures: Figures) -> str:
    """report.md; `figures`: the plots written for it, which it links."""
    lines = _header(report.header)
    lines += ["## Findings", ""] + [line for pair in report.pairs for line in (paragraph(pair), "")]
    lines += ["## Table 3: teacher checkpoints as teachers", "", "Best student accuracy of each row in bold; the "
              "Average row is the mean of the per-pair means (shown only when every pair has a number).", ""]
    lines += table(table3(report)) + [""]
    top5 = table3_in(report, "top5")
    if top5 is not None:
        lines += ["The same students in top-5 test accuracy (recorded where a data set has more than 5 classes; the "
                  "comparisons below are made in top-1):", ""] + table(top5) + [""]
    paper = table3_in(report, "paper")
    if paper is not None:
        lines += ["The same students in the paper's own metric, for comparison with its printed numbers: the best "
                  "test accuracy of each student's last N epochs (`eval.best_of_last`). It picks an epoch by its "
                  "test accuracy, so it is biased upwards and never used for a claim; every other number here is "
                  "the last-k mean.", ""] + table(paper) + [""]
    compared = comparison_table(report)
    if compared.rows:
        lines += ["## Comparisons", "", "Δ: first minus second variant, in points, estimated at the unit in the "
                  "third column (n in words). Holm p: adjusted over the intermediate teachers of a pair. Smallest p: "
                  "the smallest p the units can reach (after Holm where it applies). Wins / ties / losses: over "
                  "students paired by (trajectory, seed), not independent.", ""]
        lines += table(compared) + [""]
    ensembles = ensemble_table(report)
    if ensembles.rows:
        lines += ["## Full ensemble vs snapshot ensemble", "",
                  "Teachers: the accuracy of the teacher ensemble, averaged over distinct teacher sets. Δ: difference "
                  "of the student means in points; Snapshot better: paired students for which the snapshot won.", ""]
        lines += table(ensembles) + [""]
    if report.online:
        lines += ["## Teacher cache: cached vs online teachers", "",
                  "The same students (same seeds, so the same initial weights and batch order; the augmentation "
                  "draws differ, since cached students draw among each image's banked views) distilled from teacher "
                  "outputs looked up in the view-bank cache and from teachers run on every batch. Δ: cached − "
                  "online in points and in pooled standard deviations; within seed noise when |Δ| is at most one "
                  "pooled standard deviation. Cached better: paired students for which the cached one won, with the "
                  "two-sided sign test of wins against losses.", ""]
        lines += table(cache_table(report)) + [""]
    for pair in report.pairs:
        if pair.selection is not None:
            lines += _selection(pair, figures.selection[pair.name])
    lines += _health(report)
    lines += _time(report)

    lines += ["## Teacher trajectories", ""]
    for pair in report.pairs:
        if not pair.trajectories:
            lines += [f"### {pair.name}", "", f"{pair.name}: the trajectory teacher has not completed yet.", ""]
        for t in pair.trajectories:
            lines += [trajectory_heading(pair, t), ""] + _trajectory(pair, t) + [""]

    lines += ["## Plots", "", "Each figure is in plots/ as a PNG (shown here) and as a PDF of the same name, for "
              "papers.", ""]
    if figures.accuracy is not None:
        lines += [f"![Student accuracy by variant](plots/{ACCURACY})", "",
                  "Student test accuracy by variant: mean ± std (error bars), one dot per student; the dashed line "
                  "and band are the no-KD students' mean ± std, the dash-dotted line T^full's students' mean.", ""]
    for pair in report.pairs:
        if pair.name in figures.plane:
            lines += [f"![information plane, {pair.name}](plots/{Path(figures.plane[pair.name]).name})", "",
                      f"The teacher trajectories of {pair.name} in the information plane: I(Y;F) against I(X;F) at "
                      "each saved checkpoint (probe / decoder estimates, mean ± SE over split seeds), one colour per "
                      "trajectory, joined in epoch order; T* starred. Checkpoints too close to label apart share "
                      "one label naming their epochs.", ""]
        for figure, path in figures.teacher.get(pair.name, []):
            lines += [f"![{figure.replace('_', ' ')}, {pair.name}](plots/{Path(path).name})", ""]

    if report.unfinished:
        lines += ["## Runs not complete", ""]
        for r in report.unfinished:
            waits = f"; blocked by failed {', '.join(r.blocked_by)}" if r.blocked_by else ""
            error = f": {r.error}" if r.error is not None else ""
            lines.append(f"- `{r.name}` ({r.kind}, {r.status}, attempts: {r.attempts}{waits}){error}")
        lines.append("")
    return "\n".join(lines)
