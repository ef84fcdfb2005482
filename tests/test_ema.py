"""optim.ema: the moving average of a student's weights, updated after every step, evaluated every epoch, saved as its
own checkpoints beside the weights' and carried across a resume."""


import pytest
import torch

from ckptkd import config as config_mod, train
from ckptkd.run.storage import read_tensors
from ckptkd.training import engines
from ckptkd.training.loop import Member, fit, fit_one

from conftest import manifest_json, stop_after_epoch, tiny_config

DECAY = 0.8


def ema_config(**sections):
    return tiny_config(**{"model": {"name": "mlp", "widths": [16], "batch_norm": True}, "optim": {"ema": DECAY},
                          "schedule": {"name": "cosine", "epochs": 3}, "checkpoints": {"fractions": [0.5, 1.0]},
                          **sections})


def test_the_average_is_the_weights_averaged_after_every_step(tmp_path, monkeypatch):
    """Replays the average by hand from the weights after each step (captured around the engine's step): the saved
    EMA checkpoint matches to float32 rounding, BatchNorm statistics included, and differs from the weights."""
    steps = []
    step = engines.LoopedEngine.step

    def recording(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        steps.append({k: v.detach().clone() for k, v in self.models[0].state_dict().items()})
        return out

    initial = {}
    monkeypatch.setattr(engines.LoopedEngine, "step", recording)
    real_init = engines.LoopedEngine.__init__

    def remember_initial(self, models, *args, **kwargs):
        initial.update({k: v.detach().clone() for k, v in models[0].state_dict().items()})
        real_init(self, models, *args, **kwargs)

    monkeypatch.setattr(engines.LoopedEngine, "__init__", remember_initial)
    run = train(ema_config(), out=tmp_path / "r", quiet=True)
    average = dict(initial)
    for weights in steps:
        average = {k: DECAY * average[k] + (1 - DECAY) * w if w.is_floating_point() else w
                   for k, w in weights.items()}
    manifest = manifest_json(run.path)
    assert [c["epoch"] for c in manifest["ema_checkpoints"]] == [2, 3]
    saved, _ = read_tensors(run.path / manifest["ema_checkpoints"][-1]["path"], what="checkpoint")
    own, _ = read_tensors(run.path / manifest["checkpoints"][-1]["path"], what="checkpoint")
    assert saved.keys() == average.keys()
    for key, value in average.items():
        assert torch.allclose(saved[key].float(), value.float(), atol=1e-6), key
    first = next(k for k, v in saved.items() if v.is_floating_point() and v.dim() == 2)
    assert not torch.allclose(saved[first], own[first], atol=1e-4)


def test_the_average_is_evaluated_with_its_own_weights(tmp_path):
    """The recorded ema_val_acc is what the saved EMA checkpoint scores on the validation split."""
    from ckptkd import data as data_mod
    from ckptkd.models import from_spec
    from ckptkd.training.loop import evaluate

    run = train(ema_config(), out=tmp_path / "r", quiet=True)
    manifest = manifest_json(run.path)
    cfg = config_mod.resolve(ema_config())
    data = data_mod.build(cfg["data"])
    model = from_spec(manifest["model"])
    for entry in manifest["ema_checkpoints"]:
        weights, _ = read_tensors(run.path / entry["path"], what="checkpoint")
        model.load_state_dict(weights)
        model.eval()
        measured = evaluate(lambda x: model(x)[None], data, "val", 512)[0]
        assert measured["acc"] == pytest.approx(entry["metrics"]["val_acc"])
        history = [h for h in run.path.joinpath("metrics.jsonl").read_text().splitlines()]
        assert f'"ema_val_acc": {entry["metrics"]["val_acc"]}' in history[entry["epoch"] - 1]


def test_a_run_without_ema_keeps_its_manifest(tmp_path):
    run = train(tiny_config(schedule={"epochs": 2}), out=tmp_path / "r", quiet=True)
    assert "ema_checkpoints" not in manifest_json(run.path)
    assert "ema_val_acc" not in run.path.joinpath("metrics.jsonl").read_text()


def test_the_average_resumes_bit_identically(tmp_path, monkeypatch):
    cfg = ema_config()
    full = manifest_json(train(cfg, out=tmp_path / "full", quiet=True).path)
    undo = stop_after_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out=tmp_path / "stopped", quiet=True)
    undo()
    resumed = manifest_json(train(cfg, out=tmp_path / "stopped", resume=True, quiet=True).path)
    assert [c["sha256"] for c in resumed["ema_checkpoints"]] == [c["sha256"] for c in full["ema_checkpoints"]]
    assert [c["sha256"] for c in resumed["checkpoints"]] == [c["sha256"] for c in full["checkpoints"]]


@pytest.mark.parametrize("engine", ["looped", "fused"])
def test_each_member_of_a_group_gets_its_own_average(tmp_path, engine):
    """In a group the average runs on the engine's own layout (N models, or N stacked into one): each member's EMA
    checkpoint is the one it gets alone (looped: exactly; fused: to its float32 rounding)."""
    cfgs = [config_mod.resolve(ema_config(seed=s, name=f"s{s}")) for s in (0, 1, 2)]
    group = fit([Member(c, tmp_path / "group" / c["name"]) for c in cfgs], quiet=True, engine=engine)
    for cfg, run in zip(cfgs, group):
        alone = fit_one(Member(cfg, tmp_path / "alone" / cfg["name"]), quiet=True)
        ours, theirs = (manifest_json(r.path)["ema_checkpoints"][-1] for r in (run, alone))
        if engine == "looped":
            assert ours["sha256"] == theirs["sha256"]
        a, _ = read_tensors(run.path / ours["path"], what="checkpoint")
        b, _ = read_tensors(alone.path / theirs["path"], what="checkpoint")
        for key in a:
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-4), key
    shas = {manifest_json(r.path)["ema_checkpoints"][-1]["sha256"] for r in group}
    assert len(shas) == 3  # three seeds, three averages


def test_show_names_the_average_and_the_papers_metric(tmp_path, capsys):
    from ckptkd.cli import main

    run = train(ema_config(eval={"last_k": 2, "best_of_last": 2}), out=tmp_path / "r", quiet=True)
    capsys.readouterr()
    assert main(["show", str(run.path)]) in (0, None)
    out = " ".join(capsys.readouterr().out.split())
    manifest = manifest_json(run.path)
    best = 100 * manifest["final"]["test_acc_best_of_last"]
    assert f"best test accuracy of the last 2 epochs (the paper's metric; it selects on the test set): {best:.2f}%" \
        in out
    last = manifest["ema_checkpoints"][-1]
    assert f"weight average (optim.ema) at epoch 3: test {100 * last['metrics']['test_acc']:.2f}%" in out


def test_verify_checks_the_averages_checkpoints(tmp_path, capsys):
    from ckptkd.cli import main

    run = train(ema_config(), out=tmp_path / "r", quiet=True)
    averaged = run.path / manifest_json(run.path)["ema_checkpoints"][0]["path"]
    assert main(["verify", str(run.path)]) in (0, None)
    data = bytearray(averaged.read_bytes())
    data[-8:-4] = bytes(4 - b % 4 for b in data[-8:-4])  # four bytes of the weights changed
    averaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(run.path)]) == 2
    assert averaged.name in capsys.readouterr().out
