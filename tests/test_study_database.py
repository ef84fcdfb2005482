"""A study's results.sqlite when it is not what it should be: empty, another program's, truncated, a folder, locked
by another process, or an older copy. Each is one line naming the file and exit 2, and nothing already written
(the report, the database itself) is changed."""

import shutil
import sqlite3

import pytest
import yaml

from ckptkd.cli.main import main
from ckptkd.errors import RunsFailed, UserError
from ckptkd.study import queue
from ckptkd.study.queue import ResultsDB
from ckptkd.study.report import write_report
from ckptkd.study.runner import run_study
from test_study_report import Study, trajectory_metrics


def _study(root):
    st = Study(root, name="kept", seeds=(0, 1), trajectories=1)
    p = "a->b"
    st.pair(p, ["none", "Tfull", "Tstar"])
    teacher = st.teacher(p, 0, 0.8)
    analysis = st.analysis(p, 0, trajectory_metrics(20, [10, 20], 10), depends_on=[teacher])
    for s in (0, 1):
        st.student(p, "none", [(0, s)], 0.60 + 0.01 * s)
        st.student(p, "Tfull", [(0, s)], 0.62 + 0.01 * s, depends_on=[teacher])
        st.student(p, "Tstar", [(0, s)], 0.63 + 0.01 * s, depends_on=[teacher, analysis])
    study = st.build()
    write_report(study, quiet=True)
    return study


def _written(study):
    """Every file of the study (but the plots, checked by their report, and SQLite's own -wal and -shm beside a
    database in WAL mode, which any reader may create) with its bytes."""
    return {p.name: p.read_bytes() for p in study.iterdir() if p.is_file() and "sqlite-" not in p.name}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ckptkd: error: ") and "Traceback" not in err, err
    return err


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _empty(path):
    path.write_bytes(b"")


def _foreign(path):
    path.unlink()
    with sqlite3.connect(path) as other:
        other.execute("CREATE TABLE photos (id INTEGER PRIMARY KEY, file TEXT)")
        other.execute("INSERT INTO photos (file) VALUES ('cat.jpg')")
    other.close()


@pytest.mark.parametrize("damage, says", [
    (_empty, "not a ckptkd study database (it is empty)"),
    (_foreign, "not a ckptkd study database (its tables: photos)"),
    (_truncate, "damaged or not a database"),
    (lambda p: p.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 8), "damaged or not a database"),
    (lambda p: (p.unlink(), p.mkdir()), "is not a file"),
])
def test_a_report_from_a_database_that_is_not_the_study_s_is_refused_and_changes_nothing(tmp_path, capsys, damage,
                                                                                        says):
    study = _study(tmp_path)
    for extra in study.glob("results.sqlite-*"):
        extra.unlink()
    damage(study / "results.sqlite")
    before = _written(study)
    assert main(["report", str(study)]) == 2
    err = _one_line_error(capsys)
    assert str(study / "results.sqlite") in err and says in err
    assert _written(study) == before  # report.md, report.json, results.csv, and the database itself
    if damage is _empty:
        return  # to a study's worker an empty file is a database not yet begun (a killed first start): nothing lost
    # A study's workers (the database's writers) are refused the same way.
    with pytest.raises(UserError, match=says.replace("(", r"\(").replace(")", r"\)")):
        ResultsDB(study / "results.sqlite")
    assert _written(study) == before


def test_a_database_locked_by_another_process_is_named_after_a_bounded_wait(tmp_path, monkeypatch):
    path = tmp_path / "results.sqlite"
    ResultsDB(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA journal_mode = DELETE")  # so that an exclusive lock keeps readers out too
    holder.execute("BEGIN EXCLUSIVE")
    monkeypatch.setattr(queue, "BUSY_S", 0.2)
    try:
        with pytest.raises(UserError, match=r"results.sqlite is locked by another process \(waited 0.2 s\)"):
            ResultsDB(path)
        with pytest.raises(UserError, match="is locked by another process"):
            ResultsDB(path, readonly=True)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    ResultsDB(path).close()  # the lock released, the same database opens


def test_a_report_from_fewer_completed_runs_is_refused_unless_replace(tmp_path, capsys):
    study = _study(tmp_path)
    older = tmp_path / "older.sqlite"
    shutil.copy(study / "results.sqlite", older)
    with sqlite3.connect(older) as db:  # an older copy: the T* students had not finished
        db.execute("UPDATE runs SET status = 'pending', metrics = NULL WHERE name LIKE '%Tstar%'")
    db.close()
    for extra in study.glob("results.sqlite-*"):
        extra.unlink()
    shutil.copy(older, study / "results.sqlite")
    before = _written(study)
    assert main(["report", str(study)]) == 2
    err = _one_line_error(capsys)
    assert "holds 6 completed runs, but the report" in err and "written from 8" in err and "--replace" in err
    assert _written(study) == before
    assert main(["report", str(study), "--replace"]) == 0
    assert "**2 of 8 runs are not complete** (2 pending)" in (study / "report.md").read_text()


def test_a_study_that_ends_with_runs_failed_for_good_lists_them_and_exits_1(tmp_path, monkeypatch, capsys):
    from ckptkd.study import execution
    from test_study import tiny_study

    real = execution._execute

    def analysis_fails(task, study_dir, db):
        if task["kind"] == "analyze":
            raise RuntimeError("the analysis broke")
        return real(task, study_dir, db)

    monkeypatch.setattr(execution, "_execute", analysis_fails)
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(tiny_study(seeds=1, variants=["none", "Tstar"], max_attempts=1)))
    assert main(["study", str(config), "--out", str(tmp_path / "s")]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    with ResultsDB(tmp_path / "s" / "results.sqlite", readonly=True) as db:
        analysis = db.rows(kind="analyze")[0]["name"]
        assert {r["status"] for r in db.rows(kind="train")} == {"complete"}
    assert err.startswith("ckptkd: study ") and f"1 runs failed for good ({analysis}), blocking 1 more" in err, err
    assert (tmp_path / "s" / "report.md").is_file()  # the report is written all the same
    with pytest.raises(RunsFailed) as failed:
        run_study(config, out=tmp_path / "s", quiet=True)  # a rerun has nothing left to try, and says so again
    assert failed.value.failed == [analysis] and failed.value.blocked == 1
