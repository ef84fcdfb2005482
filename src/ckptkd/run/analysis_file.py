"""The format of RUN/analysis.json as every reader relies on it (`select`, references such as `RUN@best-info`,
study reports, `verify`): `analysis_problem` names the first field a damaged or foreign analysis gets wrong.

`ckptkd.selection.analysis` writes the file; the criteria it computes are named here because they are part of the
format: every one of them is written on both splits, and any of them may be asked for.
"""

from __future__ import annotations

CRITERION_NAMES = ("info", "knn-info", "val", "p_target", "nontarget_entropy", "nc1")


def analysis_problem(analysis) -> str | None:
    """What is wrong with the parts of an analysis that `select`, references and reports read, or None."""
    def integer(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def epochs(v):
        return isinstance(v, list) and all(integer(e) for e in v)

    if not isinstance(analysis, dict):
        return "not a mapping"
    if not isinstance(analysis.get("checkpoints"), list) or not all(
            isinstance(c, dict) and integer(c.get("epoch")) for c in analysis["checkpoints"]):
        return "checkpoints must be a list of entries with an integer epoch"
    if analysis.get("split") not in ("train", "val"):
        return "split must be train or val"
    criteria = analysis.get("criteria")
    if not isinstance(criteria, dict):
        return "criteria must be a mapping"
    missing = [f"{name}@{split}" for name in CRITERION_NAMES for split in ("train", "val") if f"{name}@{split}" not in criteria]
    if missing:  # analyze writes every criterion on both splits; select and reports may ask for any of them
        return f"criteria lack {missing[0]}"
    for key, c in criteria.items():
        where = f"criteria.{key}"
        if not isinstance(c, dict):
            return f"{where} must be a mapping"
        if c.get("t_star") is not None and not integer(c["t_star"]):
            return f"{where}.t_star must be an epoch or null"
        if not epochs(c.get("ties")):
            return f"{where}.ties must be a list of epochs"
        if not isinstance(c.get("scores"), list) or not all(
                isinstance(r, dict) and integer(r.get("epoch")) and number(r.get("score"))
                and (r.get("se") is None or number(r["se"])) and isinstance(r.get("tied", False), bool)
                for r in c["scores"]):
            return f"{where}.scores must be entries with an epoch, a score and its se"
        if not isinstance(c.get("flat"), bool):
            return f"{where}.flat must be true or false"
        if not isinstance(c.get("skipped"), list) or not all(
                isinstance(s, dict) and integer(s.get("epoch")) and isinstance(s.get("why"), str)
                for s in c["skipped"]):
            return f"{where}.skipped must be entries with an epoch and why"
    selected = analysis.get("selected")
    if not isinstance(selected, dict) or not integer(selected.get("epoch")) or not epochs(selected.get("ties")) \
            or selected.get("criterion") not in criteria:
        return "selected must name an epoch, its ties and one of the criteria"
    if not isinstance(analysis.get("ranking"), list) or not all(
            isinstance(r, dict) and integer(r.get("epoch")) for r in analysis["ranking"]):
        return "ranking must be a list of entries with an integer epoch"
    return None
