"""How ckptkd writes numbers and names for people: percentages, point differences, file-name slugs, the console.

One place for each, so a run table, a study report and a log line print the same value the same way.
"""

from __future__ import annotations

import re

EMPTY = "—"


def percent(value: float | None, missing: str = EMPTY) -> str:
    """A fraction as a percentage with two decimals (0.8547 -> "85.47"); `missing` for None."""
    return missing if value is None else f"{100 * value:.2f}"


def points(value: float) -> str:
    """A difference in percentage points, signed, with a true minus sign ("+0.42", "−0.15"); "0.00" when it rounds
    to zero, so no "−0.00" appears."""
    if round(value, 2) == 0:
        return "0.00"
    return f"{value:+.2f}".replace("-", "−")


def slug(text: str, keep: str = "._-", *, collapse: bool = False) -> str:
    """`text` made safe as a file name: every character but letters, digits and `keep` becomes "-". With `collapse`,
    each run of such characters becomes one "-" and none is left at either end ("cnn->cnn, 20 %" -> "cnn-cnn-20").

    Run folders of a study are named with the default (their names are part of task ids: never change it)."""
    marked = "".join(c if c.isalnum() or c in keep else "\0" for c in text)
    return re.sub("\0+", "-", marked).strip("-") if collapse else marked.replace("\0", "-")


def data_label(data: dict) -> str:
    """A data set's name for titles: the user's own file or folder name for npz and folder data."""
    return data.get("label") or data.get("name", "?")


def terminal_console():
    """A rich console that keeps tables readable when output goes to a file or a CI log (rich would assume 80
    columns there)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)
