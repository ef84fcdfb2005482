"""Nothing damaged is used, nothing from data runs: flipped bytes and truncated files in every kind of file ckptkd
writes are refused with one line naming the file (exit 2) by the command that would use them and listed by
`ckptkd verify`; a YAML tag that would build an object is refused before anything is written."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import call_cli, manifest_json, rewrite_manifest, tiny_config

from ckptkd.cli import main


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path, offset: int) -> None:
    path.write_bytes(path.read_bytes()[:offset])


@pytest.fixture(scope="module")
def sealed_run(tmp_path_factory, teacher_run):
    """A copy of the shared teacher, analysed, with a teacher cache built beside it and its resume state kept."""
    from ckptkd import analyze, distill

    root = tmp_path_factory.mktemp("integrity")
    run = root / "t"
    shutil.copytree(teacher_run.path, run)
    shutil.rmtree(run / "cache", ignore_errors=True)  # other tests' caches of the shared teacher: only this one's
    analyze(run, plots=False, quiet=True, seeds=2)
    distill(tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1}, kd={"cache": "on"}),
            teachers=[f"{run}@last"], out=root / "student", quiet=True)
    return run


def _student_yaml(tmp_path) -> str:
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1},
                                               kd={"cache": "on"})))
    return str(path)


def _one_line_error(capsys, argv, *needles):
    """Exit 2 and one error line naming the file (progress lines, such as a teacher's accuracy, may come before)."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("ckptkd: error:")]
    assert len(errors) == 1 and err.endswith(errors[0]) and "Traceback" not in err, err
    for needle in needles:
        assert needle in errors[0], err
    return errors[0]


# (what, the file in the run, where to damage it, the command that uses it)
CASES = [
    ("checkpoint", lambda run: sorted((run / "checkpoints").iterdir())[-1], -5, "distill"),
    ("manifest", lambda run: run / "manifest.json", None, "distill"),
    ("analysis", lambda run: run / "analysis.json", None, "select"),
    ("resume state", lambda run: run / "state" / "last.safetensors", -5, "resume"),
    ("teacher cache", lambda run: next((run / "cache").iterdir()), -5, "distill"),
]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
@pytest.mark.parametrize("what, locate, offset, command", CASES, ids=[c[0] for c in CASES])
def test_a_damaged_file_is_refused_by_name_and_listed_by_verify(tmp_path, capsys, sealed_run, what, locate, offset,
                                                                command, damage):
    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    if command == "resume":  # a run cut off after its last epoch's state: --resume reads the state
        rewrite_manifest(run, {**manifest_json(run), "status": "running", "final": None})
    target = locate(run)
    if offset is None:  # JSON: change the last digit of a number, so the file stays valid and only the seal can tell
        text = target.read_text()
        at = max(i for i, c in enumerate(text) if c.isdigit() and text[i - 1].isdigit() and text[i + 1] in ",\n]}")
        target.write_text(text[:at] + str((int(text[at]) + 1) % 10) + text[at + 1:])
        if damage == "truncate":
            _truncate(target, len(target.read_bytes()) // 2)
    else:
        (_flip if damage == "flip" else _truncate)(target, offset if damage == "flip" else 200)
    if command == "distill":
        student = tmp_path / "s"
        _one_line_error(capsys, ["distill", _student_yaml(tmp_path), "--teacher", f"{run}@last", "--out",
                                 str(student)], str(target))
        assert not student.exists()  # refused before anything was written
    elif command == "select":
        _one_line_error(capsys, ["select", str(run), "--json"], str(target))
    else:
        cfg = tmp_path / "teacher.yaml"
        cfg.write_text((run / "config.yaml").read_text())
        _one_line_error(capsys, ["train", str(cfg), "--out", str(run), "--resume"], str(target))
    assert main(["verify", str(run)]) == 2
    out, err = capsys.readouterr()
    assert str(target) in out and "damaged" in err and len(err.strip().splitlines()) == 1


def test_verify_checks_checkpoints_by_their_seals_when_the_manifest_is_damaged(tmp_path, capsys, sealed_run):
    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    _truncate(run / "manifest.json", 40)
    checkpoint = sorted((run / "checkpoints").iterdir())[0]
    _flip(checkpoint, -5)
    assert main(["verify", str(run)]) == 2
    out = capsys.readouterr().out
    assert str(run / "manifest.json") in out and str(checkpoint) in out, out
    assert out.count("damaged:") == 2  # the other checkpoints pass their seals


def test_verify_passes_an_intact_run_and_study_and_lists_leftover_temporaries(tmp_path, capsys, sealed_run):
    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    (run / "checkpoints" / ".epoch-0006.safetensors.abc123.tmp").write_bytes(b"half a file")
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "all intact" in out and "leftover" in out and ".epoch-0006.safetensors.abc123.tmp" in out
    assert main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_damaged_study_database_is_reported(tmp_path, capsys):
    from ckptkd.study.queue import ResultsDB

    db = ResultsDB(tmp_path / "results.sqlite")
    db.add("a", kind="train", name="a", config={}, path="runs/a")
    db.close()
    assert main(["verify", str(tmp_path)]) == 0
    capsys.readouterr()
    data = bytearray((tmp_path / "results.sqlite").read_bytes())
    data[100:4000] = bytes(3900)  # the header and the schema page zeroed
    (tmp_path / "results.sqlite").write_bytes(bytes(data))
    for extra in tmp_path.glob("results.sqlite-*"):
        extra.unlink()
    assert main(["verify", str(tmp_path)]) == 2
    assert "study database" in capsys.readouterr().out


def test_with_its_database_damaged_a_study_s_run_folders_are_still_verified(tmp_path, sealed_run, capsys):
    from ckptkd.study.queue import ResultsDB

    study = tmp_path / "study"
    shutil.copytree(sealed_run, study / "runs" / "teacher")
    ResultsDB(study / "results.sqlite").close()
    (study / "results.sqlite").write_bytes(b"not a database at all" * 100)
    for extra in study.glob("results.sqlite-*"):
        extra.unlink()
    checkpoint = sorted((study / "runs" / "teacher" / "checkpoints").glob("*.safetensors"))[0]
    _flip(checkpoint, 200)
    assert main(["verify", str(study)]) == 2
    out = capsys.readouterr().out
    assert "study database" in out and str(checkpoint) in out, out


def test_a_damaged_report_json_is_reported(tmp_path, capsys):
    from ckptkd.run.storage import write_sealed_json
    from ckptkd.study.queue import ResultsDB

    ResultsDB(tmp_path / "results.sqlite").close()
    write_sealed_json(tmp_path / "report.json", {"format": 1, "pairs": []})
    assert main(["verify", str(tmp_path)]) == 0
    capsys.readouterr()
    _flip(tmp_path / "report.json", 12)
    assert main(["verify", str(tmp_path)]) == 2
    out = capsys.readouterr().out
    assert str(tmp_path / "report.json") in out and out.count("damaged:") == 1, out


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:os.system",
                                 "!!python/name:os.system"])
