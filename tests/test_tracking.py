"""`log.report_to`: the trackers read back what metrics.jsonl says, with the real packages, offline."""

import json
import os

import pytest

from ckptkd import train
from ckptkd.errors import UserError
from ckptkd.run import Run

from conftest import call_cli, tiny_config

TRACKED = {"model": {"name": "mlp", "widths": [16]}, "schedule": {"epochs": 3}, "checkpoints": {"fractions": [1.0]}}


def history(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_event_files_hold_the_numbers_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install 'ckptkd[track]')")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tiny_config(**TRACKED, log={"progress": False, "tensorboard": False, "report_to": ["tensorboard"]}),
                out=tmp_path / "r", quiet=True)
    events = EventAccumulator(str(run.path / "tensorboard")).Reload()
    rows = history(run.path)
    for key in ("train_loss", "val_acc", "train_acc"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [r["epoch"] for r in rows]
        assert [s.value for s in scalars] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert events.Scalars("final/test_acc")[0].value == pytest.approx(Run(run.path).manifest.final.test_acc)


@pytest.mark.filterwarnings("ignore:.*noload")  # a deprecation inside MLflow's SQLAlchemy store
def test_mlflow_local_store_gets_config_metrics_checkpoints_and_final_numbers(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'ckptkd[track]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")  # a local store
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kd-test")
    run = train(tiny_config(**TRACKED, log={"progress": False, "tensorboard": False, "report_to": ["mlflow"]}),
                out=tmp_path / "r", quiet=True)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kd-test")
    [found] = client.search_runs([experiment.experiment_id])
    rows = history(run.path)
    for key in ("train_loss", "val_acc"):
        logged = sorted(client.get_metric_history(found.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in logged] == [(r["epoch"], pytest.approx(r[key])) for r in rows]
    assert found.data.params["optim.lr"] == "0.05" and found.data.params["model.name"] == "mlp"
    manifest = Run(run.path).manifest
    last = manifest.checkpoints[-1]
    assert found.data.tags[f"checkpoint.{os.path.basename(last.path).split('.')[0]}.sha256"] == last.sha256
    assert found.data.metrics["final.test_acc"] == pytest.approx(manifest.final.test_acc)
    assert found.info.status == "FINISHED"


def test_wandb_offline_run_is_written_beside_the_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install 'ckptkd[track]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(tiny_config(**TRACKED, log={"progress": False, "tensorboard": False, "report_to": ["wandb"]}),
                out=tmp_path / "r", quiet=True)
    offline = list((run.path / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_a_tracker_that_is_not_installed_is_an_exit_2_error_naming_package_and_extra(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"log.report_to includes wandb but the wandb package is not installed "
                                        r"\(pip install 'ckptkd\[track\]'\)"):
        train(tiny_config(**TRACKED, log={"report_to": ["wandb"]}), out=tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()  # refused before anything was written
    result = call_cli("train", "--help")
    assert result.returncode == 0


def test_an_unknown_tracker_is_refused_by_the_cli(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data: {name: digits}\nlog: {report_to: [neptune]}\n")
    result = call_cli("train", str(config), "--out", str(tmp_path / "r"))
    assert result.returncode == 2 and "log.report_to" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


@pytest.mark.filterwarnings("ignore:.*noload")
def test_an_interrupted_run_is_killed_in_mlflow_and_its_resume_finishes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install 'ckptkd[track]')")
    import sys

    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "kd-resume")
    folder_module = sys.modules["ckptkd.run.folder"]
    save_state = folder_module.save_state

    def save_then_stop(path, model, optimizer, progress):
        save_state(path, model, optimizer, progress)
        if progress.epoch == 2:
            raise KeyboardInterrupt

    cfg = tiny_config(**TRACKED, log={"progress": False, "tensorboard": False, "report_to": ["mlflow"]})
    monkeypatch.setattr(folder_module, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "r", quiet=True)
    client = MlflowClient()
    experiment = client.get_experiment_by_name("kd-resume").experiment_id
    [first] = client.search_runs([experiment])
    assert first.info.status == "KILLED"
    monkeypatch.setattr(folder_module, "save_state", save_state)
    train(cfg, out=tmp_path / "r", resume=True, quiet=True)
    [again] = client.search_runs([experiment])
    assert again.info.run_id == first.info.run_id and again.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(again.info.run_id, "val_acc")]
    assert sorted(steps) == [1, 2, 3]
