from pathlib import Path

import pytest
import torch

from ckptkd import config, data as data_mod, distill
from ckptkd.errors import UserError
from ckptkd.teachers import Teacher

from conftest import tiny_config


def _data(**data_cfg):
    return data_mod.build(config.resolve(tiny_config(data=data_cfg))["data"])


def test_view_bank_enumerates_small_augmentations_and_samples_large_ones():
    digits = _data()  # pad 1, no flip: 9 distinct views
    bank = digits.view_bank(32)
    assert bank.shape == (digits.train_x.shape[0], 9, 3)
    assert len({tuple(v) for v in bank[0].tolist()}) == 9
    flipped = _data(hflip=True, pad=2)  # 25 offsets x 2 flips = 50 > 16: sampled
    sampled = flipped.view_bank(16)
    assert sampled.shape[1] == 16 and torch.equal(sampled, flipped.view_bank(16))
    assert _data(augment=False).view_bank(32).shape[1] == 1


def test_cached_logits_equal_online_logits_on_the_same_views(tmp_path, teacher_run):
    data = _data()
    teacher = Teacher.from_references([teacher_run.ref("0.3,0.5,0.7")], quiet=True)
    teacher.prepare(data)
    info = teacher.attach_cache(data, views=32, cache_dir=tmp_path / "cache")
    assert info["built"] == 3 and info["views"] == 9
    batch = next(data.train_batches(seed=3, epoch=2, batch_size=64, view_bank=teacher.view_bank))
    cached = teacher.logits(batch)
    online = teacher._forward(batch.x)
    assert cached.shape == online.shape == (3, 64, 10)
    assert torch.allclose(cached, online, atol=2e-2, rtol=1e-3)  # float16 storage
    assert (cached.argmax(-1) == online.argmax(-1)).float().mean() > 0.99

    again = Teacher.from_references([teacher_run.ref("0.5")], quiet=True)
    again.prepare(data)
    assert again.attach_cache(data, views=32, cache_dir=tmp_path / "cache")["built"] == 0  # reused across ensembles


def test_a_damaged_cache_file_is_refused_and_a_foreign_one_rebuilt(tmp_path, teacher_run):
    data = _data()
    teacher = Teacher.from_references([teacher_run.ref("last")], quiet=True)
    teacher.prepare(data)
    path = Path(teacher.attach_cache(data, views=4, cache_dir=tmp_path)["files"][0])
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[-3] ^= 0x40  # one bit of one stored logit
    for damaged in (bytes(flipped), good[:100]):
        path.write_bytes(damaged)
        with pytest.raises(UserError, match=f"teacher cache {path} is damaged .*delete it"):
            teacher.attach_cache(data, views=4, cache_dir=tmp_path)
    path.unlink()
    assert teacher.attach_cache(data, views=4, cache_dir=tmp_path)["built"] == 1
    other = _data(hflip=True)  # other augmentation settings: another key, another file
    teacher.prepare(other)
    info = teacher.attach_cache(other, views=4, cache_dir=tmp_path)
    assert info["built"] == 1 and info["files"][0] != path


def test_cached_student_is_deterministic_and_records_the_cache(tmp_path, teacher_run):
    cfg = tiny_config(model={"name": "mlp", "widths": [16]}, schedule={"epochs": 2},
                      kd={"cache": "on", "cache_dir": str(tmp_path / "cache")})
    a = distill(cfg, teachers=[teacher_run.ref("0.3,0.5")], out=tmp_path / "a", quiet=True).manifest.to_dict()
    b = distill(cfg, teachers=[teacher_run.ref("0.3,0.5")], out=tmp_path / "b", quiet=True).manifest.to_dict()
    assert a["checkpoints"][-1]["sha256"] == b["checkpoints"][-1]["sha256"]
    assert a["teacher_ensemble"]["cache"]["built"] == 2 and b["teacher_ensemble"]["cache"]["reused"] == 2
    online = distill({**cfg, "kd": {"cache": "off"}}, teachers=[teacher_run.ref("0.3,0.5")], out=tmp_path / "c",
                     quiet=True).manifest.to_dict()
    assert "cache" not in online["teacher_ensemble"]


def test_teacher_numerics_resolve_and_key_the_cache(tmp_path, teacher_run):
    data = _data()
    conv = Teacher.from_references([teacher_run.ref("last")], quiet=True)  # resnet8: channels-last on "auto"
    plain = Teacher.from_references([teacher_run.ref("last")], quiet=True, channels_last=False)
    assert conv.numerics == {"channels_last": True, "autocast": "none"} and not plain.numerics["channels_last"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in conv.models[0].modules())  # folded into the convs
    for teacher in (conv, plain):
        teacher.prepare(data)
    x = next(data.eval_batches("val", 32))[0]
    torch.testing.assert_close(conv.logits(x), plain.logits(x), atol=1e-4, rtol=1e-4)
    first = conv.attach_cache(data, views=2, cache_dir=tmp_path)
    assert plain.attach_cache(data, views=2, cache_dir=tmp_path)["built"] == 1  # other numerics: another file
    assert conv.attach_cache(data, views=2, cache_dir=tmp_path)["built"] == 0 and first["built"] == 1


def test_default_crop_padding_follows_the_image_size():
    assert [data_mod.default_pad(h) for h in (8, 28, 32, 96)] == [1, 2, 4, 4]


def test_two_processes_building_one_cache_leave_one_valid_file_and_no_temporaries(tmp_path, teacher_run):
    import os
    import subprocess
    import sys

    import yaml

    from ckptkd.run.storage import read_tensors

    cfg = tmp_path / "student.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(model={"name": "mlp", "widths": [8]}, schedule={"epochs": 1},
                                              kd={"cache": "on", "cache_dir": str(tmp_path / "cache")})))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    procs = [subprocess.Popen([sys.executable, "-m", "ckptkd", "distill", str(cfg), "--teacher",
                               teacher_run.ref("0.3,0.5,1.0"), "--out", str(tmp_path / f"s{i}")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 3 and all(f.suffix == ".safetensors" for f in files)  # one per teacher, no temporaries
    for f in files:
        read_tensors(f, what="teacher cache")  # sealed and intact


def test_a_cache_is_keyed_by_the_crop_padding(tmp_path, teacher_run):
    """Two paddings with banks of the same shape (8 sampled views each): the second must not answer from the
    first's file, whose logits are of other crops (the data fingerprint does not hold the padding: the key must)."""
    teacher = Teacher.from_references([teacher_run.ref("last")], quiet=True)
    for pad in (1, 2):
        data = _data(pad=pad)
        teacher.prepare(data)
        info = teacher.attach_cache(data, views=8, cache_dir=tmp_path)
        assert info["built"] == 1 and info["views"] == 8, pad
        batch = next(data.train_batches(seed=0, epoch=1, batch_size=64, view_bank=teacher.view_bank))
        assert torch.allclose(teacher.logits(batch), teacher._forward(batch.x), atol=2e-2, rtol=1e-3), pad
    assert len(list(tmp_path.glob("logits-*.safetensors"))) == 2