def test_a_yaml_tag_that_would_run_code_is_refused_and_never_runs(tmp_path, tag):
    canary = tmp_path / "ran"
    config = tmp_path / "evil.yaml"
    config.write_text(f"name: x\nseed: {tag} ['touch {canary}']\n")
    for command in (["train", str(config), "--out", str(tmp_path / "r")],
                    ["study", str(config), "--out", str(tmp_path / "s")]):
        done = call_cli(*command)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert str(config) in done.stderr and len(done.stderr.strip().splitlines()) == 1
    over = call_cli("train", str(tmp_path / "missing.yaml"), "--set", f"seed={tag} ['touch {canary}']")
    assert over.returncode == 2 and "Traceback" not in over.stderr
    assert not canary.exists() and not (tmp_path / "r").exists()


def test_a_manifest_from_before_seals_is_still_read(tmp_path, sealed_run):
    """Runs written by ckptkd 0.2 had no checksums: they load, and a 0.3 manifest stripped of its seal does not."""
    from ckptkd.errors import UserError
    from ckptkd.run import Run

    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest.pop("checksum")
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="no checksum"):
        Run(run).manifest
    manifest["ckptkd"]["version"] = "0.2.0"
    (run / "manifest.json").write_text(json.dumps(manifest))
    assert Run(run).manifest.complete
    # The same for its analysis.json.
    analysis = json.loads((run / "analysis.json").read_text())
    analysis.pop("checksum")
    (run / "analysis.json").write_text(json.dumps(analysis))
    with pytest.raises(UserError, match="no checksum"):
        Run(run).analysis()
    analysis["ckptkd"]["version"] = "0.2.0"
    (run / "analysis.json").write_text(json.dumps(analysis))
    assert Run(run).analysis()["ranking"] == analysis["ranking"]


