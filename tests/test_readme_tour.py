"""The README's tour, as a new user would follow it: every command parses, names configs that exist, and reads
only runs that an earlier command of the tour wrote (a tour that distilled from `runs/t2` before any command made
it is how this check began); then the tour runs, command by command as written, in a fresh folder. Only the paper's
study and its report are left out (hours on a CPU; tests/test_study.py runs small studies end to end)."""

import json
import re
import shlex

import pytest

from ckptkd.cli.main import build_parser
from conftest import REPO

TOOL = ".venv/bin/ckptkd"


def tour_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    tour = text[text.index("## A short tour"):]
    tour = tour[:tour.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", tour, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words and "=" in words[0] and not words[0].startswith(TOOL):  # VAR=value before the command
                words = words[1:]
            if words and words[0] == TOOL:
                commands.append(words[1:])
    return commands


def _run_of(reference: str) -> str:
    return reference.split("@", 1)[0]


def test_every_tour_command_parses_and_reads_only_what_an_earlier_one_wrote():
    commands = tour_commands()
    assert len(commands) >= 10 and commands[0][0] == "train"
    parser = build_parser()
    written: set[str] = set()
    for argv in commands:
        args = parser.parse_args(argv)  # argparse exits (a test failure) on anything it would refuse
        config = getattr(args, "config", None)
        if config is not None:
            assert (REPO / config).is_file(), f"{shlex.join(argv)}: {config} is not in the repository"
        reads = [_run_of(r) for t in getattr(args, "teacher", None) or [] for r in t.split("+") if r != "none"]
        for key in ("run", "study"):
            if isinstance(getattr(args, key, None), str) and args.command != "study":
                reads.append(_run_of(getattr(args, key)))
        for run in reads:
            assert run in written, f"`ckptkd {shlex.join(argv)}` reads {run}, which no earlier tour command writes"
        if getattr(args, "out", None):
            written.add(args.out)


LONG = {"study", "report"}


@pytest.mark.slow
def test_the_tour_runs_as_written(tmp_path, monkeypatch, capsys):
    """In this process (`ckptkd.cli.main`, what the `ckptkd` script calls), from a fresh folder holding only the
    repository's configs: every command must exit 0."""
    from ckptkd.cli import main

    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    ran = []
    for argv in tour_commands():
        if argv[0] in LONG:
            continue
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, f"`ckptkd {shlex.join(argv)}` exited {code}:\n{err[-3000:]}"
        ran.append((argv, out))
    assert len(ran) >= 12
    picked = next(json.loads(out) for argv, out in ran if argv[:3] == ["select", "runs/t", "--json"])
    assert picked["t_star"] in picked["ties"] and picked["criterion"] == "info@train"
    elsewhere = next(out.split() for argv, out in ran if "--analysis" in argv)
    assert len(elsewhere) == 3 and all(ref.startswith("runs/t2@epoch=") for ref in elsewhere)
    assert not (tmp_path / "runs" / "t2" / "analysis.json").exists()
    assert (tmp_path / "runs" / "t2-analysis" / "analysis.json").is_file()
