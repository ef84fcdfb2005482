"""The report on a terminal: the findings, then Table 3 and the comparison tables. Labels are never cut or broken
over lines: a table too wide for the console is turned (its rows as columns), and one too wide either way is left
to report.md, saying so."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ...formatting import EMPTY
from .findings import paragraph
from .model import Report
from .tables import TextTable, cache_table, comparison_table, ensemble_table, table3


def width(table: TextTable, transpose: bool = False) -> int:
    """Columns the terminal table needs with every cell on one line (borders and padding included)."""
    if transpose:
        columns = [[c for c in table.header[table.text_columns:]]] + [
            [" ".join(t for t, _ in row[:table.text_columns]).strip()] + [t for t, _ in row[table.text_columns:]]
            for row in table.rows]
    else:
        columns = [[table.header[i]] + [row[i][0] for row in table.rows] for i in range(len(table.header))]
    return sum(max(map(len, column)) + 3 for column in columns) + 1


def rich_table(table: TextTable, transpose: bool = False) -> Table:
    """As rich draws it; `transpose`: rows as columns (one column per variant breaks words at 80 columns)."""
    out = Table(title=table.title)
    if not transpose:
        for i, column in enumerate(table.header):
            out.add_column(column, justify="left" if i < table.text_columns else "right", no_wrap=True)
        for row in table.rows:
            out.add_row(*(Text(text, style="bold" if bold else "") for text, bold in row))
        return out
    out.add_column("", no_wrap=True)
    for row in table.rows:
        out.add_column(" ".join(text for text, _ in row[:table.text_columns]).strip() or EMPTY, justify="right",
                       no_wrap=True)
    for i, column in enumerate(table.header[table.text_columns:], start=table.text_columns):
        out.add_row(column, *(Text(row[i][0], style="bold" if row[i][1] else "") for row in table.rows))
    return out


def show(report: Report, console: Console, where: str, carried: list[str]) -> None:
    """Print the findings and the main tables; `where`: report.md's path, for what does not fit; `carried`: the
    headings of the sections carried over from the previous report."""
    for pair in report.pairs:
        console.print(paragraph(pair).replace("**", ""))
    tables = [table3(report)] + [t for t in (comparison_table(report), ensemble_table(report)) if t.rows]
    if report.online:
        tables.append(cache_table(report))
    skipped = []
    for table in tables:  # whole words only: a table too wide for the terminal is turned, or left to report.md
        fitting = next((rich_table(table, transpose=turned) for turned in (False, True)
                        if width(table, turned) <= console.width), None)
        if fitting is None:
            skipped.append(table.title.split(":")[0])
        else:
            console.print(fitting)
    if skipped:
        console.print(f"too wide for {console.width} columns, in {where}: {'; '.join(skipped)}")
    if carried:
        console.print(f"carried over from the previous report (run folders not here): {', '.join(carried)}")
    if report.unfinished:
        console.print(f"{len(report.unfinished)} of {report.header.runs} runs are not complete; see {where}")
