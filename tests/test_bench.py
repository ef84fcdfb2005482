import json

import torch

from ckptkd.cli.bench import main_json, run_bench
from ckptkd.cli import main

MODES = {"student_alone", "kd_online_1", "kd_online_4", "kd_cached_4", "reference_loop_1", "compute_limit_1"}


def test_bench_measures_every_mode_side_by_side():
    result = run_bench("digits", steps=2, rounds=1)
    line = json.loads(main_json(result))
    assert set(line) >= {"workload", "img_per_s", "cache_build_s"}
    assert set(line["img_per_s"]) == MODES and all(v > 0 for v in line["img_per_s"].values())
    assert line["workload"]["teacher"] == "resnet20" and line["workload"]["steps"] == 2
    assert line["cache_build_s"] > 0
    rates = line["img_per_s"]
    assert abs(result["ratios"]["kd_cached_4/student_alone"] - rates["kd_cached_4"] / rates["student_alone"]) < 1e-2
    parts = line["compute_limit_parts"]
    limit = 1 / (1 / parts["teacher_inference"] + 1 / parts["student_step"])
    assert abs(rates["compute_limit_1"] - limit) < 0.1 and rates["compute_limit_1"] < min(parts.values())


def test_bench_refuses_an_unknown_workload_or_a_missing_gpu(capsys):
    assert main(["bench", "--workload", "imagenet"]) == 2
    assert "imagenet" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["bench", "--device", "cuda"]) == 2
        assert "CUDA is not available" in capsys.readouterr().err


def test_the_folder_bench_times_streaming_against_its_decode_limit_and_the_resident_path(tmp_path, capsys):
    """A small run of `ckptkd bench --workload folder`: the three rates come from one generated folder of JPEGs in
    the bench's size range, and the ratios are the rates' own."""
    from ckptkd.cli.bench_folder import run_folder_bench

    result = run_folder_bench(images=100, steps=2, rounds=1, workers=1)
    w, rate = result["workload"], result["img_per_s"]
    assert w["images"] == 90 and 128 <= w["source_sizes_px"][0] <= w["source_sizes_px"][1] <= 256
    assert set(rate) == {"decode_limit", "streamed_train", "resident_train"} and min(rate.values()) > 0
    assert result["ratios"]["streamed_train/decode_limit"] == round(rate["streamed_train"] / rate["decode_limit"], 3)
    shared = 1 / (1 / rate["decode_limit"] + 1 / rate["resident_train"])
    assert result["cpu_shared_limit"] == round(shared, 1)
    assert main(["bench", "--workload", "folder", "--images", "100", "--steps", "1", "--rounds", "1",
                 "--json"]) in (0, None)
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["workload"]["name"] == "folder"
    for bad in (["--images", "1000000000"], ["--images", "10"], ["--steps", "-3"], ["--rounds", "0"],
                ["--threads", "-2"], ["--workers", "-1"]):
        try:  # argument errors exit 2 from the parser; --images is refused by the bench, before a file is written
            code = main(["bench", "--workload", "folder", *bad])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2 and bad[0] in capsys.readouterr().err
