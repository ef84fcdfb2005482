"""The README's tour, as a new user would follow it: every command parses, names configs that exist, and reads
only runs that an earlier command of the tour wrote (a tour that distilled from `runs/t2` before any command made
it is how this check began). Training is left out: the commands themselves are tested elsewhere."""

import re
import shlex

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