def test_an_analysis_without_a_ranking_is_refused_by_name(tmp_path, sealed_run):
    from ckptkd.errors import UserError
    from ckptkd.run import Run
    from ckptkd.run.storage import write_sealed_json

    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    analysis = json.loads((run / "analysis.json").read_text())
    analysis.pop("checksum")
    write_sealed_json(run / "analysis.json", {**analysis, "ranking": []})
    with pytest.raises(UserError, match="has no ranking") as refused:
        Run(run).ranking("distill")
    assert str(run / "analysis.json") in str(refused.value)


@pytest.mark.parametrize("damage, needle", [
    (lambda a: a["criteria"].pop("val@val"), "val@val"),  # found by the fuzz test: select raised a KeyError
    (lambda a: a["selected"].update(criterion="nope@val"), "selected"),
    (lambda a: a["criteria"]["info@val"].update(scores=[{"epoch": "2"}]), "criteria.info@val.scores"),
])
def test_a_well_sealed_but_malformed_analysis_is_refused_naming_the_field(tmp_path, capsys, sealed_run, damage,
                                                                          needle):
    from ckptkd.run.storage import write_sealed_json

    run = tmp_path / "t"
    shutil.copytree(sealed_run, run)
    analysis = json.loads((run / "analysis.json").read_text())
    analysis.pop("checksum")
    damage(analysis)
    write_sealed_json(run / "analysis.json", analysis)  # resealed, as a careless tool would
    for argv in (["select", str(run), "--by", "val", "--split", "val"], ["select", str(run)], ["verify", str(run)]):
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert len(err.strip().splitlines()) == 1 and "analysis.json" in out + err and needle in out + err, err


@pytest.mark.parametrize("fills", ["checkpoint", "state"])
def test_a_full_disk_during_a_save_keeps_the_last_state_and_says_so(tmp_path, capsys, monkeypatch, fills):
    """The disk fills while epoch 3's checkpoint is written, or just after, while its resume state is: either way
    the message, the manifest and the files agree on epoch 2, and no unlisted epoch-3 checkpoint stays behind."""
    import errno
    import os

    from ckptkd.run import RunWriter
    from ckptkd.run import folder as folder_mod

    cfg = tmp_path / "t.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(schedule={"epochs": 4}, checkpoints={"every": 1})))
    assert main(["train", str(cfg), "--out", str(tmp_path / "ref")]) == 0
    reference = manifest_json(tmp_path / "ref")
    full = {"on": False}
    real_fsync, real_end_epoch = os.fsync, RunWriter.end_epoch

    real_save_state = folder_mod.save_state

    def fsync(fd):
        if full["on"] and fills == "checkpoint":
            raise OSError(errno.ENOSPC, "No space left on device", "epoch-0003.safetensors")
        return real_fsync(fd)

    def save_state(path, *args):
        if full["on"]:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save_state(path, *args)

    def end_epoch(self, record, *args, **kwargs):
        full["on"] = record["epoch"] == 3  # the disk fills up while epoch 3's checkpoint is written
        return real_end_epoch(self, record, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(RunWriter, "end_epoch", end_epoch)
    monkeypatch.setattr(folder_mod, "save_state", save_state)
    out = tmp_path / "full"
    err = _one_line_error(capsys, ["train", str(cfg), "--out", str(out)], "disk is full", "epoch 2", "--resume")
    assert ("epoch-0003.safetensors" if fills == "checkpoint" else "last.safetensors") in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0001.safetensors",
                                                                      "epoch-0002.safetensors"]
    monkeypatch.setattr(folder_mod, "save_state", real_save_state)
    monkeypatch.setattr(os, "fsync", real_fsync)
    monkeypatch.setattr(RunWriter, "end_epoch", real_end_epoch)
    manifest = manifest_json(out)  # still the sealed manifest of epoch 2
    assert [c["epoch"] for c in manifest["checkpoints"]] == [1, 2] and not list(out.rglob("*.tmp"))
    assert main(["verify", str(out)]) == 0
    assert main(["train", str(cfg), "--out", str(out), "--resume"]) == 0
    assert [c["sha256"] for c in manifest_json(out)["checkpoints"]] == [c["sha256"] for c in reference["checkpoints"]]
