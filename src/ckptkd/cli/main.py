"""The command line: a thin face over the Python API.

Exit codes: 0 ok, 2 a user error (one line on stderr naming the field, file or reference at fault), 1 a bug, 130
interrupted by Ctrl-C, 128 + N by signal N (143: SIGTERM, 140: SIGUSR2, Slurm's warning before a time limit).
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
from pathlib import Path


def _print_trajectory(run_path: Path) -> None:
    from ..training import distributed
    from .tables import trajectory_table

    if distributed.is_main():  # under torchrun, one table, not one per process
        trajectory_table(run_path)


def _note_resume_of_nothing(args) -> None:
    """`--resume` into a folder that does not exist starts a new run (a job script may pass --resume from its
    first launch on, so a requeue continues), but a mistyped path should not train from scratch unnoticed."""
    if args.resume and args.out and not Path(args.out).exists():
        print(f"ckptkd: note: --resume: {args.out} does not exist; starting a new run there", file=sys.stderr)


def cmd_train(args) -> None:
    from ..training.api import train

    _note_resume_of_nothing(args)
    run = train(args.config, overrides=args.set, out=args.out, resume=args.resume)
    _print_trajectory(run.path)


def cmd_distill(args) -> None:
    from ..errors import UserError
    from ..training.api import distill, distill_fused
    from .tables import runs_table

    _note_resume_of_nothing(args)
    if args.fuse or args.seeds:
        if not args.teacher:
            raise UserError("distill --fuse: name each student's teachers with --teacher (none for no teacher)")
        runs = distill_fused(args.config, teachers=args.teacher, seeds=args.seeds, overrides=args.set, out=args.out,
                             resume=args.resume, allow_incomplete=args.allow_incomplete, group_size=args.fuse or 8)
        runs_table(runs[0].path.parent, [run.path for run in runs])  # every student's numbers, as `show` prints
        return
    run = distill(args.config, teachers=args.teacher, overrides=args.set, out=args.out, resume=args.resume,
                  allow_incomplete=args.allow_incomplete)
    _print_trajectory(run.path)


def cmd_show(args) -> None:
    from ..run import MANIFEST, runs_under
    from .tables import runs_table, study_table

    path = Path(args.run)
    if (path / "results.sqlite").is_file() and not (path / MANIFEST).is_file():  # a study: its tasks, by variant
        study_table(path)
        return
    runs = runs_under(path) if path.is_dir() and not (path / MANIFEST).is_file() else []
    if runs:  # a folder of runs, e.g. what distill --fuse wrote
        runs_table(path, runs)
    else:
        _print_trajectory(path)


def cmd_import(args) -> None:
    from ..training.importer import import_trajectory

    run = import_trajectory(args.source, model=args.model, out=args.out, fmt=args.format, epochs=args.epochs,
                            strip_prefix=args.strip_prefix, overrides=args.set, config=args.config)
    _print_trajectory(run.path)


def cmd_analyze(args) -> None:
    from ..selection.analysis import analyze
    from .tables import analysis_table

    result = analyze(args.run, temperature=args.temperature, seed=args.seed, seeds=args.seeds, split=args.split,
                     plots=not args.no_plots, allow_incomplete=args.allow_incomplete, out=args.out)
    analysis_table(result)


def cmd_select(args) -> None:
    import json

    from ..selection.analysis import select

    result = select(args.run, k=args.k, by=args.by, split=args.split, allow_incomplete=args.allow_incomplete,
                    student=args.student, overrides=args.set, proxy_epochs=args.proxy_epochs,
                    analysis=args.analysis)
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(result["references"]))


def cmd_study(args) -> None:
    from ..study.runner import run_study

    overrides = list(args.set) + ([f"launcher={args.launcher}"] if args.launcher else [])
    run_study(args.config, out=args.out, overrides=overrides, report=not args.no_report)


def cmd_report(args) -> None:
    from ..study.report import write_report

    paths = write_report(args.study, replace=args.replace)
    print(paths["report"])


def cmd_demo(args) -> None:
    from importlib.resources import files

    from ..study.runner import run_study

    study = run_study(str(files("ckptkd") / "configs" / "demo.yaml"), out=args.out)
    print(f"report: {study / 'report.md'}")


def cmd_verify(args) -> None:
    from ..errors import UserError
    from .verify import verify

    report = verify(args.path)
    for line in report.damaged:
        print(f"damaged: {line}")
    for line in report.leftovers:
        print(f"leftover (harmless, removed by the next --resume): {line}")
    if report.missing_runs:
        print(f"note: {report.missing_runs} finished runs have no folder here (their numbers are in the database)")
    if not report.ok:
        raise UserError(f"verify: {len(report.damaged)} of {report.checked} files in {args.path} are damaged "
                        "(listed above)")
    print(f"verified {report.checked} files in {args.path}: all intact")


def cmd_bench(args) -> None:
    from .bench import main_json, print_bench, print_fused_bench, run_bench, run_fused_bench

    if args.workload in ("folder", "fused"):
        if args.workload == "folder":
            from .bench_folder import print_folder_bench as show, run_folder_bench

            result = run_folder_bench(images=args.images, steps=args.steps, rounds=args.rounds,
                                      workers=args.workers, threads=args.threads, device=args.device)
        else:
            show = print_fused_bench
            result = run_fused_bench(members=args.members, steps=args.steps, rounds=args.rounds,
                                     threads=args.threads, device=args.device)
        if args.json:
            import json

            print(json.dumps(result))
        else:
            show(result)
        return

    result = run_bench(args.workload, steps=args.steps, rounds=args.rounds, threads=args.threads, device=args.device,
                       autocast=args.autocast)
    if args.json:
        print(main_json(result))
    else:
        print_bench(result)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 64:
        raise argparse.ArgumentTypeError(f"expected 0 to 64, got {text!r}")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds):
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}")
    return seeds


class _Parser(argparse.ArgumentParser):
    """Argument errors in one line, as every other input error (the usage is one --help away)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ckptkd", description="Knowledge distillation from model checkpoints.")
    parser.add_argument("--version", action="version", version=f"ckptkd {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    def add_allow_incomplete(p):
        p.add_argument("--allow-incomplete", action="store_true",
                       help="use runs that did not complete (interrupted or failed); recorded in the manifest")

    def add_run_options(p, *, config_required: bool = True):
        if config_required:
            p.add_argument("config", help="YAML config file")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key by its dotted path, e.g. --set schedule.epochs=5")
        p.add_argument("--out", default=None, help="run folder (default: runs/NAME)")

    p = sub.add_parser("train", help="train a model and keep its trajectory of checkpoints")
    add_run_options(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="train a student from teacher checkpoints (none: the CE baseline)")
    add_run_options(p)
    p.add_argument("--teacher", action="append", default=[], metavar="REF",
                   help="checkpoint reference, e.g. runs/t@0.5 or runs/t@0.3,0.5,0.7; A+B or a repeated --teacher "
                        "an ensemble, none no teacher (with --fuse: one student per --teacher)")
    p.add_argument("--fuse", type=_positive, nargs="?", const=8, default=None, metavar="N",
                   help="one student per --teacher and seed, trained together in groups of at most N (default 8) into "
                        "OUT/TEACHER-sSEED")
    p.add_argument("--seeds", type=_seed_list, default=None, metavar="S,S,...",
                   help="one student per seed and --teacher (implies --fuse; default: the config's seed)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    add_allow_incomplete(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("analyze", help="measure every checkpoint's dark knowledge and I(X;F), I(Y;F); select T*")
    p.add_argument("run")
    p.add_argument("--temperature", type=float, default=None, help="tau for tempered outputs (default: the run's kd.temperature)")
    p.add_argument("--seed", type=int, default=0, help="seed of the estimators' splits and probes")
    p.add_argument("--seeds", type=int, default=5, help="split seeds per estimate (mean and standard error)")
    p.add_argument("--split", choices=["train", "val"], default="train",
                   help="where T* is selected: the training inputs the student sees (default) or validation")
    p.add_argument("--no-plots", action="store_true", help="skip the figures")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the analysis (analysis.json, plots/, analysis-cache/) here, not into the run folder: "
                        "for a run you cannot or will not write to; read it back with `select --analysis DIR`")
    add_allow_incomplete(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("select", help="print references to T* (or the top K checkpoints: a snapshot ensemble)")
    p.add_argument("run")
    p.add_argument("--k", type=int, default=1, help="how many checkpoints (default 1)")
    p.add_argument("--by", choices=["info", "knn-info", "val", "p_target", "nontarget_entropy", "nc1", "proxy"],
                   default="info", help="the selection criterion (default: the information criterion; proxy: short "
                                        "distillations of --student from every checkpoint, scored on validation)")
    p.add_argument("--student", default=None, help="--by proxy: the student's config")
    p.add_argument("--proxy-epochs", type=_positive, default=None,
                   help="--by proxy: epochs of each proxy student (default: 10%% of the student's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="--by proxy: override a student key")
    p.add_argument("--split", choices=["train", "val"], default=None,
                   help="the split the criterion is read on (default: the criterion's own)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: t_star, ties, criterion, per-checkpoint score and se")
    p.add_argument("--analysis", default=None, metavar="DIR",
                   help="the run's analysis was written to DIR (`analyze --out DIR`); --by proxy keeps its proxies there")
    add_allow_incomplete(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("study", help="run the paper's grid over seeds (resumable; several processes share it)")
    p.add_argument("config", help="study YAML")
    p.add_argument("--out", default=None, help="study folder (default: studies/NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a study key")
    p.add_argument("--no-report", action="store_true", help="skip writing the report at the end")
    p.add_argument("--launcher", choices=("local", "slurm"), default=None,
                   help="where tasks run: local (this process; start more to share the work) or slurm (this process "
                        "coordinates, each group of tasks is a Slurm job); default: the study's launcher key, local")
    p.set_defaults(func=cmd_study)

    p = sub.add_parser("report", help="write STUDY/report.md, results.csv and plots from a study's results")
    p.add_argument("study")
    p.add_argument("--replace", action="store_true",
                   help="write the report even if the database holds fewer completed runs than the last report did "
                        "(a restored older copy, say)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the study on the embedded digits data, in a few minutes on a CPU")
    p.add_argument("--out", default="studies/demo", help="study folder (default: studies/demo)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("bench", help="images/s of KD training modes, side by side on a synthetic workload")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--workload", default="cifar",
                   help="cifar (default: 3x32x32, resnet56 -> resnet20), fashion, digits, fused (N students one "
                        "at a time vs as one group) or folder (streamed JPEGs vs their decode limit)")
    p.add_argument("--images", type=_positive, default=None,
                   help="training images of --workload folder (default 2000)")
    p.add_argument("--workers", type=_count, default=None,
                   help="decoding processes of --workload folder (default: the CPU count, at most 8)")
    p.add_argument("--members", type=_positive, default=8, help="students for --workload fused (default 8)")
    p.add_argument("--steps", type=_positive, default=None, help="timed steps per mode and round")
    p.add_argument("--rounds", type=_positive, default=None, help="rounds; the best of them counts")
    p.add_argument("--threads", type=_positive, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"], help="where to run (default: cpu)")
    p.add_argument("--autocast", default="none", choices=["none", "bf16", "fp16"],
                   help="teachers' autocast dtype (default: none)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("verify", help="check every file of a run or study (checksums, seals, the database); "
                                      "exit 2 if something is damaged")
    p.add_argument("path", help="a run folder, a study folder, or a folder of runs")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("show", help="print a run's trajectory table")
    p.add_argument("run")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("import", help="turn a checkpoint, or a folder of per-epoch checkpoints, into a run")
    p.add_argument("source", help="a checkpoint file, a folder of them (or of HF checkpoint-STEP/ folders), or a glob;"
                                  " pickles are read with weights_only=True")
    p.add_argument("--format", default="auto", choices=["auto", "repdistiller", "mdistiller", "checkpointkd", "timm",
                                                        "hf", "lightning", "state_dict"],
                   help="the trainer that wrote them (default: told from the files)")
    p.add_argument("--epochs", type=int, default=None,
                   help="the trajectory's total epochs (default: from the files), so fractions like RUN@0.5 work")
    p.add_argument("--strip-prefix", default=None, metavar="PREFIX",
                   help="drop this prefix of every weight name, e.g. model. for a Lightning module's attribute")
    p.add_argument("--model", required=True, help="registered model name, e.g. wrn_40_2")
    p.add_argument("--config", default=None, help="optional YAML config for the data it was trained on")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--out", required=True, help="run folder to create")
    p.set_defaults(func=cmd_import)
    return parser


def _version() -> str:
    from .. import __version__

    return __version__


def _as_typed(path: str) -> str:
    """A program's name alone where the shell would find this same file by it, else its path."""
    found = shutil.which(Path(path).name)
    return Path(path).name if found and Path(found).resolve() == Path(path).resolve() else path


def program() -> list[str]:
    """How this process was started, to repeat in a hint: `ckptkd`, `.venv/bin/ckptkd` or `python -m ckptkd`."""
    if Path(sys.argv[0]).name == "__main__.py":
        return [_as_typed(sys.executable), "-m", "ckptkd"]
    return [_as_typed(sys.argv[0])]


def _resume_hint(args, argv: list[str], prog: list[str]) -> str:
    """How to continue what was interrupted, for the commands that can be continued."""
    if args.command in ("train", "distill"):
        return "; continue with: " + shlex.join([*prog, *(a for a in argv if a != "--resume"), "--resume"])
    if args.command in ("study", "demo"):
        return "; run the same command again to continue (finished runs are kept)"
    return ""


def main(argv: list[str] | None = None) -> int:
    # Parsing first, before anything imports torch, so --help and argument errors answer at once.
    prog = program() if argv is None else ["ckptkd"]  # a call from Python names the command line's tool
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    import signal

    from ..errors import INTERRUPTING_SIGNALS, Interrupted, RunsFailed, UserError, raise_interrupted
    from ..training import distributed

    for signum in INTERRUPTING_SIGNALS:  # preemption, a time limit, a hang-up: interruptions, not crashes
        signal.signal(signum, raise_interrupted)
    try:
        if distributed.launched() and args.func not in (cmd_train, cmd_distill):
            raise UserError(f"ckptkd {args.command} does not run under torchrun; only train and distill do "
                            "(start study workers as separate processes instead)")
        args.func(args)
        distributed.finish()
    except UserError as e:
        message = " ".join(str(e).split())
        print(f"ckptkd: error: {message}", file=sys.stderr)
        return 2
    except RunsFailed as e:  # not the user's input at fault, and not a crash: runs of the study failed
        print(f"ckptkd: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        by = f" by {e}" if isinstance(e, Interrupted) else ""
        print(f"ckptkd: interrupted{by}{_resume_hint(args, argv, prog)}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 130
    except OSError as e:
        if e.filename is None:
            raise
        # The file system said no (permissions, a full disk, a path that is a file): the user's to fix, not a bug.
        print(f"ckptkd: error: {e.strerror or e}: {e.filename}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
